"""Pictures of stored items for people who would rather look than read (pillow only).

Shape glossary: H encoding size, S decoder steps, T input tokens.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _colour(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 on a dark-blue -> yellow ramp; returns (..., 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    low, mid, high = np.array([20, 24, 82]), np.array([33, 145, 140]), np.array([253, 231, 37])
    rgb = np.where(v < 0.5, low + (mid - low) * (v / 0.5), mid + (high - mid) * ((v - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def encoding_image(encoding: np.ndarray, cell: int = 6, height: int = 24) -> Image.Image:
    """The encoding (H,) as a strip: one column per dimension, scaled to the item's own min and max."""
    values = np.asarray(encoding, dtype=np.float32)
    span = float(values.max() - values.min()) or 1.0
    strip = _colour((values - values.min()) / span)  # (H, 3)
    pixels = np.repeat(np.repeat(strip[None, :, :], height, axis=0), cell, axis=1)  # (height, H * cell, 3)
    return Image.fromarray(pixels)


def attention_image(weights: np.ndarray, cell: int = 8) -> Image.Image:
    """Attention weights (S, T) as a heat map: a row per decoder step, a column per input token."""
    values = np.asarray(weights, dtype=np.float32)
    peak = float(values.max()) or 1.0
    pixels = _colour(values / peak)  # (S, T, 3)
    pixels = np.repeat(np.repeat(pixels, cell, axis=0), cell, axis=1)  # (S * cell, T * cell, 3)
    return Image.fromarray(pixels)
