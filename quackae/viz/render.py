"""Pictures people can read (pillow only): labelled heat maps with a colour scale.

``attention_image`` draws one item's attention cropped to its own tokens, input tokens across
the top and output tokens down the side; ``confusion_image`` (via ``heatmap_image``) draws a
confusion matrix with class names and "true"/"predicted" axes; ``encoding_image`` draws an
encoding as a strip. Every picture records its cell grid in the PNG text chunk ``cells``
(``"ROWSxCOLUMNS"``) so tools and tests can check what was drawn.

Shape glossary: H encoding size, S decoder steps, T input tokens, R rows, C columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

PAD = 6  # pixels between the parts of a picture
BAR = 12  # colour-scale width
MAX_LABEL = 24  # characters of a label drawn before it is cut with "…"
# An attention map's cells and token labels, in pixels: a cell holds a label's height with room to spare, so a
# three-token item is still a picture one can read (16-pixel cells and 11-pixel labels drew it at about 240x170).
ATTENTION_CELL, ATTENTION_LABEL = 28, 15


def _colour(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 on a dark-blue -> yellow ramp; returns (..., 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    low, mid, high = np.array([20, 24, 82]), np.array([33, 145, 140]), np.array([253, 231, 37])
    rgb = np.where(v < 0.5, low + (mid - low) * (v / 0.5), mid + (high - mid) * ((v - 0.5) / 0.5))
    return rgb.astype(np.uint8)


@lru_cache(maxsize=4)
def font(size: int = 11) -> Any:
    """Pillow's bundled font at ``size`` pixels (a bitmap font on pillow builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def text_size(text: str, face: Any) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``text`` drawn in ``face``."""
    left, top, right, bottom = face.getbbox(text or " ")
    return int(right - min(left, 0)), int(bottom - min(top, 0))


