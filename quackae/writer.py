"""Where stored items live: ``item_path``."""

from __future__ import annotations

from numbers import Integral
from pathlib import PurePosixPath


def item_path(index: int, suffix: str = "png", dir_only: bool = False, is_collection: bool = False) -> str:
    """Relative path of item ``index``: ``f"{index // 100000}/{index % 100000 // 1000}/{index}.{suffix}"``.

    At most 1000 items share a folder. With ``is_collection`` the item gets a folder of its own
    (``.../{index}/{index}.{suffix}``); ``dir_only`` returns only the enclosing folder. Raises
    ``ValueError`` for a negative or non-integer index.
    """
    if isinstance(index, bool) or not isinstance(index, Integral) or index < 0:
        raise ValueError(f"item index must be a non-negative integer, got {index!r}")
    index = int(index)
    folder = PurePosixPath(str(index // 100000), str(index % 100000 // 1000))
    if is_collection:
        folder = folder / str(index)
    if dir_only:
        return str(folder)
    return str(folder / f"{index}.{suffix}")
