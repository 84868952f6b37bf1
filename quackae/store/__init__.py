"""The encoding store: what ``quackae encode`` writes and every reader of it reads.

Owns: the manifest (``manifest``: format name, provenance keys, what a valid manifest is, the digest of the
ids), the two layouts (``shards``: Arrow shards, the folder names and ``ShardBuffer``; ``items``: one
``.npz`` per item and the ``item_path`` formula), what a store folder may hold (``ownership``), which units
count and which are quarantined (``sound``), one writer job per store (``job``), the prediction writer
(``writer``: ``AutoencoderWriter``, fed through ``transfer``), the reader (``reader``: ``EncodingStore``,
Parquet and torch views) and the whole-store check (``verify``).

May import: quackae.core, quackae.data, quackae.viz.
"""

# the name this path gave before the package existed: loaded on first use, like quackae's own
_MOVED = {"EncodingStore": "quackae.store.reader"}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
