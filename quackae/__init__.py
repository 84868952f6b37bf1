"""quackae: turn a text corpus into stored, fixed-size learned encodings."""

from __future__ import annotations

from quackae.attention import AttentionModule, AttentionScore
from quackae.data import TokenizedDataModule
from quackae.model import QuackAutoEncoder, load_model
from quackae.store import EncodingStore
from quackae.writer import AutoencoderWriter, item_path

__all__ = [
    "AttentionModule",
    "AttentionScore",
    "AutoencoderWriter",
    "EncodingStore",
    "QuackAutoEncoder",
    "TokenizedDataModule",
    "item_path",
    "load_model",
]
__version__ = "0.1.0"
