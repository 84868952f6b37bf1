"""The models and how they are run, saved and loaded.

Owns: every hyper-parameter, default and check (``config``, no torch), attention and the CPU-training GRU
(``attention``, ``recurrent``), ``QuackAutoEncoder`` (``autoencoder``, its training noise in ``noise``),
checkpoint files of a RUN (``checkpoints``: where they are, written whole, read safely, what they record),
the classifier head (``classifier``), ``QuackEncoder`` (``encoder``), the Trainer flags and the
accelerator and precision rules (``trainer``, light at the top), the stop at a non-finite step (``guard``)
and timing training steps (``steptime``).

May import: quackae.core, quackae.data.
"""

# the name this path gave before the package existed: loaded on first use, like quackae's own
_MOVED = {"QuackAutoEncoder": "quackae.model.autoencoder"}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)
