"""Silence the library notices a quackae user cannot act on; ``--verbose`` leaves them on.

Only the specific messages listed here are filtered, by text, so any other warning still shows:
Lightning's start-up lines (accelerators found, the litlogger tip, the validation schedule it was given, the model
summary table) and its line on why fitting stopped (``quackae train`` prints its own, with the flag), and
warnings about choices quackae makes on purpose (its own ``transfer_batch_to_device``, a predict loader
Lightning does not rebuild, so it keeps no batch indices (``data.PredictLoader``), a CSV log written into a RUN
folder that already holds ``tokenizer.json``) or that come from inside
Lightning (torch's ``_pytree.LeafSpec`` deprecation).
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category) of warnings.warn calls made while quackae uses its libraries
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"You have overridden `transfer_batch_to_device` in `LightningModule`", UserWarning),
    (r"Couldn't infer the batch indices fetched from your dataloader", UserWarning),
    (r"Experiment logs directory .* exists and is not empty", UserWarning),
    (r"Precision .* is not supported by the model summary", UserWarning),
)

# start of Lightning's info lines (logged on its rank_zero loggers) that say nothing about the run
LIBRARY_NOTICES: tuple[str, ...] = (
    "GPU available: ",
    "TPU available: ",
    "HPU available: ",
    "💡 Tip: For seamless cloud logging",
    "`Trainer(val_check_interval=",
    "`Trainer.fit` stopped: ",
    "Using bfloat16 Automatic Mixed Precision",
)

# loggers whose every line is a notice (Lightning's model summary table)
SILENT_LOGGERS: tuple[str, ...] = (
    "pytorch_lightning.callbacks.model_summary",
    "lightning.pytorch.callbacks.model_summary",
)

# loggers that carry the notices above (Lightning 2.x, as the standalone and the unified package)
NOTICE_LOGGERS: tuple[str, ...] = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _NoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        return record.name not in SILENT_LOGGERS and not message.startswith(LIBRARY_NOTICES)


_FILTER = _NoticeFilter()


def quiet_libraries() -> None:
    """Filter the notices in ``LIBRARY_WARNINGS`` and ``LIBRARY_NOTICES`` for this process.

    Imports nothing heavy: the loggers are created (or found) by name and keep the filter when
    Lightning is imported later.
    """
    for pattern, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in NOTICE_LOGGERS + SILENT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def is_library_notice(text: str) -> bool:
    """Whether ``text`` (a line of output) is one of the notices ``quiet_libraries`` filters."""
    line = text.strip()
    return line.startswith(LIBRARY_NOTICES) or any(re.search(p, line) for p, _ in LIBRARY_WARNINGS)
