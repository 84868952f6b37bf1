"""Checkpoints written whole and read safely.

Writing: ``AtomicCheckpointIO`` (every Lightning checkpoint through a temporary name, fsync and
rename), ``SaveLast`` (``last.ckpt`` after each validation and at the end of fitting) and
``BestCheckpoint`` (a ``ModelCheckpoint`` whose record of the best survives a resume). Reading:
``load_torch_file`` opens a regular file without blocking and goes through
``torch.load(weights_only=True)``, so loading a checkpoint never runs code; ``read_checkpoint`` and
``load_model`` check a checkpoint against its own hyper-parameters, refuse non-finite weights and, given
the tokenizer's hash, a tokenizer other than the one the checkpoint records it was trained with
(``TRAINED_ON``, which ``quackae train`` writes into every checkpoint).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from quackae.core.atomic import atomic_file
from quackae.core.errors import QuackError, unpickling_reason
from quackae.core.files import regular_file
from quackae.model.autoencoder import QuackAutoEncoder
from quackae.model.config import saved_settings, unknown_fields

log = logging.getLogger(__name__)

# The key of a quackae checkpoint that records what it was trained on: ``{"tokenizer_sha256": ...,
# "dataset_fingerprint": ..., "data": ...}`` (see ``quackae.runs.record``).
TRAINED_ON = "quackae_trained_on"


class SaveLast(Checkpoint):
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


class BestCheckpoint(ModelCheckpoint):
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
        saved = load_torch_file(path)
    except QuackError as error:  # an unreadable best.ckpt keeps the resumed record
        log.warning("%s; keeping the record of the resumed checkpoint", error)
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
        try:
            with atomic_file(target, "wb") as handle:
                torch.save(checkpoint, handle)
        except (OSError, RuntimeError) as error:  # torch's zip writer reports a short write as a RuntimeError
            raise QuackError(
                f"writing checkpoint {target} failed ({_write_failure(error, target)}); the previous {target.name} "
                "is kept"
            ) from error


def _write_failure(error: BaseException, target: Path) -> str:
    """Why a write to ``target`` failed, in a few words: the OS's reason, or torch's with the free space."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        return reason
    return f"{reason}; {free:,} bytes free on its file system" if free < 64 << 20 else reason


def load_torch_file(path: str | Path, what: str = "checkpoint", fix: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a regular file: loading never runs code.

    The file is opened without blocking (a FIFO never hangs) and must be a non-empty zip archive, the only
    format ``torch.save`` writes, so a raw pickle never reaches an unpickler. Every failure is one
    ``QuackError`` naming the file: missing, not a regular file, empty, cut short or not a checkpoint,
    damaged, or holding objects other than tensors and plain values.
    """
    file = Path(path)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        regular_file(file, what, fix)  # missing, a symbolic-link loop ...: says which
        raise QuackError(f"{what} {file} cannot be read ({error.strerror or error})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        regular_file(file, what, fix)  # a FIFO, a directory ...: says which
        raise QuackError(f"{what} {file} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size == 0:
            raise QuackError(f"{what} {file} is empty (0 bytes); {fix or 'train again or pass another checkpoint'}")
        os.set_blocking(fd, True)
        try:
            is_zip = zipfile.is_zipfile(handle)
            handle.seek(0)
        except OSError as error:
            raise QuackError(f"{what} {file} cannot be read ({error.strerror or error})") from None
        if not is_zip:
            raise QuackError(
                f"{what} {file} is not a torch checkpoint (it is cut short, a raw pickle or another kind of file; "
                "quackae never unpickles such a file)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the refusal below says it all
            try:
                return torch.load(handle, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as error:
                raise QuackError(f"{what} {file} cannot be loaded safely: {unpickling_reason(error)}") from None
            except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged archive
                lines = str(error).strip().splitlines()
                reason = lines[0] if lines else type(error).__name__
                raise QuackError(f"{what} {file} is damaged ({reason}); {fix or 'train again'}") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A quackae checkpoint's contents through ``load_torch_file``: loading never runs code.

    Raises ``QuackError`` (a ``ValueError``) naming the file when it is missing, empty, refused by the
    safe unpickler or not a quackae checkpoint.
    """
    file = Path(path)
    if not os.path.lexists(file):
        raise QuackError(f"checkpoint {file} does not exist; pass a RUN directory or a .ckpt file")
    checkpoint = load_torch_file(file, map_location=map_location)
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not isinstance(checkpoint.get("hyper_parameters"), dict)
    ):
        raise QuackError(f"{file} is not a quackae model checkpoint (no state_dict / hyper_parameters)")
    return checkpoint


