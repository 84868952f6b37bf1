"""How long training takes, and keeping ``quackae train`` to its ``--max-time``.

``seconds_per_step`` times a few training steps of the model a run will train, at its batch size and
precision, on random batches (``quackae train`` and ``quackae run`` print the estimate made from it).
``validation_interval`` is the default validation schedule. ``Budget`` stops training early enough that
the validation at the stop, the held-out evaluation and the last writes end by the command's deadline.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

# Training time / (steps x one timed step): validation, logging and data loading on top of the steps, less
# what the timed step overstates (its batches are as wide as a third to a half of max_length, wider than
# most length-bucketed batches). Measured on the demo, 4,000 steps on the idle 2-core VM: 314.9 s and 319.5 s
# of train stage (two fresh clones), while the few steps timed before it took 60-85 ms each from one run to
# the next (x0.93-x1.31). An earlier x2.1 came from one run on a shared, busy machine and put the demo's
# estimate at twice its time.
OVERHEAD = 1.1
# An epoch estimated to take longer than this is validated every this many seconds of steps instead.
VALIDATE_EVERY_S = 300.0
# Per token, a validation batch (forward only) and greedy decoding against a training step (forward, backward,
# AdamW). Measured on 30,375 docstrings at default sizes, bf16-mixed, load 7-14 on 2 cores: 1.5 s a training
# step of 64 items, 0.48 s a validation batch (0.33); greedy decoding of 1,000 items in blocks of 512 sorted by
# length 39 s with training at 2.2 s a step (1.1); rounded up.
FORWARD_SHARE, GREEDY_SHARE = 0.5, 1.2
# Seconds kept for what follows the held-out evaluation and the stop's checkpoints (summary.json, curves.png).
FINISH_S = 3.0


def now() -> float:
    """The clock the budget and the held-out evaluation read (``time.monotonic``)."""
    return time.monotonic()


def seconds_per_step(
    model_kwargs: dict[str, Any], batch_size: int, min_len: int, max_len: int, bf16: bool = False, device: Any = None
) -> float:
    """Seconds one training step takes now: two warm-up and four timed steps of ``QuackAutoEncoder(**model_kwargs)``
    on random batches of ``batch_size`` items of ``min_len`` to ``max_len`` tokens, under bf16 autocast when ``bf16``
    (as Lightning's bf16-mixed runs it). The caller's torch random state is left as it was."""
    import torch

    from quackae.bench.train import random_batches, time_training
    from quackae.model import QuackAutoEncoder

    pad_id = int(model_kwargs.get("pad_id", 0))
    generator = torch.Generator().manual_seed(0)
    vocab = int(model_kwargs["num_embeddings"])
    batches = random_batches(6, batch_size, vocab, max(min_len, 1), max(max_len, min_len, 1), generator, pad_id)
    state = torch.random.get_rng_state()
    try:
        model = QuackAutoEncoder(**model_kwargs)
        tokens_per_s = time_training(model, batches, warmup=2, device=device or torch.device("cpu"), bf16=bf16)
    finally:
        torch.random.set_rng_state(state)
    tokens = sum(int(b.ne(pad_id).sum()) for b in batches[2:]) / len(batches[2:])
    return tokens / tokens_per_s


def validation_interval(steps_per_epoch: int, step_s: float, val_batches: int) -> int | None:
    """The default validation schedule: ``None`` (after every epoch) when an epoch takes at most
    ``VALIDATE_EVERY_S`` by the timed step, else every N steps, N the steps of ``VALIDATE_EVERY_S`` but at least
    twice the validation batches (a validation batch costs about a third of a step, so validating stays under
    about a sixth of the training)."""
    every = max(math.ceil(VALIDATE_EVERY_S / (step_s * OVERHEAD)), 2 * val_batches, 1)
    return every if every < steps_per_epoch else None


class Budget(Callback):
    """Stops training once ``now() + reserve >= deadline``, the reserve being one validation round (the one Lightning
    runs at the stop), the held-out evaluation and ``FINISH_S``. Rank 0 decides for every rank.

    Both are priced per token (``validation_tokens``, ``evaluation_tokens``) at the training's own seconds per token
    (padded), ``FORWARD_SHARE`` and ``GREEDY_SHARE`` of it: at first the timed step's ``token_s``, then what the
    training steps so far took; once a validation round has run, its measured time is the round's price.
    """

    def __init__(self, deadline: float, validation_tokens: float, evaluation_tokens: float, token_s: float) -> None:
        self.deadline = deadline
        self.validation_tokens, self.evaluation_tokens, self.token_s = validation_tokens, evaluation_tokens, token_s
        self.validation_s: float | None = None  # the last validation round's measured seconds
        self.stopped = False  # whether the budget stopped the training
        self._round_started: float | None = None
        self._step_started: float | None = None
        self._trained = [0.0, 0]  # seconds in training steps, padded tokens they took

    def reserve(self) -> float:
        seconds, tokens = self._trained
        token_s = seconds / tokens if tokens else self.token_s
        validation = self.validation_s
        if validation is None:
            validation = self.validation_tokens * token_s * FORWARD_SHARE
        return validation + self.evaluation_tokens * token_s * GREEDY_SHARE + FINISH_S

    def _check(self, trainer: Any) -> None:
        late = bool(trainer.strategy.broadcast(now() + self.reserve() >= self.deadline))
        if late and not trainer.should_stop:
            self.stopped = True
            trainer.should_stop = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._check(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_started = now()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started is not None and hasattr(batch, "numel"):  # (B, T): its shape, no device sync
            self._trained[0] += now() - self._step_started
            self._trained[1] += batch.numel()
        self._check(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._round_started = None if trainer.sanity_checking else now()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._round_started is not None:
            self.validation_s = now() - self._round_started
            self._round_started = None
        self._check(trainer)


def step_text(step_s: float, precision: str) -> str:
    """How a timed step is reported beside an estimate."""
    return f"{step_s * 1000:,.0f} ms a step measured now, {precision}"


def plan_training(
    config: Any, datamodule: Any, hparams: dict[str, Any], trainer_kwargs: dict[str, Any], start: int, t0: float
) -> tuple[float, Budget | None, Any]:
    """``(validation interval, --max-time budget, held-out sample)``; logs the time estimate from a step timed now
    (one process on a CPU or a GPU at 32-true or bf16-mixed: the precision the run trains at)."""
    from quackae.heldout import sample

    lengths, splits, batch = datamodule.lengths, datamodule.splits, config.batch_size
    eval_items = sample(splits["test"], config.eval_items, config.seed)
    steps_per_epoch, val_batches = math.ceil(len(splits["train"]) / batch), math.ceil(len(splits["val"]) / batch)
    device, precision = timing_device(trainer_kwargs), str(trainer_kwargs["precision"])
    mean = float(lengths[splits["train"]].mean())
    step_s = 0.0
    if device is not None and precision in ("32-true", "32", "bf16-mixed"):
        width = max(round(mean), 1)  # a length-bucketed batch is about as wide as its items
        step_s = seconds_per_step(hparams, batch, width, width, bf16=precision == "bf16-mixed", device=device)
    interval = config.val_check_interval
    if interval is None:
        every = validation_interval(steps_per_epoch, step_s, val_batches) if step_s else None
        interval = every or 1.0
        if every:
            log.info(
                "validating every %d steps: an epoch of %d steps takes about %.1f min by the step timed now "
                "(--val-check-interval sets it)",
                every,
                steps_per_epoch,
                steps_per_epoch * step_s * OVERHEAD / 60,
            )
    budget = None
    if config.max_time:
        days, hours, minutes, seconds = (int(part) for part in config.max_time.strip().split(":"))
        deadline = t0 + ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        tokens = float(lengths[splits["val"]].sum()), float(lengths[eval_items].sum())
        budget = Budget(deadline, *tokens, token_s=step_s / (batch * max(round(mean), 1)))
    if not step_s:
        return interval, budget, eval_items
    steps = config.max_steps - start if config.max_steps > 0 else config.max_epochs * steps_per_epoch - start
    timed = f"{steps_per_epoch:,} steps an epoch; {step_text(step_s, precision)}"
    text = f"no step or epoch limit ({timed})"
    if config.max_steps > 0 or config.max_epochs > 0:
        minutes = steps * step_s * OVERHEAD / 60
        text = f"estimated training time on this machine: about {minutes:.1f} min for {steps:,} steps ({timed})"
    if budget is not None:
        text += (
            f"; --max-time {config.max_time} leaves about {max(budget.deadline - budget.reserve() - now(), 0) / 60:.1f}"
            f" min of training and keeps {budget.reserve():.0f} s for the validation at the stop and the greedy "
            f"reconstruction of {len(eval_items):,} held-out items"
        )
    log.info(text)
    return interval, budget, eval_items


def timing_device(trainer_kwargs: dict[str, Any]) -> Any:
    """The device a run of one process trains on (CPU or CUDA), else None (several processes, MPS, TPU ...)."""
    import torch

    accelerator, devices = str(trainer_kwargs["accelerator"]).lower(), trainer_kwargs["devices"]
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if accelerator not in ("auto", "cpu", "gpu", "cuda") or (
        accelerator != "cpu" and not gpu and accelerator != "auto"
    ):
        return None
    available = torch.cuda.device_count() if gpu else 1
    if devices in ("auto", -1):
        count = available
    else:
        count = devices if isinstance(devices, int) else len(re.findall(r"\d+", str(devices)))
    if count != 1 or trainer_kwargs["num_nodes"] != 1:
        return None
    return torch.device("cuda") if gpu else torch.device("cpu")
