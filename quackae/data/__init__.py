"""The data: from corpus files to the batches a model sees.

Owns: reading corpus files into rows and judging them (``readers``), the docstring corpora (``corpus``), the
BPE tokenizer and the one tokenizing rule (``tokenizer``), the prepared folder (``prepared``: reading,
fingerprint, marker; the ``prepare`` stage writes one whole), which items a store keeps (``selection``), the
id-hash split and bucketed batches (``sampler``), padding and the one length-sorted batching loop (``padding``),
``TokenizedDataModule`` (``module``) and the predict loop's data and batch formats (``predict``).

May import: quackae.core.
"""

# the name this path gave before the package existed: loaded on first use, like quackae's own
_MOVED = {"TokenizedDataModule": "quackae.data.module"}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
