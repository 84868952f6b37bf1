"""``quackae bench --what quality``: what the stored encodings are worth to a downstream classifier.

Trains a ``QuackAutoEncoder`` with the ``train`` defaults (or the ``--option`` overrides) for a
fixed number of steps on a labelled docstring corpus that needs no download, encodes every
labelled item, and reports on one stratified split (the one ``quackae classify`` uses):

- held-out greedy reconstruction token accuracy (the training run's test split),
- a linear probe on the trained model's encodings (its weight decay chosen on the validation split,
  by the same rule for every feature set),
- the same probe on the same model untrained (random weights: what training adds),
- the same probe on bags of tokens from the run's own tokenizer,
- the majority class.

Corpora: ``stdlib`` (the demo's standard-library docstrings), ``site`` (docstrings of the installed
site-packages, parsed, never imported) or a JSONL file with ``text`` and ``label``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quackae.core.errors import QuackError
from quackae.core.ids import id_hash

log = logging.getLogger(__name__)

# Per corpus: prepare settings and the probe's cap on items per label (keeps the bag-of-tokens
# probe's dense (N, V) matrix small on the larger corpus).
CORPORA: dict[str, dict[str, int]] = {
    "stdlib": {"vocab_size": 2000, "max_length": 48, "probe_per_label": 0},
    "site": {"vocab_size": 4000, "max_length": 48, "probe_per_label": 400},
}
DEFAULT_STEPS = 2000


def parse_options(options: tuple[str, ...]) -> dict[str, Any]:
    """``("pooling=mean", "dropout=0.2")`` -> TrainConfig overrides, typed like the fields they set."""
    from quackae.stages.train import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig)}
    reserved = {"data", "out", "max_steps", "max_epochs", "max_time", "resume", "accelerator", "devices"}
    parsed: dict[str, Any] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types or name in reserved:
            raise ValueError(f"--option {option!r} is not NAME=VALUE with NAME a quackae train setting")
        kind = str(types[name])
        if "bool" in kind:
            parsed[name] = value.lower() in ("1", "true", "yes")
        elif "int" in kind:
            parsed[name] = int(value)
        elif "float" in kind:
            parsed[name] = float(value)
        else:
            parsed[name] = value
    return parsed


def corpus_rows(corpus: str) -> list[dict[str, Any]]:
    """Rows ``{"id", "text", "label"}`` of ``stdlib``, ``site`` or a JSONL file."""
    from quackae.data.corpus import site_docstrings, stdlib_docstrings

    if corpus == "stdlib":
        return stdlib_docstrings()
    if corpus == "site":
        return site_docstrings()
    path = Path(corpus)
    if not path.is_file():
        raise QuackError(f"--corpus {corpus} is neither stdlib, site nor an existing JSONL file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise QuackError(f"{path}:{number} is not valid JSON") from None
    return rows


def _encode_all(model: Any, sequences: list[list[int]], batch_size: int = 256) -> np.ndarray:
    """Encodings (N, encoding_size) of token id lists, batched by length, in the input order."""
    from quackae.data.padding import length_sorted_batches

    model.eval()
    out = np.zeros((len(sequences), model.encoding_size), dtype=np.float32)
    with torch.no_grad():
        for positions, x in length_sorted_batches(sequences, batch_size, model.pad_id):
            out[positions] = model(x)[0].float().numpy()  # (B, encoding_size)
    return out


def _probe_subset(ids: np.ndarray, labels: list[str], per_label: int, seed: int) -> np.ndarray:
    """Positions of at most ``per_label`` items per label (0: all), chosen by a keyed hash of the id."""
    if per_label <= 0:
        return np.arange(len(ids))
    key = f"probe{seed}".encode()
    by_label: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(label, []).append(position)
    keep: list[int] = []
    for _, positions in sorted(by_label.items()):
        positions.sort(key=lambda p: id_hash(ids[p], key))
        keep.extend(positions[:per_label])
    return np.asarray(sorted(keep), dtype=np.int64)


def quality_run(
    corpus: str,
    steps: int,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    batch_size: int = 0,
    kind: str | None = None,
) -> dict[str, Any]:
    """Prepare ``corpus``, train ``steps`` steps with the train defaults plus ``options``, and probe.

    ``kind`` (``stdlib`` or ``site``) picks the prepare settings for a JSONL ``corpus`` (default:
    ``corpus`` itself, else ``stdlib``'s). Pooling changes only what is stored, not training, so
    the one trained model and its untrained twin are also probed with every pooling
    (``probe_by_pooling``, ``probe_untrained_by_pooling``). Returns the
    figures as a dict (see the module docstring).
    """
    from quackae.data.prepared import load_prepared
    from quackae.eval.probes import bag_of_tokens, stratified_split, tuned_linear_probe
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.checkpoints import load_model
    from quackae.model.config import POOLINGS
    from quackae.stages.prepare import PrepareConfig, prepare
    from quackae.stages.train import TrainConfig, train

    options = dict(options or {})
    settings = CORPORA.get(kind or corpus, CORPORA["stdlib"])
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="quackae-quality-", dir=workdir) as folder:
        root = Path(folder)
        rows = corpus_rows(corpus)
        with (root / "corpus.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"id": row["id"], "text": row["text"], "label": row.get("label")}) + "\n")
        prepare(
            PrepareConfig(
                inputs=(str(root / "corpus.jsonl"),),
                out=str(root / "prepared"),
                vocab_size=settings["vocab_size"],
                max_length=settings["max_length"],
            )
        )
        train_settings: dict[str, Any] = {
            "data": str(root / "prepared"),
            "out": str(root / "run"),
            "accelerator": "cpu",
            "devices": "1",
            "max_steps": steps,
            "max_epochs": -1,
            "seed": seed,
            **({"batch_size": batch_size} if batch_size else {}),
            **options,
        }
        train_started = time.time()
        summary = train(TrainConfig(**train_settings))
        train_seconds = time.time() - train_started

        dataset, tokenizer, _ = load_prepared(root / "prepared")
        table = dataset.select_columns(["id", "input_ids", "label"]).to_dict()
        labelled = [i for i, label in enumerate(table["label"]) if label is not None]
        ids = np.asarray([table["id"][i] for i in labelled], dtype=np.int64)
        labels = [str(table["label"][i]) for i in labelled]
        sequences = [table["input_ids"][i] for i in labelled]
        chosen = _probe_subset(ids, labels, settings["probe_per_label"], seed)
        ids, labels, sequences = ids[chosen], [labels[i] for i in chosen], [sequences[i] for i in chosen]
        classes = sorted(set(labels))
        y = np.asarray([classes.index(label) for label in labels], dtype=np.int64)
        split, _ = stratified_split(ids, labels, seed, 0.15, 0.15)
        train_part, val_part, test_part = split == 0, split == 1, split == 2
        decays: dict[str, float] = {}

        def probe(features: np.ndarray, name: str) -> float:
            """Test accuracy of the linear probe on ``features`` (N, F), its weight decay chosen on validation."""
            predicted, decays[name] = tuned_linear_probe(
                features[train_part], y[train_part], features[val_part], y[val_part], features[test_part],
                len(classes), seed,
            )  # fmt: skip
            return round(float((predicted == y[test_part]).mean()), 4)

        # The best checkpoint by validation loss; a run too short to validate has only its last one.
        model = load_model(summary["best_checkpoint"] or summary["last_checkpoint"])
        hparams = dict(model.hparams)
        torch.manual_seed(seed)
        untrained = QuackAutoEncoder(**hparams)
        counts = bag_of_tokens(sequences, tokenizer.get_vocab_size())  # (N, V)
        majority = int(np.bincount(y[train_part], minlength=len(classes)).argmax())
        by_pooling, untrained_by_pooling = {}, {}
        for pooling in POOLINGS:
            for net, figures, name in ((model, by_pooling, "trained"), (untrained, untrained_by_pooling, "untrained")):
                net.set_pooling(pooling)
                figures[pooling] = probe(_encode_all(net, sequences), f"{name} {pooling}")
        model.set_pooling(hparams["pooling"])
        result = {
            "bench": "quality",
            "corpus": corpus,
            "items": len(rows),
            "probe_items": {
                "train": int(train_part.sum()),
                "val": int(val_part.sum()),
                "test": int(test_part.sum()),
                "classes": len(classes),
            },
            "options": options,
            "model": {k: hparams[k] for k in ("embed_size", "hidden_size", "pooling", "dropout", "denoise")},
            "steps": summary["global_step"],
            "train_seconds": round(train_seconds, 1),
            "best_val_loss": summary["best_val_loss"],
            "token_accuracy": round(summary["token_accuracy"], 4),
            "exact_match": round(summary["exact_match"], 4),
            "probe_trained": by_pooling[hparams["pooling"]],
            "probe_untrained": untrained_by_pooling[hparams["pooling"]],
            "probe_by_pooling": by_pooling,
            "probe_untrained_by_pooling": untrained_by_pooling,
            "probe_bag_of_tokens": probe(np.log1p(counts), "bag of tokens"),
            "majority": round(float((y[test_part] == majority).mean()), 4),
            "probe_weight_decay": decays,
            "torch_threads": torch.get_num_threads(),
        }
    result["seconds"] = round(time.time() - started, 1)
    return result


def bench_quality(config: Any) -> dict[str, Any]:
    """``quackae bench --what quality``: ``quality_run`` on ``config.corpus`` for ``config.quality_steps`` steps."""
    steps = config.quality_steps or DEFAULT_STEPS
    return quality_run(
        config.corpus,
        steps,
        parse_options(config.option),
        seed=config.seed,
        workdir=config.dir,
        batch_size=config.batch_size,
    )
