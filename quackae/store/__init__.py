"""The encoding store: what ``quackae encode`` writes and every reader of it reads.

Owns: the manifest (``manifest``: format name, provenance keys, what a valid manifest is, the digest of the
ids, the folder and staging names, the ``item_path`` formula), the layout interface and its registry
(``layout``: ``Layout``, ``Unit``, ``CorruptUnit``, ``LAYOUTS``), the two shipped layouts (``shards``:
``SHARDS``, Arrow shards and ``ShardBuffer``; ``items``: ``FILES``, one ``.npz`` per item), what a store folder
may hold (``ownership``), whether a unit is sound and which copy of an id wins (``sound``), one writer job per
store (``job``), the prediction writer (``writer``: ``AutoencoderWriter``, fed through ``transfer``) and the
reader (``reader``: ``EncodingStore``, Parquet and torch views). Job, writer, reader and ``quackae verify``
reach units only through a ``Layout``: a new layout is one module that registers one.

May import: quackae.core, quackae.data, quackae.viz.
"""

# the name this path gave before the package existed: loaded on first use, like quackae's own
_MOVED = {"EncodingStore": "quackae.store.reader"}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
