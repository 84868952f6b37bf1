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
    "AutoencoderWriter": "quackae.store.writer",
    "EncodingStore": "quackae.store.reader",
    "QuackAutoEncoder": "quackae.model.autoencoder",
    "QuackEncoder": "quackae.model.encoder",
    "TokenizedDataModule": "quackae.data.module",
    "item_path": "quackae.store.items",
    "load_model": "quackae.model.checkpoints",
    "ModelConfig": "quackae.model.config",
    "PRESETS": "quackae.model.config",
    "LatentClassifier": "quackae.model.classifier",
    # each command's stage function and its config, as ``quackae.stages`` has them
    "prepare": "quackae.stages.prepare",
    "PrepareConfig": "quackae.stages.prepare",
    "train": "quackae.stages.train",
    "TrainConfig": "quackae.stages.train",
    "encode": "quackae.stages.encode",
    "EncodeConfig": "quackae.stages.encode",
    "reconstruct": "quackae.stages.reconstruct",
    "ReconstructConfig": "quackae.stages.reconstruct",
    "verify": "quackae.stages.verify",
    "VerifyConfig": "quackae.stages.verify",
    "export": "quackae.stages.export",
    "ExportConfig": "quackae.stages.export",
    "classify": "quackae.stages.classify",
    "ClassifyConfig": "quackae.stages.classify",
    "plot": "quackae.stages.plot",
    "PlotConfig": "quackae.stages.plot",
    "run_pipeline": "quackae.stages.pipeline",
    "RunConfig": "quackae.stages.pipeline",
    # what each stage function returns: a frozen dataclass of its figures
    "StageResult": "quackae.core.results",
    "PrepareResult": "quackae.stages.prepare",
    "TrainResult": "quackae.stages.train",
    "EncodeResult": "quackae.stages.encode",
    "ReconstructResult": "quackae.stages.reconstruct",
    "VerifyResult": "quackae.stages.verify",
    "ExportResult": "quackae.stages.export",
    "ClassifyResult": "quackae.stages.classify",
    "PredictResult": "quackae.stages.classify",
    "PlotResult": "quackae.stages.plot",
    "RunResult": "quackae.stages.pipeline",
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
    from quackae.store.items import item_path
    from quackae.store.reader import EncodingStore
    from quackae.store.writer import AutoencoderWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quackae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
