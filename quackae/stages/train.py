"""``quackae train``: fit a ``QuackAutoEncoder`` on a prepared directory.

``train`` fits a ``QuackAutoEncoder`` on a prepared directory with a Lightning ``Trainer``
(checkpoints best-by-val-loss and last, early stopping, LR monitor, CSV metrics, gradient
clipping) and ends with held-out greedy reconstruction figures on the test split. One GPU, many
GPUs and many nodes work the Lightning way through ``--accelerator/--devices/--num-nodes/--strategy``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import EarlyStopping
from tokenizers import Tokenizer

from quackae.core.atomic import remove_temporaries, write_atomic
from quackae.core.errors import QuackError
from quackae.core.files import read_bytes, regular_file
from quackae.core.joblock import JobLock
from quackae.data.tokenizer import tokenizer_hash
from quackae.model.checkpoints import AtomicCheckpointIO, BestCheckpoint, SaveLast, non_finite_weights, read_checkpoint
from quackae.model.config import decoder_trained, saved_settings
from quackae.model.guard import FiniteGuard, NonFiniteTraining
from quackae.model.trainer import progress_bar
from quackae.runs.budget import FINISH_S, Budget, now, plan_training
from quackae.runs.heldout import greedy_reconstruction, teacher_forced
from quackae.runs.lock import check_run_folder, lock_run
from quackae.runs.logs import latest_attempt, merge_metrics, new_attempt
from quackae.runs.record import RecordTrainedOn, check_resume, check_run, data_record, read_run_record, write_run_record
from quackae.runs.summary import SKIPPED_GREEDY, TrainResult, stop_reason
from quackae.stages.configs import TrainConfig

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> TrainResult | None:
    """Run ``quackae train``; returns the figures also written to ``RUN/summary.json`` (None on the ranks of a
    DDP job other than 0, which report nothing).

    A RUN continues with ``--resume RUN/checkpoints/last.ckpt`` into the same RUN: the best
    checkpoint's record, the metrics history and the step count carry on. One training at a time
    holds a RUN (its ``JobLock``; the ranks of one DDP job share it), and a RUN trains on one prepared
    dataset: ``RUN/run.json`` and every checkpoint record its tokenizer and fingerprint, and a train
    or resume on other data is refused. Checkpoints are written atomically and only while the model is
    finite: training that goes non-finite stops at once (``NonFiniteTraining``). The summary records
    why training stopped (``stop_reason``); a run that stopped before its first validation has no best
    checkpoint and says so.
    """
    started = now()  # --max-time counts from here
    out = Path(config.out)
    check_run_folder(out, config.data)
    resume = Path(config.resume) if config.resume else None
    if resume is not None:
        regular_file(resume, "--resume checkpoint", "pass RUN/checkpoints/last.ckpt of the run to continue")
    trainer_kwargs = config.trainer_kwargs(training=True)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = _datamodule(config)
    max_length = (datamodule.info.get("config") or {}).get("max_length")
    record = data_record(datamodule.dataset, datamodule.tokenizer, config.data, max_length)
    hparams = _model_settings(config, datamodule.tokenizer)
    start_step = 0
    if resume is not None:
        hparams, start_step = _resumed_settings(resume, record, config.data, hparams)
    lock = lock_run(out)
    try:
        if lock.leader:
            _claim(out, config, record, resume)
        return _fit(config, datamodule, hparams, record, resume, start_step, lock, trainer_kwargs, started)
    finally:
        lock.release()


def _datamodule(config: TrainConfig) -> Any:
    """The prepared data, split, with a train and a validation split that are not empty."""
    from quackae.data.module import TokenizedDataModule

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
    return datamodule


def _model_settings(config: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """The model's hyper-parameters: the flags', with the vocabulary and special tokens of the data's tokenizer."""
    from quackae.data.tokenizer import special_ids

    ids = special_ids(tokenizer)
    return {
        **config.model_settings(),
        "num_embeddings": tokenizer.get_vocab_size(),
        "pad_id": ids.pad,
        "eos_id": ids.eos,
        "mask_id": ids.unk,
    }


