"""``quackae train`` and ``quackae reconstruct``.

``train`` fits a ``QuackAutoEncoder`` on a prepared directory with a Lightning ``Trainer``
(checkpoints best-by-val-loss and last, early stopping, LR monitor, CSV metrics, gradient
clipping) and ends with held-out greedy reconstruction figures on the test split. One GPU, many
GPUs and many nodes work the Lightning way through ``--accelerator/--devices/--num-nodes/--strategy``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from quackae.errors import QuackError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerFlags:
    """Flags every stage that runs a model takes; they go to the Lightning ``Trainer``."""

    accelerator: str = field(default="auto", metadata={"help": "cpu, gpu, cuda, mps or auto"})
    devices: str = field(default="auto", metadata={"help": "device count, list (0,1) or auto"})
    num_nodes: int = field(default=1, metadata={"help": "nodes for multi-node DDP"})
    strategy: str = field(default="auto", metadata={"help": "Lightning strategy: auto, ddp, ddp_spawn, ..."})
    precision: str | None = field(
        default=None,
        metadata={"help": "Lightning precision; default bf16-mixed on a GPU that supports it, else 32-true"},
    )
    batch_size: int = field(default=64, metadata={"help": "items per batch"})
    num_workers: int = field(default=0, metadata={"help": "data loader worker processes"})

    def check_trainer_flags(self) -> None:
        devices = str(self.devices).strip()
        if not (
            devices == "auto"
            or re.fullmatch(r"-1|[1-9]\d*", devices)
            or re.fullmatch(r"\[?\s*\d+\s*(,\s*\d+\s*)*,?\s*\]?", devices)
        ):
            raise ValueError(
                f"--devices must be auto, a count of at least 1 (-1: all), or a list of device indices like 0,1; "
                f"got {self.devices!r}"
            )
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must not be negative, got {self.num_workers}")
        if self.num_nodes < 1:
            raise ValueError(f"--num-nodes must be at least 1, got {self.num_nodes}")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pl.Trainer``; ``QuackError`` when this machine lacks the accelerator asked for."""
        check_accelerator(self.accelerator)
        devices: Any = str(self.devices).strip()
        if re.fullmatch(r"-?\d+", devices):
            devices = int(devices)
        return {
            "accelerator": self.accelerator,
            "devices": devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision or default_precision(self.accelerator),
        }


def check_accelerator(accelerator: str) -> None:
    """Refuse a GPU accelerator on a machine torch sees none on, before Lightning raises deep inside."""
    name = accelerator.lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if (name == "cuda" or (name == "gpu" and not has_mps)) and not torch.cuda.is_available():
        raise QuackError(
            f"--accelerator {accelerator}: torch {torch.__version__} sees no GPU on this machine; "
            "use --accelerator cpu or auto, or install a CUDA build of torch"
        )
    if name == "mps" and not has_mps:
        raise QuackError(f"--accelerator {accelerator}: this machine has no MPS device; use --accelerator cpu or auto")


def default_precision(accelerator: str) -> str:
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


_MAX_TIME = re.compile(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}")


