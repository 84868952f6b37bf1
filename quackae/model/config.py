"""``ModelConfig``: the one place where ``QuackAutoEncoder``'s hyper-parameters, defaults and checks live.

The model takes it (``QuackAutoEncoder(**asdict(config))``, or keyword arguments that become one),
``TrainConfig`` inherits its trainable fields as ``quackae train`` flags, and named presets serve
tests, benchmarks and pipeline files. No torch import here, so the command line can read it fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# What is stored per item: the encoder's final states, the mean or the max over its states, or several of them
# concatenated in the order named (each part H values).
POOLINGS = ("final", "mean", "final+mean", "max", "mean+max", "final+mean+max")
DENOISE_MODES = ("delete", "mask")
# Set from the tokenizer when a model is built for data, never by a flag.
VOCABULARY_FIELDS = ("num_embeddings", "pad_id", "eos_id", "mask_id")


@dataclass(frozen=True)
class ModelFlags:
    """The model settings a user chooses (``quackae train`` flags); ``ModelConfig`` adds the vocabulary's."""

    embed_size: int = field(default=128, metadata={"help": "token embedding size"})
    hidden_size: int = field(default=256, metadata={"help": "encoder/decoder state size H (even: two directions)"})
    layers: int = field(default=1, metadata={"help": "GRU layers in encoder and decoder"})
    max_decode_length: int | None = field(
        default=None, metadata={"help": "decode at most this many steps (default: the item's length)"}
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    learning_rate_min: float = field(default=1e-5, metadata={"help": "cosine-annealing floor"})
    lr_max_epochs: int = field(
        default=-1, metadata={"help": "cosine period in epochs (-1: the trainer's max steps, else max epochs)"}
    )
    teacher_forcing_ratio: float = field(
        default=1.0, metadata={"help": "share of training batches decoded with teacher forcing"}
    )
    denoise: float = field(default=0.0, metadata={"help": "probability of corrupting each encoder input token"})
    denoise_mode: str = field(
        default="delete",
        metadata={"help": "delete or mask ([UNK]) corrupted tokens", "choices": DENOISE_MODES},
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on embeddings and the token predictor's input"})
    pooling: str = field(
        default="final+mean",
        metadata={
            "help": "stored encoding: final states, mean or max of encoder states, or several joined by + (H each)",
            "choices": POOLINGS,
        },
    )
    word_dropout: float = field(
        default=0.3, metadata={"help": "share of decoder input tokens replaced by [UNK] in training"}
    )
    attention_dropout: float = field(
        default=0.0, metadata={"help": "share of decoder steps whose attention context is zeroed in training"}
    )
    reconstruction_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the reconstruction loss (0: the decoder neither runs nor trains in training)"},
    )
    bow_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the bag-of-words loss from the encoding (1: like one item's reconstruction; 0: off)"
        },
    )
    bow_pooling: str | None = field(
        default=None,
        metadata={
            "help": "encoding the bag-of-words head reads (default: --pooling, as stored when training starts)",
            "choices": POOLINGS,
        },
    )
    input_word_dropout: float = field(
        default=0.5,
        metadata={
            "help": "share of the encoder input tokens deleted for the bag-of-words term in training "
            "(none with --bow-weight 0)"
        },
    )

    def __post_init__(self) -> None:
        problems = model_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        settle_objective(self)

    def model_settings(self) -> dict[str, Any]:
        """The model flags of this config (a ``ModelFlags`` or a config inheriting them) as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelFlags)}

    @property
    def encoding_size(self) -> int:
        """Width of the stored encoding: H per part of ``pooling`` (``final+mean``: 2H)."""
        return len(self.pooling.split("+")) * self.hidden_size


@dataclass(frozen=True)
class ModelConfig(ModelFlags):
    """Every hyper-parameter of a ``QuackAutoEncoder``: the flags plus what the tokenizer fixes."""

    num_embeddings: int = field(default=8000, metadata={"help": "vocabulary size V (the tokenizer's)"})
    pad_id: int = field(default=0, metadata={"help": "padding token id"})
    eos_id: int | None = field(default=None, metadata={"help": "end-of-sequence token id (greedy decoding stops)"})
    mask_id: int | None = field(default=None, metadata={"help": "id that masked tokens become ([UNK])"})

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; a name that is no hyper-parameter is a ``ValueError`` naming it."""
        unknown = unknown_fields(changes)
        if unknown:
            raise ValueError(
                f"unknown model hyper-parameters {', '.join(unknown)} (known: {', '.join(sorted(MODEL_FIELDS))})"
            )
        return dataclasses.replace(self, **changes)


MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))

# The objective of a checkpoint saved before these fields existed: reconstruction alone. A saved model keeps it
# rather than taking today's defaults (the bag-of-words term alone), which would change what it is.
OBJECTIVE_BEFORE_BOW = {"reconstruction_weight": 1.0, "bow_weight": 0.0, "bow_pooling": None, "input_word_dropout": 0.0}

# Said wherever an untrained decoder would be used: reconstructions and attention maps of such a model are noise.
UNTRAINED_DECODER = (
    "the decoder of this model was not trained (--reconstruction-weight 0: the encoding was trained by the "
    "bag-of-words term alone), so its reconstructions and attention maps are noise; train with "
    "--reconstruction-weight 1 --bow-weight 0 (or a reconstruction weight above 0) for a decoder"
)