def vertical_text(text: str, face: Any, fill: str = "black") -> Image.Image:
    """``text`` drawn bottom-to-top on a transparent image (for column labels and y-axis titles)."""
    width, height = text_size(text, face)
    label = Image.new("RGBA", (width + 2, height + 2), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((1, 1), text, font=face, fill=fill)
    return label.rotate(90, expand=True)


def _cut(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def png_info(image: Image.Image) -> PngInfo:
    """The text chunks ``image.info`` holds (``cells``), ready for ``image.save(..., pnginfo=...)``."""
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    return info


def save_png(image: Image.Image, file: Any) -> None:
    """Save ``image`` as PNG (a path or a binary file object) with its ``cells`` text chunk."""
    image.save(file, format="PNG", pnginfo=png_info(image))


def heatmap_image(
    values: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    row_title: str,
    column_title: str,
    cell: int = 16,
    scale: tuple[float, float] | None = None,
    annotations: np.ndarray | None = None,
    scale_title: str = "",
    label_size: int = 11,
) -> Image.Image:
    """``values`` (R, C) as coloured cells with a label per row and column, axis titles and a colour scale.

    ``scale`` is the ``(low, high)`` mapped to the ends of the colour ramp (default: 0 and the
    largest value). ``annotations`` (R, C) strings are written in the cells ('' for none). ``label_size``
    is the labels' font size in pixels. The PNG text chunks record ``cells`` and the ``cell`` size.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape != (len(row_labels), len(column_labels)):
        raise ValueError(
            f"values of shape {values.shape} need {values.shape[0] if values.ndim == 2 else '?'} row labels and "
            f"{values.shape[1] if values.ndim == 2 else '?'} column labels, got {len(row_labels)} and "
            f"{len(column_labels)}"
        )
    rows, columns = values.shape
    low, high = scale if scale is not None else (0.0, float(values.max()) if values.size else 1.0)
    span = (high - low) or 1.0
    face, title_face = font(label_size), font(max(12, label_size))
    row_labels = [_cut(label) for label in row_labels]
    column_labels = [_cut(label) for label in column_labels]
    line = text_size("Ag", face)[1]
    title_height = text_size("Ag", title_face)[1]
    row_label_width = max((text_size(label, face)[0] for label in row_labels), default=0)
    column_label_height = max((text_size(label, face)[0] for label in column_labels), default=0)
    ticks = [f"{v:.3g}" for v in (high, (low + high) / 2, low)]
    tick_width = max(text_size(t, face)[0] for t in ticks)
    scale_title_width = text_size(scale_title, face)[0] if scale_title else 0

    left = PAD + title_height + PAD + row_label_width + PAD
    top = PAD + title_height + PAD + column_label_height + PAD
    grid_width, grid_height = columns * cell, rows * cell
    bar_left = left + grid_width + 2 * PAD
    width = bar_left + BAR + 4 + max(tick_width, scale_title_width) + PAD
    row_title_image = vertical_text(row_title, title_face)
    height = max(top + grid_height, top + 3 * line, top + row_title_image.height) + PAD  # a short grid keeps its title
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    share = (values - low) / span  # (R, C) where each value falls on the colour ramp
    _paint_grid(image, draw, share, annotations, (left, top), cell, face)
    for r, label in enumerate(row_labels):  # right-aligned beside the grid
        w, h = text_size(label, face)
        draw.text((left - PAD - w, top + r * cell + (cell - h) // 2), label, "black", face)
    for c, label in enumerate(column_labels):  # bottom-to-top above the grid
        rotated = vertical_text(label, face)
        x = left + c * cell + (cell - rotated.width) // 2
        image.paste(rotated, (x, top - PAD - rotated.height), rotated)
    w, _ = text_size(column_title, title_face)
    draw.text((left + max(grid_width - w, 0) // 2, PAD), column_title, "black", title_face)
    image.paste(row_title_image, (PAD, top + max(grid_height - row_title_image.height, 0) // 2), row_title_image)
    _paint_scale(image, draw, (bar_left, top), max(grid_height, 3 * line), ticks, scale_title, face)
    image.info["cells"] = f"{rows}x{columns}"
    image.info["cell"] = str(cell)
    return image


def _paint_grid(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    share: np.ndarray,
    annotations: np.ndarray | None,
    corner: tuple[int, int],
    cell: int,
    face: Any,
) -> None:
    """The coloured cells of ``share`` (R, C) in [0, 1] from ``corner``, white lines between them, and the
    annotation of each cell in a colour that reads on it."""
    (left, top), (rows, columns) = corner, share.shape
    pixels = np.repeat(np.repeat(_colour(share), cell, axis=0), cell, axis=1)  # (R * cell, C * cell, 3)
    if rows and columns:
        image.paste(Image.fromarray(pixels), (left, top))
    if cell >= 8:  # thin white grid lines keep neighbouring cells apart
        for r in range(1, rows):
            draw.line([(left, top + r * cell), (left + columns * cell - 1, top + r * cell)], fill="white")
        for c in range(1, columns):
            draw.line([(left + c * cell, top), (left + c * cell, top + rows * cell - 1)], fill="white")
    if annotations is None:
        return
    for r in range(rows):
        for c in range(columns):
            text = str(annotations[r, c])
            if text:
                w, h = text_size(text, face)
                colour = "black" if share[r, c] > 0.5 else "white"
                draw.text((left + c * cell + (cell - w) // 2, top + r * cell + (cell - h) // 2), text, colour, face)


def _paint_scale(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    corner: tuple[int, int],
    height: int,
    ticks: list[str],
    title: str,
    face: Any,
) -> None:
    """The colour ramp (high at the top) from ``corner``, its three ticks beside it and its title above."""
    left, top = corner
    line = text_size("Ag", face)[1]
    ramp = _colour(np.linspace(1.0, 0.0, height))  # (height, 3)
    image.paste(Image.fromarray(np.repeat(ramp[:, None, :], BAR, axis=1)), (left, top))
    for text, y in zip(ticks, (top, top + (height - line) // 2, top + height - line), strict=True):
        draw.text((left + BAR + 4, y), text, "black", face)
    if title:
        draw.text((left, PAD), title, "black", face)


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """A readable label per token id: its own text (``[EOS]`` for specials), a space shown as ``_``."""
    labels = []
    for token in ids:
        text = tokenizer.decode([int(token)], skip_special_tokens=False)
        stripped = text.strip()
        if not stripped:
            labels.append(repr(text)[1:-1] or "''")
        else:
            labels.append(("_" if text[:1].isspace() else "") + stripped)
    return labels


def attention_image(
    weights: np.ndarray,
    input_labels: Sequence[str] | None = None,
    output_labels: Sequence[str] | None = None,
    cell: int = ATTENTION_CELL,
) -> Image.Image:
    """One item's attention weights (S, T) as a labelled heat map: a row per output step, a column per input token.

    Cells are at least ``ATTENTION_CELL`` pixels and token labels ``ATTENTION_LABEL`` pixels high.

    The map is cropped to ``len(output_labels)`` rows and ``len(input_labels)`` columns, the item's
    own tokens, whatever padding its batch had; without labels it is drawn whole with numbered axes.
    Weights are shown on a fixed 0-1 scale, so pictures of different items compare.
    """
    values = np.asarray(weights, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"attention weights must be (S, T), got shape {values.shape}")
    steps = len(output_labels) if output_labels is not None else values.shape[0]
    tokens = len(input_labels) if input_labels is not None else values.shape[1]
    if steps > values.shape[0] or tokens > values.shape[1]:
        raise ValueError(f"{steps} output and {tokens} input labels for attention weights of shape {values.shape}")
    values = values[:steps, :tokens]  # (S_item, T_item)
    rows = list(output_labels) if output_labels is not None else [str(s) for s in range(steps)]
    columns = list(input_labels) if input_labels is not None else [str(t) for t in range(tokens)]
    return heatmap_image(
        values,
        rows,
        columns,
        row_title="output token",
        column_title="input token",
        cell=max(cell, ATTENTION_CELL),
        scale=(0.0, 1.0),
        scale_title="weight",
        label_size=ATTENTION_LABEL,
    )


def item_attention_image(
    tokenizer: Any,
    weights: np.ndarray,
    input_ids: Sequence[int],
    output_ids: Sequence[int],
    pad_id: int = 0,
    eos_id: int | None = None,
    cell: int = ATTENTION_CELL,
) -> Image.Image:
    """``attention_image`` of one item of a padded batch, from its rows as the model gave them.

    ``weights`` (S, T) and ``input_ids`` (T,) may carry the batch's padding and ``output_ids`` (S,)
    the steps after the item's ``[EOS]``: the map keeps the item's input tokens (up to its first pad)
    and its output tokens (up to and including its first ``eos_id``), labelled with their text.
    """
    inputs = [int(t) for t in np.asarray(input_ids).reshape(-1)]
    if pad_id in inputs:
        inputs = inputs[: inputs.index(pad_id)]
    outputs = [int(t) for t in np.asarray(output_ids).reshape(-1)]
    if eos_id is not None and eos_id in outputs:
        outputs = outputs[: outputs.index(eos_id) + 1]
    elif pad_id in outputs:
        outputs = outputs[: outputs.index(pad_id)]
    return attention_image(weights, token_labels(tokenizer, inputs), token_labels(tokenizer, outputs), cell)


def confusion_image(confusion: Sequence[Sequence[int]], classes: Sequence[str], cell: int = 28) -> Image.Image:
    """A confusion matrix (rows true, columns predicted) with class names on both axes and counts in the cells.

    Colours are each true class's share (row-normalised), so small classes read as well as large ones.
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # (K, K)
    counts = np.where(matrix > 0, matrix.astype(np.int64).astype(str), "")
    names = [str(c) for c in classes]
    return heatmap_image(
        share,
        names,
        names,
        row_title="true class",
        column_title="predicted class",
        cell=cell,
        scale=(0.0, 1.0),
        annotations=counts,
        scale_title="share of true",
    )


def encoding_image(encoding: np.ndarray, cell: int = 6, height: int = 24) -> Image.Image:
    """The encoding (H,) as a strip: one column per dimension, scaled to the item's own min and max."""
    values = np.asarray(encoding, dtype=np.float32)
    span = float(values.max() - values.min()) or 1.0
    strip = _colour((values - values.min()) / span)  # (H, 3)
    pixels = np.repeat(np.repeat(strip[None, :, :], height, axis=0), cell, axis=1)  # (height, H * cell, 3)
    image = Image.fromarray(pixels)
    image.info["cells"] = f"1x{values.shape[0]}"
    return image


def item_png(encoding: np.ndarray, attention: tuple[np.ndarray, ...] | None, tokenizer: Any) -> bytes:
    """PNG bytes of one stored item's picture: its attention map when ``attention`` is
    ``(weights (S, T), output ids (S,), input ids (T,))`` and a tokenizer is given, else its encoding (H,)."""
    import io

    if attention is not None and tokenizer is not None:
        from quackae.data.tokenizer import special_ids

        weights, output_ids, input_ids = attention
        special = special_ids(tokenizer)
        image = item_attention_image(tokenizer, weights, input_ids, output_ids, special.pad, special.eos)
    else:
        image = encoding_image(encoding)
    buffer = io.BytesIO()
    save_png(image, buffer)
    return buffer.getvalue()
