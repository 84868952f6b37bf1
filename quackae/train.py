"""``quackae train``: fit a ``QuackAutoEncoder`` on a prepared directory.

``train`` fits a ``QuackAutoEncoder`` on a prepared directory with a Lightning ``Trainer``
(checkpoints best-by-val-loss and last, early stopping, LR monitor, CSV metrics, gradient
clipping) and ends with held-out greedy reconstruction figures on the test split. One GPU, many
GPUs and many nodes work the Lightning way through ``--accelerator/--devices/--num-nodes/--strategy``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import EarlyStopping
from tokenizers import Tokenizer

from quackae.atomic import remove_temporaries, write_atomic
from quackae.budget import FINISH_S, Budget, now, plan_training
from quackae.checkpoints import AtomicCheckpointIO, BestCheckpoint, SaveLast, non_finite_weights, read_checkpoint
from quackae.divergence import FiniteGuard, NonFiniteTraining
from quackae.errors import QuackError
from quackae.files import read_bytes, regular_file
from quackae.heldout import figure_lines, greedy_reconstruction, teacher_forced
from quackae.modelconfig import ModelFlags, model_problems
from quackae.runlock import RunLock
from quackae.runlogs import latest_attempt, merge_metrics, new_attempt
from quackae.runrecord import RecordTrainedOn, check_resume, check_run, data_record, read_run_record, write_run_record
from quackae.runtime import TrainerFlags, progress_bar, settled_heap
from quackae.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)


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


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``quackae train``; returns the figures also written to ``RUN/summary.json``.

    A RUN continues with ``--resume RUN/checkpoints/last.ckpt`` into the same RUN: the best
    checkpoint's record, the metrics history and the step count carry on. One training at a time
    holds a RUN (``RunLock``; the ranks of one DDP job share it), and a RUN trains on one prepared
    dataset: ``RUN/run.json`` and every checkpoint record its tokenizer and fingerprint, and a train
    or resume on other data is refused. Checkpoints are written atomically and only while the model is
    finite: training that goes non-finite stops at once (``NonFiniteTraining``). The summary records
    why training stopped (``stop_reason``); a run that stopped before its first validation has no best
    checkpoint and says so.
    """
    from quackae.data import TokenizedDataModule
    from quackae.tokenizer import special_ids

    started = now()  # --max-time counts from here
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise QuackError(f"--out {out} is a file; give the run a directory")
    resume = Path(config.resume) if config.resume else None
    if resume is not None:
        regular_file(resume, "--resume checkpoint", "pass RUN/checkpoints/last.ckpt of the run to continue")
    trainer_kwargs = config.trainer_kwargs(training=True)
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
        **config.model_settings(),
        "num_embeddings": tokenizer.get_vocab_size(),
        "pad_id": ids.pad,
        "eos_id": ids.eos,
        "mask_id": ids.unk,
    }
    record = data_record(datamodule.dataset, tokenizer, config.data)
    start_step = 0
    if resume is not None:
        saved_checkpoint = read_checkpoint(resume)
        check_resume(resume, saved_checkpoint, record, config.data)
        broken = non_finite_weights(saved_checkpoint["state_dict"])
        if broken:
            raise QuackError(
                f"--resume {resume} holds non-finite weights ({', '.join(broken[:3])}); resume an earlier checkpoint"
            )
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
    lock = RunLock.take(out)
    try:
        if lock.leader:
            _claim(out, config, record, resume)
        return _fit(config, datamodule, hparams, record, resume, start_step, lock, trainer_kwargs, started)
    finally:
        lock.release()


def _claim(out: Path, config: TrainConfig, record: dict[str, Any], resume: Path | None) -> None:
    """Holding the lock: check that RUN may take this training, then record what it trains on."""
    checkpoints = out / "checkpoints"
    check_run(out, record, config.data)
    if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")) and resume is None:
        raise QuackError(
            f"{out} already holds checkpoints; choose another --out or continue with "
            f"--resume {checkpoints / 'last.ckpt'}"
        )
    merge_metrics(out)  # reads and checks the history of earlier starts before any training
    if read_run_record(out) is None:
        write_run_record(out, record)
    source = Path(config.data) / "tokenizer.json"
    tokenizer = read_bytes(source, "tokenizer file", "run quackae prepare again")
    if tokenizer_hash(Tokenizer.from_str(tokenizer.decode("utf-8"))) != record["tokenizer_sha256"]:
        raise QuackError(f"{source} changed while this train started (a prepare into it?); start the train again")
    target = out / "tokenizer.json"
    if not target.is_file() or target.read_bytes() != tokenizer:
        write_atomic(target, tokenizer)
    removed = remove_temporaries(checkpoints)
    if removed:
        log.info("removed %d partial checkpoint files a stopped run left in %s", removed, checkpoints)


