"""The keyed id hash: one stable number per item id, shared by every rule that orders or samples items by id.

The data split, the classifier's stratified split, the probe subsets of the quality bench and
``--reduction-threshold`` all order or sample items by ``id_hash(id, key)``, so the same id gets the same
place on every run and machine, and adding rows never moves the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def id_hash(index: int, key: bytes | str = b"") -> float:
    """A uniform number in [0, 1) from a keyed blake2b hash of the decimal id: stable across runs and machines."""
    key = key.encode() if isinstance(key, str) else key
    digest = hashlib.blake2b(str(int(index)).encode(), digest_size=8, key=key[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64


def id_hashes(ids: Sequence[int], key: bytes | str = b"") -> np.ndarray:
    """``id_hash`` of every id (float64 (N,))."""
    return np.fromiter((id_hash(i, key) for i in ids), dtype=np.float64, count=len(ids))
