"""``quackae train``: fit a ``QuackAutoEncoder`` on a prepared directory.

``train`` fits a ``QuackAutoEncoder`` on a prepared directory with a Lightning ``Trainer``
(checkpoints best-by-val-loss and last, early stopping, LR monitor, CSV metrics, gradient
clipping) and ends with held-out greedy reconstruction figures on the test split. One GPU, many
GPUs and many nodes work the Lightning way through ``--accelerator/--devices/--num-nodes/--strategy``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
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
from quackae.runs.heldout import figure_lines, greedy_reconstruction, teacher_forced
from quackae.runs.lock import check_run_folder, lock_run
from quackae.runs.logs import latest_attempt, merge_metrics, new_attempt
from quackae.runs.record import RecordTrainedOn, check_resume, check_run, data_record, read_run_record, write_run_record
from quackae.stages.configs import TrainConfig

log = logging.getLogger(__name__)

# Why a RUN trained without reconstruction has no held-out greedy figures (summary.json and the printed line).
SKIPPED_GREEDY = (
    "no reconstruction trained (--reconstruction-weight 0), so the decoder is untrained; "
    "--reconstruction-weight 1 --bow-weight 0 trains the reconstruction autoencoder"
)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``quackae train``; returns the figures also written to ``RUN/summary.json``.

    A RUN continues with ``--resume RUN/checkpoints/last.ckpt`` into the same RUN: the best
    checkpoint's record, the metrics history and the step count carry on. One training at a time
    holds a RUN (its ``JobLock``; the ranks of one DDP job share it), and a RUN trains on one prepared
    dataset: ``RUN/run.json`` and every checkpoint record its tokenizer and fingerprint, and a train
    or resume on other data is refused. Checkpoints are written atomically and only while the model is
    finite: training that goes non-finite stops at once (``NonFiniteTraining``). The summary records
    why training stopped (``stop_reason``); a run that stopped before its first validation has no best
    checkpoint and says so.
    """
    from quackae.data.module import TokenizedDataModule
    from quackae.data.tokenizer import special_ids

    started = now()  # --max-time counts from here
    out = Path(config.out)
    check_run_folder(out, config.data)
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
    max_length = (datamodule.info.get("config") or {}).get("max_length")
    record = data_record(datamodule.dataset, tokenizer, config.data, max_length)
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
        saved = saved_settings(dict(saved_checkpoint["hyper_parameters"]))
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
    lock = lock_run(out)
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
    lock: JobLock,
    trainer_kwargs: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Train into a locked RUN, then evaluate and write the summary."""
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    from quackae.model.autoencoder import QuackAutoEncoder

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
    if decoder_trained(hparams):
        summary.update(greedy_reconstruction(evaluated, datamodule.dataset, eval_items, deadline))
        summary["teacher_forced_val_token_accuracy"] = teacher_forced(out, has_best)
    else:  # an untrained decoder rebuilds nothing: its figures would only measure noise
        summary.update(greedy_items=0, greedy_token_accuracy=None, greedy_exact_match=None)
        summary.update(teacher_forced_val_token_accuracy=None, greedy_skipped=SKIPPED_GREEDY)
    # the keys of earlier summaries, for the same greedy figures
    summary.update(token_accuracy=summary["greedy_token_accuracy"], exact_match=summary["greedy_exact_match"])
    summary["seconds"] = round(now() - started, 1)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if decoder_trained(hparams):
        lines.extend(figure_lines(summary, len(eval_items), "best" if has_best else "last", evaluated))
    else:
        lines.append(f"held-out greedy reconstruction skipped: {SKIPPED_GREEDY}")
    from quackae.viz.curves import write_curves

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