@dataclass(frozen=True)
class TrainConfig(TrainerFlags):
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
    val_check_interval: float = field(
        default=1.0,
        metadata={"help": "validate every N training steps (a whole number above 1) or after this share of each epoch"},
    )
    embed_size: int = field(default=128, metadata={"help": "token embedding size"})
    hidden_size: int = field(default=256, metadata={"help": "encoding size H (even)"})
    layers: int = field(default=1, metadata={"help": "GRU layers in encoder and decoder"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    lr_min: float = field(default=1e-5, metadata={"help": "cosine-annealing floor"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings and the token predictor's input"})
    teacher_forcing: float = field(default=1.0, metadata={"help": "share of batches decoded with teacher forcing"})
    denoise: float = field(default=0.0, metadata={"help": "probability of corrupting each encoder input token"})
    denoise_mode: str = field(
        default="delete", metadata={"help": "delete or mask ([UNK]) corrupted tokens", "choices": ("delete", "mask")}
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

    def __post_init__(self) -> None:
        self.check_trainer_flags()
        positive = ("embed_size", "hidden_size", "layers", "log_every_n_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hidden_size % 2:
            raise ValueError(f"--hidden-size must be even (two encoder directions), got {self.hidden_size}")
        if self.max_epochs == 0 or self.max_epochs < -1 or self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("--max-epochs and --max-steps must be positive or -1")
        if self.lr <= 0 or not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"need --lr > 0 and 0 <= --lr-min <= --lr, got {self.lr} and {self.lr_min}")
        if not 0 <= self.teacher_forcing <= 1:
            raise ValueError(f"--teacher-forcing must be in [0, 1], got {self.teacher_forcing}")
        if not 0 <= self.denoise < 1:
            raise ValueError(f"--denoise must be in [0, 1), got {self.denoise}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.val_fraction <= 0:
            raise ValueError("--val-fraction must be positive: checkpoints and early stopping watch val_loss")
        if self.max_time is not None and not _MAX_TIME.fullmatch(self.max_time.strip()):
            raise ValueError(f"--max-time must be DD:HH:MM:SS (00:00:02:00 is 2 minutes), got {self.max_time!r}")
        if not self.val_check_interval > 0 or (
            self.val_check_interval > 1 and not float(self.val_check_interval).is_integer()
        ):
            raise ValueError(
                "--val-check-interval must be a share of an epoch in (0, 1] or a whole number of steps, "
                f"got {self.val_check_interval}"
            )
        if self.patience < 1 or self.gradient_clip < 0:
            raise ValueError("--patience must be at least 1 and --gradient-clip not negative")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``quackae train``; returns the figures also written to ``RUN/summary.json``.

    A RUN continues with ``--resume RUN/checkpoints/last.ckpt`` into the same RUN: the best
    checkpoint's record, the metrics history and the step count carry on. Checkpoints are written
    atomically. The summary records why training stopped (``stop_reason``); a run that stopped
    before its first validation has no best checkpoint and says so.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    from quackae.data import TokenizedDataModule
    from quackae.model import QuackAutoEncoder, read_checkpoint
    from quackae.tokenizer import special_ids

    started = time.time()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise QuackError(f"--out {out} is a file; give the run a directory")
    resume = Path(config.resume) if config.resume else None
    if resume is not None and not resume.is_file():
        raise QuackError(f"--resume checkpoint {resume} does not exist")
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")) and resume is None:
        raise QuackError(
            f"{out} already holds checkpoints; choose another --out or continue with "
            f"--resume {checkpoints / 'last.ckpt'}"
        )
    trainer_kwargs = config.trainer_kwargs()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = TokenizedDataModule(
        config.data,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        bucket=config.bucket,
    )
    datamodule.setup("fit")
    if not len(datamodule.splits["train"]) or not len(datamodule.splits["val"]):
        raise QuackError(
            f"{config.data} has too few items for a train and a validation split "
            f"({ {k: len(v) for k, v in datamodule.splits.items()} }); add rows or raise --val-fraction"
        )
    tokenizer = datamodule.tokenizer
    ids = special_ids(tokenizer)
    hparams: dict[str, Any] = {
        "num_embeddings": tokenizer.get_vocab_size(),
        "embed_size": config.embed_size,
        "hidden_size": config.hidden_size,
        "layers": config.layers,
        "learning_rate": config.lr,
        "learning_rate_min": config.lr_min,
        "pad_id": ids.pad,
        "eos_id": ids.eos,
        "mask_id": ids.unk,
        "teacher_forcing_ratio": config.teacher_forcing,
        "denoise": config.denoise,
        "denoise_mode": config.denoise_mode,
        "weight_decay": config.weight_decay,
        "dropout": config.dropout,
    }
    start_step = 0
    if resume is not None:
        saved_checkpoint = read_checkpoint(resume)
        start_step = int(saved_checkpoint.get("global_step", 0))
        saved = dict(saved_checkpoint["hyper_parameters"])
        del saved_checkpoint
        if saved.get("num_embeddings") != hparams["num_embeddings"]:
            raise QuackError(
                f"--resume {resume} was trained with vocabulary {saved.get('num_embeddings')}, the data "
                f"in {config.data} has {hparams['num_embeddings']}"
            )
        changed = {k: (saved.get(k), v) for k, v in hparams.items() if saved.get(k) != v}
        if changed:
            log.warning("resuming with the checkpoint's model settings, not the flags: %s", changed)
        hparams = saved
    model = QuackAutoEncoder(**hparams)

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(config.data) / "tokenizer.json", out / "tokenizer.json")
    removed = remove_temporaries(checkpoints)
    if removed:
        log.info("removed %d partial checkpoint files a stopped run left in %s", removed, checkpoints)
    attempt = _new_attempt(out, start_step, resume)
    checkpoint = _BestCheckpoint(
        dirpath=checkpoints,
        filename="best",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        save_last=False,
        save_on_train_epoch_end=False,  # only after a validation, which is what it watches
        enable_version_counter=False,
    )
    early = EarlyStopping(monitor="val_loss", mode="min", patience=config.patience, strict=False)
    record = _SaveLast(checkpoints / "last.ckpt")
    # Each start of the run logs into its own folder, so nothing earlier is overwritten; metrics.csv joins them.
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="logs", version=attempt.name)]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    except ImportError:
        log.debug("tensorboard not installed (pip install tensorboard): CSV metrics only")
    interval: float | int = config.val_check_interval
    every_epoch: int | None = 1
    if interval > 1:
        interval, every_epoch = int(interval), None  # every N steps, across epoch boundaries
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        max_time=config.max_time.strip() if config.max_time else None,
        val_check_interval=interval,
        check_val_every_n_epoch=every_epoch,
        gradient_clip_val=config.gradient_clip or None,
        logger=loggers,
        default_root_dir=str(out),
        callbacks=[checkpoint, record, early, LearningRateMonitor(logging_interval="step")],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=config.log_every_n_steps,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    resolved = {
        "train": asdict(config),
        "model": dict(hparams),
        "trainer": {
            **trainer_kwargs,
            "max_epochs": config.max_epochs,
            "max_steps": config.max_steps,
            "max_time": config.max_time,
            "val_check_interval": interval,
            "gradient_clip_val": config.gradient_clip,
            "world_size": trainer.world_size,
        },
        "data": {"path": config.data, "items": {k: len(v) for k, v in datamodule.splits.items()}},
    }
    if trainer.is_global_zero:
        write_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    interrupted = False
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SystemExit:
        # Lightning turns Ctrl-C into a graceful shutdown and then sys.exit(1)
        if not trainer.interrupted:
            raise
        interrupted = True
    if not trainer.is_global_zero:
        return {}
    merge_metrics(out)
    reason, why = _stop_reason(trainer, early, interrupted, config)
    best = checkpoints / "best.ckpt"
    has_best = best.is_file() and checkpoint.best_model_score is not None
    last = checkpoints / "last.ckpt"
    summary: dict[str, Any] = {
        "run": str(out),
        "stop_reason": reason,
        "stop_detail": why,
        "best_checkpoint": str(best) if has_best else None,
        "last_checkpoint": str(last) if last.is_file() else None,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "validations": record.validations,
        "best_val_loss": float(checkpoint.best_model_score) if has_best else None,
        "test_items": len(datamodule.splits["test"]),
    }
    print(f"training stopped: {why} at step {trainer.global_step} ({record.validations} validations in this start)")
    if not has_best:
        print(
            f"no validation ran before the stop, so there is no best checkpoint; held-out figures come from "
            f"{last.name} (validate sooner with --val-check-interval)"
        )
    if interrupted:
        summary["seconds"] = round(time.time() - started, 1)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        raise KeyboardInterrupt
    evaluated = best if has_best else last
    if not evaluated.is_file():
        summary.update(evaluated_checkpoint=None, token_accuracy=None, exact_match=None)
        summary["seconds"] = round(time.time() - started, 1)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print("no checkpoint was written: training stopped before its first step")
        return summary
    summary["evaluated_checkpoint"] = str(evaluated)
    summary.update(evaluate_reconstruction(evaluated, datamodule, datamodule.splits["test"]))
    summary["seconds"] = round(time.time() - started, 1)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(
        f"held-out reconstruction on {summary['test_items']} test items: token accuracy "
        f"{summary['token_accuracy']:.3f}, exact match {summary['exact_match']:.3f} "
        f"({'best' if has_best else 'last'} checkpoint {evaluated})"
    )
    return summary


def _stop_reason(trainer: Any, early: Any, interrupted: bool, config: TrainConfig) -> tuple[str, str]:
    """``(reason, what happened)``: interrupted, early_stopping, max_time, max_steps, max_epochs or other."""
    from pytorch_lightning.callbacks import Timer

    if interrupted:
        return "interrupted", "interrupted (Ctrl-C); continue with --resume RUN/checkpoints/last.ckpt"
    stopping = getattr(early, "stopping_reason", None)
    if (stopping is not None and stopping.value != 0) or (stopping is None and early.stopped_epoch > 0):
        detail = getattr(early, "stopping_reason_message", None) or f"val_loss did not improve for {early.patience}"
        return "early_stopping", "early stopping: " + " ".join(str(detail).split())
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and config.max_time and (timer.time_remaining() or 0) <= 0:
        return "max_time", f"--max-time {config.max_time} reached"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return "max_steps", f"--max-steps {trainer.max_steps} reached"
    if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs", f"--max-epochs {trainer.max_epochs} reached"
    return "other", "training ended"


class _SaveLast(Checkpoint):
    """Write ``last.ckpt`` after every validation round and when fitting ends, so a run stopped by
    --max-steps/--max-time mid-epoch resumes from its final step (``ModelCheckpoint`` would only save
    after validation, and versions the name when resuming into another directory).

    A ``Checkpoint``, so Lightning runs it after the best-checkpoint callback listed before it: the
    ``last.ckpt`` it writes holds that callback's updated record of the best.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.validations = 0

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validations += 1
            trainer.save_checkpoint(str(self.path), weights_only=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)


class _BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose restored record agrees with the ``best.ckpt`` on disk.

    A kill between writing ``best.ckpt`` and ``last.ckpt`` leaves a ``last.ckpt`` whose record of the
    best is one round old; on resume the record is taken from ``best.ckpt`` itself (each checkpoint
    this callback writes holds its own score), so the best file and its score never disagree.
    """

    @property
    def state_key(self) -> str:
        # the plain ModelCheckpoint's key, so runs written before this class existed resume their record
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            # resuming into another RUN is allowed: its record starts empty, below
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        best = Path(self.dirpath or "") / "best.ckpt"
        own = _own_record(best, self.state_key) if best.is_file() else None
        if own is None or own.get("best_model_score") is None:
            if not best.is_file():
                self.best_model_path, self.kth_best_model_path, self.best_k_models = "", "", {}
                self.best_model_score = None
                self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
            return
        score = own["best_model_score"]
        self.best_model_path = self.kth_best_model_path = str(best)
        self.best_model_score = self.kth_value = score
        self.best_k_models = {str(best): score}


def _own_record(path: Path, key: str) -> dict[str, Any] | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable best.ckpt keeps the resumed record
        log.warning("cannot read %s to check its score; keeping the record of the resumed checkpoint", path)
        return None
    record = saved.get("callbacks", {}).get(key) if isinstance(saved, dict) else None
    return record if isinstance(record, dict) else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a hidden temporary name, fsynced, then renamed over the old one.

    A kill or a full disk mid-write leaves the previous checkpoint whole; a failed write is a
    ``QuackError`` naming the file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
        try:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise QuackError(
                f"writing checkpoint {target} failed ({error.strerror or error}); the previous {target.name} is kept"
            ) from error
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_directory(target.parent)


TEMPORARY_SUFFIX = ".partial"


def remove_temporaries(directory: Path) -> int:
    """Delete the partial checkpoint files a killed run left in ``directory``; returns how many."""
    if not directory.is_dir():
        return 0
    found = list(directory.glob(f".*{TEMPORARY_SUFFIX}"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, fsync and rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _attempts(logs: Path) -> list[tuple[int, Path]]:
    """``(number, RUN/logs/attempt-N)`` of every start of the run so far, in order."""
    found = {}
    for path in logs.glob("attempt-*"):
        number = path.name.removeprefix("attempt-").removesuffix(".json")
        if number.isdigit():
            found[int(number)] = logs / f"attempt-{number}"
    return sorted(found.items())


def _new_attempt(out: Path, start_step: int, resume: Path | None) -> Path:
    """``RUN/logs/attempt-N`` for this start of the run (the CSV logger creates it), with the step it
    starts at recorded in ``attempt-N.json`` beside it.

    A ``metrics.csv`` written straight into RUN by an older quackae becomes ``attempt-0``.
    """
    logs = out / "logs"
    legacy = out / "metrics.csv"
    if legacy.is_file() and not logs.is_dir():
        (logs / "attempt-0").mkdir(parents=True)
        os.replace(legacy, logs / "attempt-0" / "metrics.csv")
        write_atomic(logs / "attempt-0.json", json.dumps({"start_step": 0}) + "\n")
    logs.mkdir(parents=True, exist_ok=True)
    number = max((n for n, _ in _attempts(logs)), default=0) + 1
    record = {"start_step": start_step, "resume": str(resume) if resume else None}
    write_atomic(logs / f"attempt-{number}.json", json.dumps(record) + "\n")
    return logs / f"attempt-{number}"


def merge_metrics(out: Path) -> Path | None:
    """Join every start's ``metrics.csv`` into ``RUN/metrics.csv``, in step order.

    Rows an earlier start logged at or after the step the next start resumed from were undone by that
    resume (the steps ran again), so they are left out: each step appears once, as it finally ran.
    """
    attempts = [path for _, path in _attempts(out / "logs")]
    starts = []
    for attempt in attempts:
        info = attempt.with_name(attempt.name + ".json")
        starts.append(int(json.loads(info.read_text()).get("start_step", 0)) if info.is_file() else 0)
    fields: list[str] = []
    rows: list[dict[str, str]] = []
    for index, attempt in enumerate(attempts):
        file = attempt / "metrics.csv"
        if not file.is_file():
            continue
        cutoff = min(starts[index + 1 :], default=None)
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields.extend(name for name in reader.fieldnames or [] if name not in fields)
            for row in reader:
                step = row.get("step") or ""
                if cutoff is not None and step.isdigit() and int(step) >= cutoff:
                    continue
                rows.append(row)
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "metrics.csv", buffer.getvalue())
    return out / "metrics.csv"


@torch.no_grad()
def evaluate_reconstruction(checkpoint: Path, datamodule: Any, indices: Any, limit: int = 2000) -> dict[str, float]:
    """Greedy reconstruction token accuracy and exact-match rate over (at most ``limit``) items ``indices``."""
    from quackae.data import pad_batch
    from quackae.model import load_model

    model = load_model(str(checkpoint))
    if not len(indices):
        return {"token_accuracy": float("nan"), "exact_match": float("nan")}
    indices = list(indices)[:limit]
    rows = datamodule.dataset.select_columns(["input_ids"])[indices]["input_ids"]
    correct = total = exact = 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), 128):
        batch = [rows[i] for i in order[start : start + 128]]
        x = pad_batch(batch, model.pad_id)  # (B, T)
        out = model.reconstruct(x, max_length=x.size(1))  # (B, S)
        if out.size(1) < x.size(1):
            out = torch.nn.functional.pad(out, (0, x.size(1) - out.size(1)), value=model.pad_id)
        valid = x.ne(model.pad_id)
        hits = (out[:, : x.size(1)] == x) & valid
        correct += int(hits.sum())
        total += int(valid.sum())
        exact += int((hits | ~valid).all(dim=1).sum())
    return {"token_accuracy": correct / total, "exact_match": exact / len(rows)}


def resolve_run(model: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, tokenizer.json)`` of a RUN directory (best, else last) or a ``.ckpt`` file."""
    path = Path(model)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                checkpoint = path / "checkpoints" / name
                break
        else:
            raise QuackError(f"{path} holds no checkpoints/best.ckpt or last.ckpt; pass a RUN from quackae train")
        run = path
    elif path.is_file():
        checkpoint, run = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise QuackError(f"model {path} does not exist; pass a RUN directory or a .ckpt file")
    tokenizer = run / "tokenizer.json"
    if not tokenizer.is_file():
        raise QuackError(f"no tokenizer.json beside the model ({tokenizer}); quackae train copies it into the RUN")
    return checkpoint, tokenizer


@dataclass(frozen=True)
class ReconstructConfig:
    texts: tuple[str, ...] = field(metadata={"positional": True, "help": "texts to encode and rebuild"})
    model: str = field(default="storage/run", metadata={"path": True, "help": "RUN directory or .ckpt file"})
    max_length: int = field(default=128, metadata={"help": "tokens per text (longer texts are truncated)"})

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}")


def reconstruct_texts(config: ReconstructConfig) -> list[tuple[str, str]]:
    """Each text and its greedy reconstruction."""
    from quackae.data import pad_batch
    from quackae.model import load_model
    from quackae.tokenizer import decode, load_tokenizer

    checkpoint, tokenizer_file = resolve_run(config.model)
    model = load_model(str(checkpoint))
    tokenizer = load_tokenizer(tokenizer_file)
    eos = special_eos(tokenizer)
    pairs = []
    for text in config.texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids[: config.max_length - 1] + [eos]
        if len(ids) == 1:
            pairs.append((text, ""))
            continue
        if max(ids) >= model.num_embeddings:
            raise QuackError(f"the tokenizer beside {checkpoint} does not match the model's vocabulary")
        out = model.reconstruct(pad_batch([ids], model.pad_id), max_length=len(ids) + 8)
        pairs.append((text, decode(tokenizer, out[0].tolist())))
    return pairs


def special_eos(tokenizer: Any) -> int:
    from quackae.tokenizer import special_ids

    eos = special_ids(tokenizer).eos
    if eos is None:
        raise QuackError("the tokenizer has no [EOS] token")
    return eos


def reconstruct_command(config: ReconstructConfig) -> list[tuple[str, str]]:
    pairs = reconstruct_texts(config)
    for text, rebuilt in pairs:
        print(f"text:          {text}\nreconstructed: {rebuilt}\n")
    return pairs
