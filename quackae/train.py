"""``quackae train`` and ``quackae reconstruct``.

``train`` fits a ``QuackAutoEncoder`` on a prepared directory with a Lightning ``Trainer``
(checkpoints best-by-val-loss and last, early stopping, LR monitor, CSV metrics, gradient
clipping) and ends with held-out greedy reconstruction figures on the test split. One GPU, many
GPUs and many nodes work the Lightning way through ``--accelerator/--devices/--num-nodes/--strategy``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.callbacks import Callback

from quackae.errors import QuackError

log = logging.getLogger(__name__)

POOLINGS = ("final", "mean", "final+mean")  # QuackAutoEncoder's poolings (model.py imports torch lazily here)


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
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must not be negative, got {self.num_workers}")
        if self.num_nodes < 1:
            raise ValueError(f"--num-nodes must be at least 1, got {self.num_nodes}")

    def trainer_kwargs(self) -> dict[str, Any]:
        devices: Any = self.devices
        if isinstance(devices, str) and devices.isdigit():
            devices = int(devices)
        return {
            "accelerator": self.accelerator,
            "devices": devices,
            "num_nodes": self.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision or default_precision(self.accelerator),
        }


def default_precision(accelerator: str) -> str:
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


@dataclass(frozen=True)
class TrainConfig(TrainerFlags):
    data: str = field(
        default="storage/prepared",
        metadata={"positional": True, "path": True, "help": "prepared directory (quackae prepare --out)"},
    )
    out: str = field(default="storage/run", metadata={"path": True, "help": "run directory to write"})
    max_epochs: int = field(default=20, metadata={"help": "maximum epochs (-1: no limit)"})
    max_steps: int = field(default=-1, metadata={"help": "maximum optimizer steps (-1: no limit)"})
    max_time: str | None = field(default=None, metadata={"help": "wall-clock limit DD:HH:MM:SS"})
    embed_size: int = field(default=128, metadata={"help": "token embedding size"})
    hidden_size: int = field(default=256, metadata={"help": "encoding size H (even)"})
    layers: int = field(default=1, metadata={"help": "GRU layers in encoder and decoder"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    lr_min: float = field(default=1e-5, metadata={"help": "cosine-annealing floor"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on embeddings and the token predictor's input"})
    teacher_forcing: float = field(default=1.0, metadata={"help": "share of batches decoded with teacher forcing"})
    denoise: float = field(default=0.0, metadata={"help": "probability of corrupting each encoder input token"})
    denoise_mode: str = field(
        default="delete", metadata={"help": "delete or mask ([UNK]) corrupted tokens", "choices": ("delete", "mask")}
    )
    pooling: str = field(
        default="final+mean",
        metadata={
            "help": "stored encoding: final states (H), mean of encoder states (H), or both (2H)",
            "choices": POOLINGS,
        },
    )
    word_dropout: float = field(default=0.3, metadata={"help": "share of decoder input tokens replaced by [UNK]"})
    attention_dropout: float = field(
        default=0.0, metadata={"help": "share of decoder steps whose attention context is zeroed in training"}
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
        if not 0 <= self.word_dropout < 1 or not 0 <= self.attention_dropout <= 1:
            raise ValueError("--word-dropout must be in [0, 1) and --attention-dropout in [0, 1]")
        if self.val_fraction <= 0:
            raise ValueError("--val-fraction must be positive: checkpoints and early stopping watch val_loss")
        if self.patience < 1 or self.gradient_clip < 0:
            raise ValueError("--patience must be at least 1 and --gradient-clip not negative")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``quackae train``; returns the figures also written to ``RUN/summary.json``."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from quackae.data import TokenizedDataModule
    from quackae.model import QuackAutoEncoder, read_checkpoint
    from quackae.tokenizer import special_ids

    started = time.time()
    out = Path(config.out)
    resume = Path(config.resume) if config.resume else None
    if resume is not None and not resume.is_file():
        raise QuackError(f"--resume checkpoint {resume} does not exist")
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.ckpt")) and resume is None:
        raise QuackError(
            f"{out} already holds checkpoints; choose another --out or continue with --resume "
            f"{out / 'checkpoints' / 'last.ckpt'}"
        )
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
        "pooling": config.pooling,
        "word_dropout": config.word_dropout,
        "attention_dropout": config.attention_dropout,
    }
    if resume is not None:
        saved = dict(read_checkpoint(resume)["hyper_parameters"])
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
    trainer_kwargs = config.trainer_kwargs()
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor="val_loss", mode="min", save_top_k=1, save_last=False
    )
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="", version="")]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    except ImportError:
        log.debug("tensorboard not installed (pip install tensorboard): CSV metrics only")
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        max_time=config.max_time,
        gradient_clip_val=config.gradient_clip or None,
        logger=loggers,
        default_root_dir=str(out),
        callbacks=[
            checkpoint,
            _SaveLast(out / "checkpoints" / "last.ckpt"),
            EarlyStopping(monitor="val_loss", mode="min", patience=config.patience, strict=False),
            LearningRateMonitor(logging_interval="step"),
        ],
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
            "gradient_clip_val": config.gradient_clip,
            "world_size": trainer.world_size,
        },
        "data": {"path": config.data, "items": {k: len(v) for k, v in datamodule.splits.items()}},
    }
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    if not trainer.is_global_zero:
        return {}
    _flatten_metrics(out)
    best = out / "checkpoints" / "best.ckpt"
    if not best.is_file():
        # a resumed run whose validation never beat the checkpoint's: its best is the one it started from
        source = Path(checkpoint.best_model_path) if checkpoint.best_model_path else out / "checkpoints" / "last.ckpt"
        shutil.copyfile(source, best)
    figures = evaluate_reconstruction(best, datamodule, datamodule.splits["test"])
    summary = {
        "run": str(out),
        "best_checkpoint": str(best),
        "last_checkpoint": str(out / "checkpoints" / "last.ckpt"),
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "best_val_loss": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "test_items": len(datamodule.splits["test"]),
        **figures,
        "seconds": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"held-out reconstruction on {summary['test_items']} test items: token accuracy "
        f"{summary['token_accuracy']:.3f}, exact match {summary['exact_match']:.3f} (best checkpoint {best})"
    )
    return summary


class _SaveLast(Callback):
    """Write ``last.ckpt`` after every validation round and when fitting ends, so a run stopped by
    --max-steps/--max-time mid-epoch resumes from its final step (``ModelCheckpoint`` would only save
    after validation, and versions the name when resuming into another directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(str(self.path), weights_only=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)


def _flatten_metrics(out: Path) -> None:
    """CSVLogger writes into ``out/`` when name and version are empty; make sure ``metrics.csv`` sits there."""
    if (out / "metrics.csv").exists():
        return
    found = sorted(out.rglob("metrics.csv"))
    if found:
        shutil.copyfile(found[0], out / "metrics.csv")


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