def saved_settings(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved hyper-parameters with the objective of its own time filled in where it predates the
    objective fields (``OBJECTIVE_BEFORE_BOW``)."""
    return {**{k: v for k, v in OBJECTIVE_BEFORE_BOW.items() if k not in hparams}, **hparams}


def decoder_trained(hparams: Any) -> bool:
    """Whether a model with these settings (a config or its saved dict) trained its decoder."""
    weight = hparams.get("reconstruction_weight") if isinstance(hparams, dict) else hparams.reconstruction_weight
    return weight is None or weight > 0


def settle_objective(flags: ModelFlags) -> None:
    """With ``bow_weight`` 0, ``input_word_dropout`` has nothing to act on: record 0, what acts."""
    if flags.bow_weight == 0 and flags.input_word_dropout:
        object.__setattr__(flags, "input_word_dropout", 0.0)


def unknown_fields(names: Any) -> list[str]:
    """The names among ``names`` that are no hyper-parameter of a ``QuackAutoEncoder``, sorted (the one rule for
    keyword arguments and for a checkpoint's saved hyper-parameters)."""
    return sorted(set(map(str, names)) - MODEL_FIELDS)


def model_problems(values: Any, as_flags: bool = False) -> list[str]:
    """Every problem with the model settings of ``values`` (a ``ModelFlags``, a ``ModelConfig`` or a config that
    inherits them), each naming its field, or its command-line flag with ``as_flags``; the vocabulary's fields are
    checked where ``values`` has them."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-") if as_flags else name

    v = values
    problems = [
        f"{flag(f.name)} must be a finite number, got {getattr(v, f.name)}"
        for f in dataclasses.fields(ModelFlags)
        if isinstance(getattr(v, f.name), float) and not math.isfinite(getattr(v, f.name))
    ]
    if problems:
        return problems  # the range checks below cannot judge a NaN
    vocabulary = getattr(v, "num_embeddings", None)
    if vocabulary is not None and vocabulary < 2:
        problems.append(f"num_embeddings must be at least 2, got {vocabulary}")
    if v.embed_size <= 0:
        problems.append(f"{flag('embed_size')} must be positive, got {v.embed_size}")
    if v.hidden_size <= 0 or v.hidden_size % 2:
        problems.append(
            f"{flag('hidden_size')} must be a positive even number (two encoder directions), got {v.hidden_size}"
        )
    if v.layers <= 0:
        problems.append(f"{flag('layers')} must be positive, got {v.layers}")
    if v.max_decode_length is not None and v.max_decode_length <= 0:
        problems.append(f"{flag('max_decode_length')} must be positive or None, got {v.max_decode_length}")
    if v.learning_rate <= 0 or v.learning_rate_min < 0 or v.learning_rate_min > v.learning_rate:
        problems.append(
            f"need 0 <= {flag('learning_rate_min')} <= {flag('learning_rate')} and {flag('learning_rate')} > 0, "
            f"got {v.learning_rate_min} and {v.learning_rate}"
        )
    for name in ("pad_id", "eos_id", "mask_id"):
        value = getattr(v, name, None)
        if value is not None and vocabulary is not None and not 0 <= value < vocabulary:
            problems.append(f"{name} must be in [0, {vocabulary}), got {value}")
    if not 0.0 <= v.teacher_forcing_ratio <= 1.0:
        problems.append(f"{flag('teacher_forcing_ratio')} must be in [0, 1], got {v.teacher_forcing_ratio}")
    for name in ("denoise", "dropout", "word_dropout"):
        if not 0.0 <= getattr(v, name) < 1.0:
            problems.append(f"{flag(name)} must be in [0, 1), got {getattr(v, name)}")
    if not 0.0 <= v.attention_dropout <= 1.0:
        problems.append(f"{flag('attention_dropout')} must be in [0, 1], got {v.attention_dropout}")
    if v.weight_decay < 0:
        problems.append(f"{flag('weight_decay')} must not be negative, got {v.weight_decay}")
    if v.pooling not in POOLINGS:
        problems.append(f"{flag('pooling')} must be one of {', '.join(POOLINGS)}, got {v.pooling!r}")
    if v.bow_pooling is not None and v.bow_pooling not in POOLINGS:
        problems.append(f"{flag('bow_pooling')} must be one of {', '.join(POOLINGS)}, got {v.bow_pooling!r}")
    if v.reconstruction_weight < 0 or v.bow_weight < 0:
        problems.append(
            f"{flag('reconstruction_weight')} and {flag('bow_weight')} must not be negative, "
            f"got {v.reconstruction_weight} and {v.bow_weight}"
        )
    elif v.reconstruction_weight == 0 and v.bow_weight == 0:
        problems.append(
            f"{flag('bow_weight')} 0 with {flag('reconstruction_weight')} 0 trains nothing; for the reconstruction "
            f"autoencoder pass {flag('reconstruction_weight')} 1 {flag('bow_weight')} 0"
        )
    if not 0.0 <= v.input_word_dropout < 1.0:
        problems.append(f"{flag('input_word_dropout')} must be in [0, 1), got {v.input_word_dropout}")
    if v.denoise_mode not in DENOISE_MODES:
        problems.append(f"{flag('denoise_mode')} must be 'delete' or 'mask', got {v.denoise_mode!r}")
    if v.denoise_mode == "mask" and v.denoise > 0 and hasattr(v, "mask_id") and v.mask_id is None:
        problems.append("denoise_mode 'mask' needs a mask_id (the tokenizer's [UNK] id)")
    return problems


# Named sizes: ``tiny`` for tests (vocab 32, H 16), ``small`` for the demo on a laptop CPU, ``base`` the defaults
# that benchmarks measure (vocab 8000, E 128, H 256).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(num_embeddings=32, embed_size=8, hidden_size=16),
    "small": ModelConfig(num_embeddings=2000, embed_size=64, hidden_size=128),
    "base": ModelConfig(),
}
