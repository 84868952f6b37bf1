"""Every command's frozen config dataclass: its fields are the command's flags (``help`` metadata is the
``--help`` text, the default the flag's default) and ``__post_init__`` refuses a bad value in one line.

Nothing here imports torch, Lightning, datasets or pyarrow, so the command line builds any command's parser,
answers ``--help`` and names a mistyped flag before a heavy library loads.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from quackae.data.readers import FORMATS
from quackae.data.tokenizer import DEFAULT_MAX_LENGTH, MIN_VOCAB, TRAIN_CHARS_PER_TOKEN
from quackae.model.config import ModelFlags, model_problems, settle_objective
from quackae.model.trainer import TrainerFlags
from quackae.store.layout import known
from quackae.store.shards import DEFAULT_SHARD_SIZE

LAYOUTS = known()  # the registered store layouts, the default first

MAX_VOCAB = 2**24  # the largest vocabulary prepare trains or accepts


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...] = field(
        metadata={
            "positional": True,
            "path": True,
            "help": "text files (.jsonl .json .csv .parquet .txt, one text per line for .txt)",
        }
    )
    out: str = field(default="storage/prepared", metadata={"path": True, "help": "output directory"})
    format: str | None = field(
        default=None, metadata={"help": "input format, overriding the file extension", "choices": FORMATS}
    )
    text_field: str = field(default="text", metadata={"help": "column holding the text"})
    id_field: str = field(
        default="id",
        metadata={"help": "column holding a non-negative integer id; when no input has it, ids are the row numbers"},
    )
    vocab_size: int = field(default=8000, metadata={"help": "BPE vocabulary size when training a tokenizer"})
    min_frequency: int = field(default=2, metadata={"help": "minimum pair frequency for a BPE merge"})
    tokenizer: str | None = field(
        default=None, metadata={"path": True, "help": "use this tokenizer.json instead of training one"}
    )
    max_length: int = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={
            "help": "maximum tokens per item, [EOS] included; longer texts are truncated and counted (the stored "
            "text stays whole). Tokenizing reads at most twice what these tokens can cover of a text, and tokenizer "
            f"training at most {TRAIN_CHARS_PER_TOKEN} characters per token of a text and 100 of a word; the cuts "
            "are counted in prepare.json"
        },
    )
    num_proc: int = field(default=1, metadata={"help": "worker processes for tokenization (datasets.map)"})
    strict: bool = field(default=False, metadata={"help": "fail (exit 1) when any row is rejected"})
    overwrite: bool = field(default=True, metadata={"help": "replace an existing prepared dataset in --out"})

    def __post_init__(self) -> None:
        # one file name or a sequence of them; a bare string is one file, never its characters
        inputs = (self.inputs,) if isinstance(self.inputs, (str, os.PathLike)) else tuple(self.inputs)
        object.__setattr__(self, "inputs", tuple(str(p) for p in inputs))
        if not self.inputs:
            raise ValueError("give at least one INPUT file")
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(f"--vocab-size must be at most {MAX_VOCAB:,}, got {self.vocab_size}")
        if self.min_frequency > 2**31:
            raise ValueError(f"--min-frequency must be at most {2**31}, got {self.min_frequency}")
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(
                f"--vocab-size must be at least {MIN_VOCAB} (256 byte tokens, 4 special tokens and "
                f"one merge), got {self.vocab_size}"
            )
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2 (one token and [EOS]), got {self.max_length}")
        if self.num_proc < 1:
            raise ValueError(f"--num-proc must be at least 1, got {self.num_proc}")
        if self.min_frequency < 1:
            raise ValueError(f"--min-frequency must be at least 1, got {self.min_frequency}")


_MAX_TIME = re.compile(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}")


@dataclass(frozen=True)
class TrainConfig(TrainerFlags, ModelFlags):
    """``quackae train``: the Trainer flags, the model's flags (``ModelFlags``) and the run's own."""

    data: str = field(
        default="storage/prepared",
        metadata={"positional": True, "path": True, "help": "prepared directory (quackae prepare --out)"},
    )
    out: str = field(default="storage/run", metadata={"path": True, "help": "run directory to write"})
    max_epochs: int = field(default=20, metadata={"help": "maximum epochs (-1: no limit)"})
    max_steps: int = field(default=-1, metadata={"help": "maximum optimizer steps (-1: no limit)"})
    max_time: str | None = field(
        default=None, metadata={"help": "wall-clock limit DD:HH:MM:SS (00:00:30:00 is 30 minutes)"}
    )
    val_check_interval: float | None = field(
        default=None,
        metadata={
            "help": "validate every N training steps (a whole number above 1) or after this share of each epoch; "
            "none given: after every epoch, or every 5 minutes of steps (by a step timed at the start) when an "
            "epoch takes longer"
        },
    )
    gradient_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0: off)"})
    patience: int = field(default=5, metadata={"help": "early-stopping patience in validation rounds"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of ids held out for validation"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of ids held out for the final test"})
    bucket: bool = field(default=True, metadata={"help": "batch items of similar length together"})
    seed: int = field(default=0, metadata={"help": "seed for the split, initialisation and batching"})
    resume: str | None = field(
        default=None, metadata={"path": True, "help": "checkpoint to continue (steps, optimizer, scheduler)"}
    )
    log_every_n_steps: int = field(default=10, metadata={"help": "metrics logging interval in steps"})
    eval_items: int = field(
        default=1000,
        metadata={"help": "test items whose greedy reconstruction is scored at the end, a seeded sample (-1: all)"},
    )

    def __post_init__(self) -> None:
        self.check_trainer_flags()
        for name in ("val_check_interval", "gradient_clip", "val_fraction", "test_fraction"):
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        problems = model_problems(self, as_flags=True)
        if problems:
            raise ValueError("; ".join(problems))
        settle_objective(self)
        if self.log_every_n_steps <= 0:
            raise ValueError(f"--log-every-n-steps must be positive, got {self.log_every_n_steps}")
        if self.max_epochs == 0 or self.max_epochs < -1 or self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("--max-epochs and --max-steps must be positive or -1")
        if self.val_fraction <= 0:
            raise ValueError("--val-fraction must be positive: checkpoints and early stopping watch val_loss")
        if self.max_time is not None and not _MAX_TIME.fullmatch(self.max_time.strip()):
            raise ValueError(f"--max-time must be DD:HH:MM:SS (00:00:02:00 is 2 minutes), got {self.max_time!r}")
        if self.eval_items < -1:
            raise ValueError(f"--eval-items must be -1 (all) or at least 0, got {self.eval_items}")
        interval = self.val_check_interval
        if interval is not None and (not interval > 0 or (interval > 1 and not float(interval).is_integer())):
            raise ValueError(
                "--val-check-interval must be a share of an epoch in (0, 1] or a whole number of steps, "
                f"got {self.val_check_interval}"
            )
        if self.patience < 1 or self.gradient_clip < 0:
            raise ValueError("--patience must be at least 1 and --gradient-clip not negative")


@dataclass(frozen=True)
class EncodeConfig(TrainerFlags):
    data: str = field(
        default="storage/prepared",
        metadata={"positional": True, "path": True, "help": "prepared directory (quackae prepare --out)"},
    )
    model: str = field(default="storage/run", metadata={"path": True, "help": "RUN directory or .ckpt file"})
    out: str = field(default="storage/store", metadata={"path": True, "help": "store directory to write"})
    batch_size: int | None = field(
        default=None,
        metadata={"help": "items per batch (default: 128 on a CPU, 1024 on a GPU, whose larger batches keep it busy)"},
    )
    layout: str = field(
        default="shards",
        metadata={"help": "shards (columnar Arrow files) or files (one .npz per item)", "choices": LAYOUTS},
    )
    shard_size: int = field(default=DEFAULT_SHARD_SIZE, metadata={"help": "items per shard and rank (shards layout)"})
    text: bool = field(
        default=True,
        metadata={"help": "store each item's original text (from the prepared data) and whether it was truncated"},
    )
    overwrite: bool = field(default=False, metadata={"help": "empty the store first, whatever made it"})
    png: str | None = field(
        default=None,
        metadata={"help": "also write a PNG per item: attention or encoding", "choices": ("attention", "encoding")},
    )
    png_limit: int = field(default=1000, metadata={"help": "at most this many PNGs per rank"})
    png_ids: tuple[int, ...] = field(
        default_factory=tuple, metadata={"help": "with --png, draw only the items with these ids (default: the first)"}
    )
    label_field: str | None = field(
        default=None, metadata={"help": "metadata column with labels (for --filtered / --evaluate)"}
    )
    unlabeled_value: str | None = field(
        default=None, metadata={"help": "label value meaning unlabelled (null always does)"}
    )
    filtered: bool = field(default=False, metadata={"help": "store only labelled items"})
    evaluate: bool = field(default=False, metadata={"help": "store only unlabelled items"})
    reduction_threshold: float = field(
        default=1.0, metadata={"help": "with --filtered, keep this share of the majority class"}
    )
    seed: int = field(default=0, metadata={"help": "seed for --reduction-threshold sampling"})
    writer_threads: int = field(default=2, metadata={"help": "background writer threads (files layout)"})

    def __post_init__(self) -> None:
        self.check_trainer_flags()
        if self.filtered and self.evaluate:
            raise ValueError("--filtered and --evaluate exclude each other")
        if (self.filtered or self.evaluate) and not self.label_field:
            raise ValueError("--filtered and --evaluate need --label-field")
        if not 0 < self.reduction_threshold <= 1:
            raise ValueError(f"--reduction-threshold must be in (0, 1], got {self.reduction_threshold}")
        if self.writer_threads < 1:
            raise ValueError(f"--writer-threads must be at least 1, got {self.writer_threads}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be positive, got {self.shard_size}")
        if self.png_limit < 0:
            raise ValueError(f"--png-limit must not be negative, got {self.png_limit}")
        if self.png_ids and self.png is None:
            raise ValueError("--png-ids names the items to draw with --png attention or --png encoding; add one")


@dataclass(frozen=True)
class ReconstructConfig:
    texts: tuple[str, ...] = field(metadata={"positional": True, "help": "texts to encode and rebuild"})
    model: str = field(default="storage/run", metadata={"path": True, "help": "RUN directory or .ckpt file"})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "tokens per text, [EOS] included (default: the --max-length the run's data was prepared with)"
        },
    )

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}")


@dataclass(frozen=True)
class VerifyConfig:
    store: str = field(
        default="storage/store",
        metadata={"positional": True, "path": True, "help": "store directory (quackae encode --out)"},
    )
    data: str | None = field(
        default=None, metadata={"path": True, "help": "prepared directory: check every selected id is stored once"}
    )


@dataclass(frozen=True)
class ExportConfig:
    store: str = field(
        default="storage/store",
        metadata={"positional": True, "path": True, "help": "store directory (quackae encode --out)"},
    )
    out: str = field(default="storage/encodings.parquet", metadata={"path": True, "help": "Parquet file to write"})

    def __post_init__(self) -> None:
        if not str(self.out).endswith(".parquet"):
            raise ValueError(f"--out must name a .parquet file, got {self.out}")


# ---------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ClassifyConfig(TrainerFlags):
    store: str = field(
        default="storage/store",
        metadata={"positional": True, "path": True, "help": "encoding store directory or exported .parquet"},
    )
    label_field: str = field(default="label", metadata={"help": "metadata field holding the class"})
    out: str = field(default="storage/classifier", metadata={"path": True, "help": "output directory"})
    predict: str | None = field(
        default=None, metadata={"path": True, "help": "apply the classifier in this directory instead of training one"}
    )
    unlabeled_value: str | None = field(default=None, metadata={"help": "label value meaning unlabelled"})
    seed: int = field(default=0, metadata={"help": "seed for the split and initialisation"})
    max_epochs: int = field(default=100, metadata={"help": "maximum epochs"})
    hidden_sizes: tuple[int, ...] = field(default=(256,), metadata={"help": "MLP hidden layer sizes"})
    dropout: float = field(default=0.2, metadata={"help": "dropout after each hidden layer"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    class_weights: bool = field(default=False, metadata={"help": "weight the loss by inverse class frequency"})
    val_fraction: float = field(default=0.15, metadata={"help": "share of each class for validation"})
    test_fraction: float = field(default=0.15, metadata={"help": "share of each class for the test"})
    patience: int = field(default=10, metadata={"help": "early-stopping patience in epochs"})

    def __post_init__(self) -> None:
        self.check_trainer_flags()
        for name in ("dropout", "lr", "weight_decay", "val_fraction", "test_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError("--max-epochs and --patience must be at least 1")
        if any(h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"--hidden-sizes must be positive, got {self.hidden_sizes}")
        if not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ValueError("--dropout must be in [0, 1) and --lr positive")
        if not (
            0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError("--val-fraction and --test-fraction must be in (0, 1) with a sum below 1")


@dataclass(frozen=True)
class PlotConfig:
    run: str = field(metadata={"positional": True, "path": True, "help": "RUN directory (quackae train --out)"})
    out: str | None = field(default=None, metadata={"path": True, "help": "PNG to write; none given: RUN/curves.png"})


@dataclass(frozen=True)
class RunConfig:
    pipeline: str = field(metadata={"positional": True, "help": "pipeline YAML file"})
    root: str | None = field(default=None, metadata={"help": "output root, overriding the file's root"})
    accelerator: str | None = field(
        default=None, metadata={"help": "accelerator for every model stage, overriding the file"}
    )


@dataclass(frozen=True)
class DemoConfig:
    out: str = field(default="storage/demo", metadata={"help": "where the demo writes everything"})
    accelerator: str | None = field(
        default=None, metadata={"help": "accelerator for every model stage (the demo file says cpu)"}
    )