def _resumed_settings(
    resume: Path, record: dict[str, Any], data: str, hparams: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """``(hyper-parameters, step)`` of the checkpoint a run resumes from, refusing one of other data, with
    non-finite weights or another vocabulary; the checkpoint's settings win over the flags (said once)."""
    saved_checkpoint = read_checkpoint(resume)
    check_resume(resume, saved_checkpoint, record, data)
    broken = non_finite_weights(saved_checkpoint["state_dict"])
    if broken:
        raise QuackError(
            f"--resume {resume} holds non-finite weights ({', '.join(broken[:3])}); resume an earlier checkpoint"
        )
    start_step = int(saved_checkpoint.get("global_step", 0))
    saved = saved_settings(dict(saved_checkpoint["hyper_parameters"]))
    del saved_checkpoint
    if saved.get("num_embeddings") != hparams["num_embeddings"]:
        raise QuackError(
            f"--resume {resume} was trained with vocabulary {saved.get('num_embeddings')}, the data "
            f"in {data} has {hparams['num_embeddings']}"
        )
    changed = {k: (saved.get(k), v) for k, v in hparams.items() if saved.get(k) != v}
    if changed:
        log.warning("resuming with the checkpoint's model settings, not the flags: %s", changed)
    return saved, start_step


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


@dataclass
class _Watchers:
    """The callbacks whose state the summary reads after the fit."""

    best: BestCheckpoint
    early: EarlyStopping
    last: SaveLast
    budget: Budget | None


def _fit(
    config: TrainConfig,
    datamodule: Any,
    hparams: dict[str, Any],
    record: dict[str, Any],
    resume: Path | None,
    start_step: int,
    lock: JobLock,
    trainer_kwargs: dict[str, Any],
    started: float,
) -> TrainResult | None:
    """Train into a locked RUN, then evaluate and write the summary."""
    from quackae.model.autoencoder import QuackAutoEncoder

    out = Path(config.out)
    interval, budget, eval_items = plan_training(config, datamodule, hparams, trainer_kwargs, start_step, started)
    attempt = new_attempt(out, start_step, resume) if lock.leader else latest_attempt(out)
    trainer, watchers = _trainer(config, interval, budget, attempt, record, trainer_kwargs)
    if trainer.is_global_zero:
        resolved = _resolved_config(config, hparams, trainer_kwargs, interval, trainer.world_size, datamodule)
        write_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    interrupted = False
    diverged: NonFiniteTraining | None = None
    try:
        trainer.fit(
            QuackAutoEncoder(**hparams),
            datamodule=datamodule,
            ckpt_path=str(resume) if resume else None,
            weights_only=True,
        )
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
        return None
    merge_metrics(out)
    result = _stopped(config, trainer, watchers, interrupted, hparams, len(datamodule.splits["test"]))
    if diverged is not None:
        raise _stopped_non_finite(diverged, result, out, hparams, started)
    if interrupted:
        for line in result.stop_lines():  # the command prints no lines when interrupted
            log.info(line)
        _write_summary(out, replace(result, seconds=round(now() - started, 1)))
        raise KeyboardInterrupt
    if result.evaluated_checkpoint is not None:
        deadline = budget.deadline - FINISH_S if budget else None
        result = _held_out(result, hparams, datamodule.dataset, eval_items, deadline)
    result = replace(result, seconds=round(now() - started, 1))
    _write_summary(out, result)
    if result.evaluated_checkpoint is not None:
        from quackae.viz.curves import write_curves

        write_curves(out)  # RUN/curves.png
    return result


def _trainer(
    config: TrainConfig,
    interval: float,
    budget: Budget | None,
    attempt: Path,
    record: dict[str, Any],
    trainer_kwargs: dict[str, Any],
) -> tuple[pl.Trainer, _Watchers]:
    """The Trainer with its checkpoints (best by val_loss, last), early stopping, finite guard and loggers."""
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    out = Path(config.out)
    checkpoints = out / "checkpoints"
    watchers = _Watchers(
        best=BestCheckpoint(
            dirpath=checkpoints,
            filename="best",
            monitor="val_loss",
            mode="min",
            save_top_k=1,
            save_last=False,
            save_on_train_epoch_end=False,  # only after a validation, which is what it watches
            enable_version_counter=False,
        ),
        early=EarlyStopping(monitor="val_loss", mode="min", patience=config.patience, strict=False),
        last=SaveLast(checkpoints / "last.ckpt"),
        budget=budget,
    )
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
    callbacks = [guard, RecordTrainedOn(record), watchers.best, watchers.last, watchers.early]
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        val_check_interval=interval,
        check_val_every_n_epoch=every_epoch,
        gradient_clip_val=config.gradient_clip or None,
        logger=loggers,
        default_root_dir=str(out),
        callbacks=[*callbacks, LearningRateMonitor("step"), progress_bar(), *([budget] if budget else [])],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=config.log_every_n_steps,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    return trainer, watchers


def _resolved_config(
    config: TrainConfig,
    hparams: dict[str, Any],
    trainer_kwargs: dict[str, Any],
    interval: float,
    world_size: int,
    datamodule: Any,
) -> dict[str, Any]:
    """What ``RUN/config.yaml`` records: the flags, the model, the Trainer's settings and the data's splits."""
    return {
        "train": asdict(config),
        "model": dict(hparams),
        "trainer": {
            **trainer_kwargs,
            "max_epochs": config.max_epochs,
            "max_steps": config.max_steps,
            "max_time": config.max_time,
            "val_check_interval": interval,
            "gradient_clip_val": config.gradient_clip,
            "world_size": world_size,
        },
        "data": {"path": config.data, "items": {k: len(v) for k, v in datamodule.splits.items()}},
    }


def _stopped(
    config: TrainConfig,
    trainer: Any,
    watchers: _Watchers,
    interrupted: bool,
    hparams: dict[str, Any],
    test_items: int,
) -> TrainResult:
    """The figures of the fit that just ended: why it stopped, its checkpoints and losses."""
    reason, why = stop_reason(trainer, watchers.early, interrupted, config, watchers.budget)
    checkpoints = Path(config.out) / "checkpoints"
    best, last = checkpoints / "best.ckpt", checkpoints / "last.ckpt"
    has_best = best.is_file() and watchers.best.best_model_score is not None
    evaluated = best if has_best else last
    bow = bool(hparams.get("bow_weight"))
    return TrainResult(
        run=str(config.out),
        stop_reason=reason,
        stop_detail=why,
        global_step=trainer.global_step,
        epochs=trainer.current_epoch,
        validations=watchers.last.validations,
        test_items=test_items,
        best_checkpoint=str(best) if has_best else None,
        last_checkpoint=str(last) if last.is_file() else None,
        best_val_loss=float(watchers.best.best_model_score) if has_best else None,
        train_bow_loss=_metric(trainer, "train_bow_loss") if bow else None,
        val_bow_loss=_metric(trainer, "val_bow_loss") if bow else None,
        evaluated_checkpoint=str(evaluated) if evaluated.is_file() else None,
    )


def _held_out(
    result: TrainResult, hparams: dict[str, Any], dataset: Any, eval_items: Any, deadline: float | None
) -> TrainResult:
    """The held-out greedy figures of the evaluated checkpoint, or why there are none (an untrained decoder
    rebuilds nothing: its figures would only measure noise)."""
    if not decoder_trained(hparams):
        return replace(result, greedy_skipped=SKIPPED_GREEDY)
    scored = greedy_reconstruction(Path(str(result.evaluated_checkpoint)), dataset, eval_items, deadline)
    teacher = teacher_forced(Path(result.run), result.best_checkpoint is not None)
    return replace(result, greedy_sampled=len(eval_items), teacher_forced_val_token_accuracy=teacher, **scored)


def _write_summary(out: Path, result: TrainResult) -> None:
    write_atomic(out / "summary.json", json.dumps(result.figures(), indent=2) + "\n")


def _stopped_non_finite(
    error: NonFiniteTraining, result: TrainResult, out: Path, hparams: dict[str, Any], started: float
) -> QuackError:
    """Record a diverged training in ``RUN/summary.json``; the one-line error the command ends with."""
    kept = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    result = replace(result, stop_reason="non_finite", stop_detail=str(error), non_finite_step=error.step)
    _write_summary(out, replace(result, seconds=round(now() - started, 1)))
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
