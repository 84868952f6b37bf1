"""What makes the units of a store belong together: the provenance a manifest, every shard and every item carry.

A store's ``manifest.json`` is written before the first item and names the checkpoint, tokenizer and
dataset the encodings came from, the layout, the encoding size, the text setting and the selection;
each shard carries the same in its schema metadata and each ``.npz`` item in its ``provenance`` member.
A unit whose provenance differs from the manifest's was made by something else and never counts.
``manifest_problem`` is the one rule for what a valid manifest is: a JSON object of this format with
every provenance key, each of the right kind (so ``{}`` or a manifest with the keys taken out is none).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from quackae.core.atomic import write_atomic
from quackae.core.files import folder_kind, read_json

FORMAT = "quackae-store-2"
DTYPE = "float32"  # of every stored encoding
MANIFEST = "manifest.json"
SHARD_FOLDER = "shards"  # STORE/shards/ holds the shards layout's units
STAGING = ".staging"  # STORE/.staging/{job}-{rank}/ holds one writer job's unfinished units
QUARANTINE = ".quarantine"  # corrupt units an encode moved aside
LOCK = ".lock"
STORE_FOLDERS = (STAGING, SHARD_FOLDER, QUARANTINE)  # folders units are renamed between: never links
# the files layout's addresses: item ``id`` at ``{id // ITEMS_PER_TOP}/{id % ITEMS_PER_TOP // ITEMS_PER_FOLDER}/``
ITEMS_PER_TOP = 100_000
ITEMS_PER_FOLDER = 1_000
ITEM_PATH = f"{{id // {ITEMS_PER_TOP}}}/{{id % {ITEMS_PER_TOP} // {ITEMS_PER_FOLDER}}}/{{id}}.npz"
# What must match for a rerun to add to a store: anything else would mix encodings.
PROVENANCE_KEYS = (
    "checkpoint_sha256",
    "tokenizer_sha256",
    "dataset_fingerprint",
    "layout",
    "encoding_size",
    "text",
    "selection",
)
DESCRIPTIONS = {
    "checkpoint_sha256": "another model",
    "tokenizer_sha256": "another tokenizer",
    "dataset_fingerprint": "another dataset",
    "layout": "another layout",
    "encoding_size": "another encoding size",
    "text": "another --text setting",
    "selection": "another selection (--filtered/--evaluate/--label-field/--reduction-threshold)",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def staging_folder(store: Path, job: str, rank: int | str) -> Path:
    """Where job ``job``'s rank ``rank`` (or ``"manifest"``) stages its units: ``STORE/.staging/{job}-{rank}``."""
    return Path(store) / STAGING / f"{job}-{rank}"


def ids_digest(sorted_ids: np.ndarray) -> str:
    """sha256 of a store's sorted ids (little-endian int64): the manifest's ``ids_sha256``, so that a unit whose
    ids were replaced by others, the count unchanged, is found without the prepared data (8 MB a million ids)."""
    return hashlib.sha256(np.ascontiguousarray(sorted_ids, dtype="<i8").tobytes()).hexdigest()


def provenance_of(header: dict[str, Any]) -> dict[str, Any]:
    """The provenance keys of a manifest or header (what every unit carries and is compared on)."""
    return {key: header[key] for key in PROVENANCE_KEYS if key in header}


