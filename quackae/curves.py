"""Training curves: ``RUN/curves.png``, training and validation loss and token accuracy against step.

``train`` draws it when it ends, and ``quackae plot RUN`` on demand. The figures come from
``RUN/metrics.csv`` (Lightning's CSV logger, joined by ``runlogs.merge_metrics``): ``train_loss_step``
and ``train_token_acc_step`` every logging interval, ``val_loss`` and ``val_token_acc`` after each
validation round. Drawn with pillow only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw

from quackae.atomic import atomic_file
from quackae.errors import QuackError
from quackae.render import PAD, font, save_png, text_size, vertical_text
from quackae.runlogs import MERGED_FIX, read_metrics_csv

log = logging.getLogger(__name__)

WIDTH, PANEL_HEIGHT = 720, 220  # pixels of the whole picture and of each panel's plotting area
TRAIN_COLOUR, VAL_COLOUR = (120, 160, 220), (214, 96, 28)
# (panel title, y-axis title, training column, validation column)
PANELS = (
    ("loss", "loss (sum over time steps)", "train_loss_step", "val_loss"),
    (
        "teacher-forced token accuracy: each token predicted from the true previous ones (not the greedy figure)",
        "teacher-forced token accuracy",
        "train_token_acc_step",
        "val_token_acc",
    ),
)

Series = list[tuple[float, float]]


def read_metrics(file: str | Path) -> dict[str, Series]:
    """``{column: [(step, value), ...]}`` of every numeric column of a Lightning ``metrics.csv``.

    A file that is not one (not a regular file, not UTF-8, not CSV, no step column) is a ``QuackError``
    naming it; rows without a step and values that are not finite numbers are left out.
    """
    series: dict[str, Series] = {}
    _, rows = read_metrics_csv(Path(file), MERGED_FIX)
    for row in rows:
        try:
            step = float(row.get("step") or "nan")
        except ValueError:
            continue
        if not math.isfinite(step):
            continue
        for name, text in row.items():
            if name in ("step", "epoch") or not text:
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value):
                series.setdefault(name, []).append((step, value))
    return series


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers spanning [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def _panel(title: str, y_title: str, train: Series, val: Series, steps: tuple[float, float], last: bool) -> Image.Image:
    face, title_face = font(11), font(12)
    values = [v for _, v in train + val]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    y_ticks = _nice_ticks(low, high)
    low, high = min(low, y_ticks[0]), max(high, y_ticks[-1])
    x_ticks = _nice_ticks(*steps, count=6)
    tick_width = max(text_size(_label(t), face)[0] for t in y_ticks)
    line = text_size("Ag", face)[1]
    left = PAD + line + PAD + tick_width + PAD
    top = PAD + text_size("Ag", title_face)[1] + PAD
    plot_width = WIDTH - left - 230
    bottom = top + PANEL_HEIGHT
    height = bottom + PAD + line + (PAD + line if last else 0) + PAD
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)

    def x_of(step: float) -> float:
        return left + (step - steps[0]) / ((steps[1] - steps[0]) or 1.0) * plot_width

    def y_of(value: float) -> float:
        return bottom - (value - low) / ((high - low) or 1.0) * PANEL_HEIGHT

    for tick in y_ticks:
        y = y_of(tick)
        draw.line([(left, y), (left + plot_width, y)], fill=(230, 230, 230))
        w, h = text_size(_label(tick), face)
        draw.text((left - PAD - w, y - h / 2), _label(tick), "black", face)
    for tick in x_ticks:
        x = x_of(tick)
        if left <= x <= left + plot_width + 0.5:
            draw.line([(x, bottom), (x, bottom + 3)], fill="black")
            w, _ = text_size(_label(tick), face)
            draw.text((x - w / 2, bottom + PAD), _label(tick), "black", face)
    draw.rectangle([left, top, left + plot_width, bottom], outline="black")
    if len(train) > 1:
        draw.line([(x_of(s), y_of(v)) for s, v in train], fill=TRAIN_COLOUR, width=1)
    if len(val) > 1:
        draw.line([(x_of(s), y_of(v)) for s, v in val], fill=VAL_COLOUR, width=2)
    for s, v in val:
        x, y = x_of(s), y_of(v)
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=VAL_COLOUR)
    draw.text((left, PAD), title, "black", title_face)
    rotated = vertical_text(y_title, face)
    image.paste(rotated, (PAD, top + max(PANEL_HEIGHT - rotated.height, 0) // 2), rotated)
    legend_x, legend_y = left + plot_width + 2 * PAD, top
    kind = " teacher-forced" if "accuracy" in y_title else ""
    for name, colour, points in (("training" + kind, TRAIN_COLOUR, train), ("validation" + kind, VAL_COLOUR, val)):
        draw.line([(legend_x, legend_y + line / 2), (legend_x + 18, legend_y + line / 2)], fill=colour, width=2)
        label = f"{name} ({len(points)} points)" if points else f"{name}: none logged"
        draw.text((legend_x + 24, legend_y), label, "black", face)
        legend_y += line + PAD
    if last:
        w, _ = text_size("optimizer step", face)
        draw.text((left + (plot_width - w) / 2, bottom + 2 * PAD + line), "optimizer step", "black", face)
    return image


def curves_image(metrics: dict[str, Series]) -> Image.Image:
    """Loss and token accuracy against step, training and validation, one panel each."""
    steps = [s for name in ("train_loss_step", "val_loss") for s, _ in metrics.get(name, [])]
    span = (min(steps, default=0.0), max(steps, default=1.0))
    panels = [
        _panel(title, y_title, metrics.get(train, []), metrics.get(val, []), span, last=i == len(PANELS) - 1)
        for i, (title, y_title, train, val) in enumerate(PANELS)
    ]
    image = Image.new("RGB", (WIDTH, sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        image.paste(panel, (0, y))
        y += panel.height
    image.info["cells"] = f"{len(panels)}x1"
    image.info["points"] = ",".join(f"{name}={len(metrics.get(name, []))}" for _, _, a, b in PANELS for name in (a, b))
    return image


def write_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN/metrics.csv`` into ``out`` (default ``RUN/curves.png``); returns the PNG's path.

    Raises ``QuackError`` when the run has no ``metrics.csv``. The PNG appears atomically.
    """
    run = Path(run)
    metrics_file = run / "metrics.csv"
    if not metrics_file.exists() and not metrics_file.is_symlink():
        raise QuackError(f"{run} has no metrics.csv; pass a RUN directory written by quackae train")
    target = Path(out) if out else run / "curves.png"
    if target.is_dir():
        raise QuackError(f"--out {target} is a directory; give the PNG a file name")
    image = curves_image(read_metrics(metrics_file))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target, "wb") as handle:
        save_png(image, handle)
    log.info("training curves drawn in %s", target)
    return target
