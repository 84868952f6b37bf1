"""quackae: turn a text corpus into stored, fixed-size learned encodings.

The public names load on first use (PEP 562), so ``import quackae`` and the ``quackae`` command's
``--help`` and error paths stay fast: torch and Lightning are imported only when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AttentionModule": "quackae.model.attention",
    "AttentionScore": "quackae.model.attention",
    "AutoencoderWriter": "quackae.writer",
    "EncodingStore": "quackae.store",
    "QuackAutoEncoder": "quackae.model.autoencoder",
    "QuackEncoder": "quackae.model.encoder",
    "TokenizedDataModule": "quackae.data",
    "item_path": "quackae.writer",
    "load_model": "quackae.model.checkpoints",
    "ModelConfig": "quackae.model.config",
    "PRESETS": "quackae.model.config",
}

__all__ = [
    "AttentionModule",
    "AttentionScore",
    "AutoencoderWriter",
    "EncodingStore",
    "ModelConfig",
    "PRESETS",
    "QuackAutoEncoder",
    "QuackEncoder",
    "TokenizedDataModule",
    "item_path",
    "load_model",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from quackae.data.module import TokenizedDataModule
    from quackae.model.attention import AttentionModule, AttentionScore
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.checkpoints import load_model
    from quackae.model.config import PRESETS, ModelConfig
    from quackae.model.encoder import QuackEncoder
    from quackae.store import EncodingStore
    from quackae.writer import AutoencoderWriter, item_path


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quackae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