def trained_on(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """What a checkpoint records it was trained on (``TRAINED_ON``), None for one written before quackae kept it."""
    record = checkpoint.get(TRAINED_ON)
    return record if isinstance(record, dict) else None


def non_finite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return [
        name
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", tokenizer_sha256: str | None = None
) -> QuackAutoEncoder:
    """A ``QuackAutoEncoder`` in eval mode from a RUN directory (its best checkpoint, else its last) or a
    Lightning checkpoint file (see ``read_checkpoint``).

    The hyper-parameters and the state_dict are checked against each other on the meta device (no
    memory is allocated) before the model is built, so a damaged or foreign checkpoint is a
    ``QuackError`` naming the file and the problem, never an allocation of its claimed size. Weights
    holding a NaN or an infinity (a diverged training) are refused. With ``tokenizer_sha256`` (the
    ``tokenizer_hash`` of the tokenizer about to be used with it), a checkpoint that records another
    tokenizer is refused: the two do not belong together.
    """
    return load_model_and_record(path, map_location, tokenizer_sha256)[0]


def load_model_and_record(
    path: str | Path, map_location: str | torch.device = "cpu", tokenizer_sha256: str | None = None
) -> tuple[QuackAutoEncoder, dict[str, Any] | None]:
    """``load_model``, and what the checkpoint records it was trained on (``trained_on``), from one read."""
    if Path(path).is_dir():
        path, _ = resolve_run(path)
    checkpoint = read_checkpoint(path, map_location)
    record = trained_on(checkpoint)
    if tokenizer_sha256 is not None and record is not None and record.get("tokenizer_sha256") != tokenizer_sha256:
        raise QuackError(
            f"checkpoint {path} was trained with another tokenizer (sha256 {str(record.get('tokenizer_sha256'))[:12]}) "
            f"than the one it is used with (sha256 {tokenizer_sha256[:12]}); use the tokenizer.json of the RUN that "
            "trained it"
        )
    hparams = saved_settings(dict(checkpoint["hyper_parameters"]))
    state = checkpoint["state_dict"]
    unknown = unknown_fields(hparams)
    if unknown:
        raise QuackError(
            f"checkpoint {path} has hyper-parameters this quackae does not know ({', '.join(unknown)}); "
            "it comes from another version or another model"
        )
    try:
        with torch.device("meta"):
            skeleton = QuackAutoEncoder(**hparams)
    except (TypeError, ValueError) as error:
        raise QuackError(f"checkpoint {path} has unusable hyper-parameters: {error}") from None
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing weights {', '.join(missing[:5])}")
    if extra:
        problems.append(f"unexpected weights {', '.join(map(str, extra[:5]))}")
    for name in sorted(set(expected) & set(state)):
        shape = tuple(getattr(state[name], "shape", ()))
        if not isinstance(state[name], torch.Tensor) or shape != expected[name]:
            problems.append(f"{name} has shape {shape}, its hyper-parameters need {expected[name]}")
    if problems:
        raise QuackError(f"checkpoint {path} does not match its own hyper-parameters: {'; '.join(problems[:5])}")
    broken = non_finite_weights(state)
    if broken:
        raise QuackError(
            f"checkpoint {path} holds non-finite weights ({', '.join(broken[:3])}): its training diverged; "
            "use an earlier checkpoint or train again with a lower --learning-rate"
        )
    model: QuackAutoEncoder | None = None
    if all(not torch.is_floating_point(state[n]) or state[n].dtype == torch.float32 for n in expected):
        # the skeleton takes the loaded tensors themselves: no random initialisation to overwrite
        skeleton.load_state_dict(state, assign=True)
        if not any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
            model = skeleton
    if model is None:  # weights of another dtype are cast into a freshly built float32 model
        model = QuackAutoEncoder(**hparams)
        model.load_state_dict(state)
    model.eval()
    return model, record


def resolve_run(model: str | Path) -> tuple[Path, Path]:
    """``(checkpoint, tokenizer.json)`` of a RUN directory (best, else last) or a ``.ckpt`` file.

    Both must be regular files (a FIFO, a directory or a link loop in their place is a ``QuackError``
    naming it); a checkpoint's RUN is the folder above its ``checkpoints/`` folder.
    """
    import os

    from quackae.core.files import regular_file

    path = Path(model)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if os.path.lexists(path / "checkpoints" / name):
                checkpoint = regular_file(path / "checkpoints" / name, "checkpoint", "train the run again")
                break
        else:
            raise QuackError(f"{path} holds no checkpoints/best.ckpt or last.ckpt; pass a RUN from quackae train")
        run = path
    elif os.path.lexists(path):
        checkpoint = regular_file(path, "model", "pass a RUN directory or a .ckpt file")
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise QuackError(f"model {path} does not exist; pass a RUN directory or a .ckpt file")
    tokenizer = run / "tokenizer.json"
    if not os.path.lexists(tokenizer):
        raise QuackError(f"no tokenizer.json beside the model ({tokenizer}); quackae train copies it into the RUN")
    return checkpoint, regular_file(tokenizer, "tokenizer file", "quackae train copies it into the RUN")


def write_run(model: QuackAutoEncoder, tokenizer: Any, run: str | Path) -> Path:
    """Save ``model`` (weights and hyper-parameters) and its ``tokenizer`` as a new RUN folder, as train lays one
    out (``checkpoints/last.ckpt``, ``tokenizer.json``): for models made outside ``quackae train`` (benchmarks,
    tests). Returns the RUN."""
    import pytorch_lightning as pl

    run = Path(run)
    (run / "checkpoints").mkdir(parents=True)
    tokenizer.save(str(run / "tokenizer.json"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(run / "checkpoints" / "last.ckpt"), weights_only=True)
    return run