def differing(unit: dict[str, Any] | None, manifest: dict[str, Any]) -> list[str]:
    """The provenance keys on which a unit's provenance (None: it carries none) differs from ``manifest``."""
    unit = unit or {}
    return [key for key in PROVENANCE_KEYS if key not in unit or unit[key] != manifest.get(key)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def provenance_problem(provenance: dict[str, Any]) -> str | None:
    """Why ``provenance`` is not a complete quackae provenance (a key missing or of the wrong kind), else None."""
    missing = [key for key in PROVENANCE_KEYS if key not in provenance]
    if missing:
        return f"no {', '.join(missing)}"
    for key in ("checkpoint_sha256", "tokenizer_sha256"):
        if not isinstance(provenance[key], str) or not _SHA256.fullmatch(provenance[key]):
            return f"{key} {provenance[key]!r} is not a sha256"
    if not isinstance(provenance["dataset_fingerprint"], str) or not provenance["dataset_fingerprint"]:
        return f"dataset_fingerprint {provenance['dataset_fingerprint']!r} is not a fingerprint"
    from quackae.store.layout import known

    if provenance["layout"] not in known():
        return f"layout {provenance['layout']!r} is none of {', '.join(known())}"
    if not _is_int(provenance["encoding_size"]) or provenance["encoding_size"] < 1:
        return f"encoding_size {provenance['encoding_size']!r} is not a positive integer"
    if not isinstance(provenance["text"], bool):
        return f"text {provenance['text']!r} is not true or false"
    if not isinstance(provenance["selection"], dict):
        return f"selection {provenance['selection']!r} is not an object"
    return None


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """Why ``manifest`` (a JSON object) is not a valid store manifest, else None."""
    if manifest.get("format") != FORMAT:
        return f"its format is {manifest.get('format')!r}, not {FORMAT!r}"
    problem = provenance_problem(manifest)
    if problem is not None:
        return problem
    if not isinstance(manifest.get("complete"), bool):
        return f"complete {manifest.get('complete')!r} is not true or false"
    if manifest["complete"] and (not _is_int(manifest.get("items")) or manifest["items"] < 0):
        return f"items {manifest.get('items')!r} is not a count of items, and it is marked complete"
    digest = manifest.get("ids_sha256", "0" * 64)  # stores completed before the digest was kept lack it
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return f"ids_sha256 {digest!r} is not a sha256"
    for key in ("job", "checkpoint", "tokenizer", "dataset"):  # names readers follow (classify's baselines)
        if key in manifest and not isinstance(manifest[key], str):
            return f"{key} {manifest[key]!r} is not a string"
    return None


def completed(
    previous: dict[str, Any], fields: dict[str, Any], layout_fields: dict[str, Any], counted: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of a complete store: ``previous`` (its header) updated with ``fields`` (provenance), the
    layout's own ``layout_fields`` and ``counted`` (``layout``, ``encoding_size``, the sorted ``ids`` and
    ``selection``: the one recorded unless none is)."""
    ids = counted["ids"]
    manifest = {
        **previous,
        "format": FORMAT,
        "layout": counted["layout"],
        "dtype": DTYPE,
        "encoding_size": counted["encoding_size"] or previous.get("encoding_size") or fields.get("encoding_size"),
        **fields,
        "items": int(len(ids)),
        "ids_sha256": ids_digest(ids),
        "complete": True,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest.setdefault("selection", counted["selection"])
    manifest.update(layout_fields)
    return manifest


def write_manifest(store: Path, manifest: dict[str, Any], staging: Path) -> None:
    """Write ``STORE/manifest.json`` atomically (staged in ``staging``, fsynced)."""
    write_atomic(store / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), staging, durable=True)


def read_manifest(store: Path) -> dict[str, Any] | None:
    """``STORE/manifest.json`` as a JSON object, None when there is none; ``QuackError`` naming it when it cannot
    be read as one (a directory, FIFO, link loop, empty, cut short, not JSON, not an object). Whether it is a
    valid manifest is ``quackae.store.manifest.manifest_problem``'s to say."""
    path = store / MANIFEST
    if not os.path.lexists(path):
        return None
    return read_json(path, "store manifest", f"replace the store with quackae encode --out {store} --overwrite")


def store_folder_problem(store: Path) -> str | None:
    """Why ``store`` cannot be read as a store folder (it is missing, a file, a FIFO, a link loop, ...), else None."""
    kind = folder_kind(store)
    if kind is None:
        return None
    if kind == "missing":
        return f"encoding store {store} does not exist; run quackae encode --out {store}"
    return f"encoding store {store} is {kind}, not a store folder; pass the folder quackae encode --out wrote"


def manifest_path(store: Path, recorded: str) -> Path:
    """A path ``STORE/manifest.json`` records: absolute as encode writes it; a relative one (an older quackae
    wrote them relative to encode's working directory) is taken from the store's parent folder when it is there,
    else as it stands."""
    beside = Path(store).parent / recorded
    return beside if not Path(recorded).is_absolute() and os.path.lexists(beside) else Path(recorded)