def _fit(
    config: TrainConfig,
    datamodule: Any,
    hparams: dict[str, Any],
    record: dict[str, Any],
    resume: Path | None,
    start_step: int,
    lock: RunLock,
    trainer_kwargs: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Train into a locked RUN, then evaluate and write the summary."""
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    from quackae.model import QuackAutoEncoder

    out = Path(config.out)
    checkpoints = out / "checkpoints"
    interval, budget, eval_items = plan_training(config, datamodule, hparams, trainer_kwargs, start_step, started)
    model = QuackAutoEncoder(**hparams)
    attempt = new_attempt(out, start_step, resume) if lock.leader else latest_attempt(out)
    checkpoint = BestCheckpoint(
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
    record_last = SaveLast(checkpoints / "last.ckpt")
    guard = FiniteGuard(every=config.log_every_n_steps)
    # Each start of the run logs into its own folder, so nothing earlier is overwritten; metrics.csv joins them.
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="logs", version=attempt.name)]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    except ImportError:
        log.debug("tensorboard not installed (pip install tensorboard): CSV metrics only")
    every_epoch: int | None = 1
    if interval > 1:
        interval, every_epoch = int(interval), None  # every N steps, across epoch boundaries
    callbacks = [guard, RecordTrainedOn(record), checkpoint, record_last, early, LearningRateMonitor("step")]
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        val_check_interval=interval,
        check_val_every_n_epoch=every_epoch,
        gradient_clip_val=config.gradient_clip or None,
        logger=loggers,
        default_root_dir=str(out),
        callbacks=[*callbacks, progress_bar(), *([budget] if budget else [])],
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
    diverged: NonFiniteTraining | None = None
    try:
        with settled_heap():  # the loop's per-step objects would otherwise set off full collections
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    except SystemExit:
        # Lightning turns Ctrl-C into a graceful shutdown and then sys.exit(1)
        if not trainer.interrupted:
            raise
        interrupted = True
    except NonFiniteTraining as error:
        diverged = error
    if not trainer.is_global_zero:
        if diverged is not None:
            raise diverged
        return {}
    merge_metrics(out)
    reason, why = _stop_reason(trainer, early, interrupted, config, budget)
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
        "validations": record_last.validations,
        "best_val_loss": float(checkpoint.best_model_score) if has_best else None,
        "test_items": len(datamodule.splits["test"]),
    }
    if hparams.get("bow_weight"):  # the bag-of-words loss per token: the last epoch's mean, the last validation's
        summary.update({name: _metric(trainer, name) for name in ("train_bow_loss", "val_bow_loss")})
    if diverged is not None:
        raise _stopped_non_finite(diverged, summary, out, hparams, started)
    lines = [
        f"training stopped: {why} at step {trainer.global_step} ({record_last.validations} validations in this start)"
    ]
    if not has_best:
        lines.append(
            f"no validation ran before the stop, so there is no best checkpoint; held-out figures come from "
            f"{last.name} (validate sooner with --val-check-interval)"
        )
    if interrupted:
        for line in lines:  # the command prints no lines when interrupted
            log.info(line)
        summary["seconds"] = round(now() - started, 1)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        raise KeyboardInterrupt
    evaluated = best if has_best else last
    if not evaluated.is_file():
        summary.update(evaluated_checkpoint=None, token_accuracy=None, exact_match=None)
        summary["seconds"] = round(now() - started, 1)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return {**summary, "lines": [*lines, "no checkpoint was written: training stopped before its first step"]}
    summary["evaluated_checkpoint"] = str(evaluated)
    deadline = budget.deadline - FINISH_S if budget else None
    summary.update(greedy_reconstruction(evaluated, datamodule.dataset, eval_items, deadline))
    # the keys of earlier summaries, for the same greedy figures
    summary.update(token_accuracy=summary["greedy_token_accuracy"], exact_match=summary["greedy_exact_match"])
    summary["teacher_forced_val_token_accuracy"] = teacher_forced(out, has_best)
    summary["seconds"] = round(now() - started, 1)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines.extend(figure_lines(summary, len(eval_items), "best" if has_best else "last", evaluated))
    from quackae.curves import write_curves

    write_curves(out)  # RUN/curves.png
    return {**summary, "lines": lines}


def _stopped_non_finite(
    error: NonFiniteTraining, summary: dict[str, Any], out: Path, hparams: dict[str, Any], started: float
) -> QuackError:
    """Record a diverged training in ``RUN/summary.json``; the one-line error the command ends with."""
    kept = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    summary.update(stop_reason="non_finite", stop_detail=str(error), non_finite_step=error.step)
    summary["seconds"] = round(now() - started, 1)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    where = (
        f"the checkpoints written before it are kept ({', '.join(kept)} in {out / 'checkpoints'})"
        if kept
        else "no checkpoint was written before it"
    )
    return QuackError(
        f"{error}; training stopped there and {where}; lower --learning-rate (it is "
        f"{hparams.get('learning_rate')}) or clip gradients harder with --gradient-clip"
    )


def _metric(trainer: Any, name: str) -> float | None:
    """The latest value Lightning holds for the logged metric ``name``, or None when it was never logged."""
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _stop_reason(
    trainer: Any, early: Any, interrupted: bool, config: TrainConfig, budget: Budget | None
) -> tuple[str, str]:
    """``(reason, what happened)``: interrupted, max_time, early_stopping, max_steps, max_epochs or other."""
    if interrupted:
        return "interrupted", "interrupted (Ctrl-C); continue with --resume RUN/checkpoints/last.ckpt"
    if budget is not None and budget.stopped:
        return "max_time", f"--max-time {config.max_time} reached (stopped in time for what follows training)"
    stopping = getattr(early, "stopping_reason", None)
    if (stopping is not None and stopping.value != 0) or (stopping is None and early.stopped_epoch > 0):
        detail = getattr(early, "stopping_reason_message", None) or f"val_loss did not improve for {early.patience}"
        return "early_stopping", "early stopping: " + " ".join(str(detail).split())
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return "max_steps", f"--max-steps {trainer.max_steps} reached"
    if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs", f"--max-epochs {trainer.max_epochs} reached"
    return "other", "training ended"
