"""What an ``AutoencoderWriter`` is told: how it writes the items it is given and what it records."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from quackae.store.layout import known
from quackae.store.shards import DEFAULT_SHARD_SIZE


@dataclass(frozen=True)
class WriterOptions:
    """The writer's settings, checked once here.

    ``filtered`` keeps labelled items, ``evaluate`` unlabelled ones (both need ``label_field``; a label equal to
    ``unlabeled_value`` or null is unlabelled); ``reduction_threshold`` keeps that share of ``reduce_label``'s
    items (seeded by ``seed``): the selection the manifest records, which the caller applies by predicting only
    the items it keeps (``quackae.data.selection.selected_rows``, once, in ``quackae encode``). ``png`` also
    draws ``attention`` or ``encoding`` pictures, at most ``png_limit`` a rank, only of the items ``png_ids``
    names when given. ``layout`` names a registered layout (``quackae.store.layout``): ``shards``
    (``shard_size`` items a shard) or ``files`` (``threads`` writer threads); ``max_pending`` batches wait at
    most. ``manifest`` is recorded in the store's manifest, ``schema`` gives the metadata columns' Arrow types,
    ``tokenizer`` with ``text`` adds a decoded ``text`` column. ``job`` is the ``StoreJob`` that holds the store,
    ``known_ids`` the ids already stored (read from the store when None), and ``background`` whether batches
    are stored by a thread (None: decided when prediction starts).
    """

    filtered: bool = False
    evaluate: bool = False
    reduction_threshold: float = 1.0
    label_field: str | None = None
    unlabeled_value: Any = None
    reduce_label: Any = None
    seed: int = 0
    png: str | None = None
    png_limit: int = 1000
    png_ids: Any = None
    threads: int = 2
    max_pending: int = 8
    manifest: dict[str, Any] | None = None
    layout: str = "shards"
    shard_size: int = DEFAULT_SHARD_SIZE
    schema: Any = None
    tokenizer: Any = None
    text: bool = True
    job: Any = None
    known_ids: Any = None
    background: bool | None = None

    def __post_init__(self) -> None:
        if self.filtered and self.evaluate:
            raise ValueError(
                "filtered and evaluate exclude each other: filtered keeps labelled items, "
                "evaluate keeps unlabelled ones"
            )
        if (self.filtered or self.evaluate) and not self.label_field:
            raise ValueError("filtered/evaluate need a label field (--label-field)")
        if not 0.0 < self.reduction_threshold <= 1.0:
            raise ValueError(f"reduction_threshold must be in (0, 1], got {self.reduction_threshold}")
        if self.png not in (None, "attention", "encoding"):
            raise ValueError(f"png must be None, 'attention' or 'encoding', got {self.png!r}")
        if self.layout not in known():
            raise ValueError(f"layout must be one of {', '.join(known())}, got {self.layout!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")

    @property
    def selection(self) -> dict[str, Any]:
        """Which items the store keeps, as its manifest records it."""
        names = (
            "filtered",
            "evaluate",
            "label_field",
            "unlabeled_value",
            "reduce_label",
            "reduction_threshold",
            "seed",
        )
        return {name: getattr(self, name) for name in names}


# the settings the writer keeps as attributes of its own (the manifest is copied, the thread count decided)
WRITER_FIELDS = tuple(
    f.name for f in dataclasses.fields(WriterOptions) if f.name not in ("manifest", "threads", "png_ids")
)
