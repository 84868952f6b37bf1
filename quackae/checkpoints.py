"""Checkpoints written whole and read safely.

Writing: ``AtomicCheckpointIO`` (every Lightning checkpoint through a temporary name, fsync and
rename), ``SaveLast`` (``last.ckpt`` after each validation and at the end of fitting) and
``BestCheckpoint`` (a ``ModelCheckpoint`` whose record of the best survives a resume). Reading:
``read_checkpoint`` and ``load_model`` go through ``torch.load(weights_only=True)``, so loading a
checkpoint never runs code, and check a checkpoint against its own hyper-parameters first.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from quackae.atomic import atomic_file
from quackae.errors import QuackError, unpickling_reason
from quackae.model import QuackAutoEncoder
from quackae.modelconfig import MODEL_FIELDS
from quackae.runtime import resolve_run

log = logging.getLogger(__name__)


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
        try:
            with atomic_file(target, "wb") as handle:
                torch.save(checkpoint, handle)
        except OSError as error:
            raise QuackError(
                f"writing checkpoint {target} failed ({error.strerror or error}); the previous {target.name} is kept"
            ) from error


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A quackae checkpoint's contents through ``torch.load(weights_only=True)``: loading never runs code.

    Raises ``QuackError`` (a ``ValueError``) naming the file when it is missing, empty, refused by the
    safe unpickler or not a quackae checkpoint.
    """
    file = Path(path)
    if not file.is_file():
        raise QuackError(f"checkpoint {file} does not exist; pass a RUN directory or a .ckpt file")
    if file.stat().st_size == 0:
        raise QuackError(f"checkpoint {file} is empty (0 bytes); train again or pass another checkpoint")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a safe checkpoint"
        raise QuackError(f"checkpoint {file} cannot be loaded safely: {unpickling_reason(error)}") from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not isinstance(checkpoint.get("hyper_parameters"), dict)
    ):
        raise QuackError(f"{file} is not a quackae model checkpoint (no state_dict / hyper_parameters)")
    return checkpoint


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> QuackAutoEncoder:
    """A ``QuackAutoEncoder`` in eval mode from a RUN directory (its best checkpoint, else its last) or a
    Lightning checkpoint file (see ``read_checkpoint``).

    The hyper-parameters and the state_dict are checked against each other on the meta device (no
    memory is allocated) before the model is built, so a damaged or foreign checkpoint is a
    ``QuackError`` naming the file and the problem, never an allocation of its claimed size.
    """
    if Path(path).is_dir():
        path, _ = resolve_run(path)
    checkpoint = read_checkpoint(path, map_location)
    hparams = dict(checkpoint["hyper_parameters"])
    state = checkpoint["state_dict"]
    unknown = sorted(set(hparams) - MODEL_FIELDS)
    if unknown:
        raise QuackError(
            f"checkpoint {path} has hyper-parameters this quackae does not know ({', '.join(map(str, unknown))}); "
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
    return model
