"""``quackae bench --what quality``: what the stored encodings are worth to a downstream classifier.

Trains a ``QuackAutoEncoder`` with the ``train`` defaults (or the ``--option`` overrides) for a
fixed number of steps on a labelled docstring corpus that needs no download, encodes every
labelled item, and reports on one stratified split (the one ``quackae classify`` uses):

- held-out greedy reconstruction token accuracy and exact match (the training run's test split),
- a linear probe on the trained model's encodings (its weight decay chosen on the validation split,
  by the same rule for every feature set),
- the same probe on the same model untrained (random weights: what training adds),
- the same probe on bags of tokens from the run's own tokenizer,
- the majority class,
- the few-label regime: the same probes trained on ``FEW_LABELS`` items per class drawn from the
  training split (``FEW_LABEL_DRAWS`` seeded draws each, the same draws for every feature set; weight
  decay still chosen on the whole validation split), mean, sample standard deviation and every draw,
- with ``pretrain``, an in-domain pretraining row: a second model trained the same way on the site
  corpus's paragraphs that are not probe items (the larger unlabelled corpus: about 30,000 paragraphs
  for ``stdlib``, 22,000 for ``site``), then used to encode the probe's items, never seen in training.

Every probe uses only the feature columns that vary over its training items: a column constant
there (a token none of them has) carries nothing a linear probe can learn, and standardising it
would divide by zero. ``seed`` keys the training run, the split and the draws: three seeds of a
setting are three commands (``--seed 0``, ``1``, ``2``).

Corpora: ``stdlib`` (the demo's standard-library docstrings), ``site`` (docstrings of the installed
site-packages, parsed, never imported) or a JSONL file with ``text`` and ``label``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quackae.core.errors import QuackError

log = logging.getLogger(__name__)

# Per corpus: prepare settings and the probe's cap on items per label (keeps the bag-of-tokens
# probe's dense (N, V) matrix small on the larger corpus).
CORPORA: dict[str, dict[str, int]] = {
    "stdlib": {"vocab_size": 2000, "max_length": 48, "probe_per_label": 0},
    "site": {"vocab_size": 4000, "max_length": 48, "probe_per_label": 400},
}
DEFAULT_STEPS = 2000


class _OptionParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def parse_options(options: tuple[str, ...]) -> dict[str, Any]:
    """``("pooling=mean", "dropout=0.2")`` -> TrainConfig overrides, each ``NAME=VALUE`` read as ``quackae train``
    reads ``--NAME VALUE`` (``table.add_config_arguments``; a boolean takes true/false, 1/0 or yes/no)."""
    from quackae.stages.table import STAGES, add_config_arguments

    parser = _OptionParser(add_help=False, allow_abbrev=False)
    add_config_arguments(parser, STAGES["train"].load_config())
    switches = {a.dest: a for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)}
    reserved = {"data", "out", "max_steps", "max_epochs", "max_time", "resume", "accelerator", "devices"}
    names = {action.dest for action in parser._actions if action.option_strings}
    parsed: dict[str, Any] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.strip().replace("-", "_")
        flag = "--" + name.replace("_", "-")
        if not sep or name not in names or name in reserved:
            raise ValueError(f"--option {option!r} is not NAME=VALUE with NAME a quackae train setting")
        if name in switches:
            if value.strip().lower() not in _BOOLEANS:
                raise ValueError(f"--option {option!r}: {name} takes true or false")
            argv = [flag if _BOOLEANS[value.strip().lower()] else "--no-" + flag[2:]]
        else:
            argv = [flag, value]
        try:
            parsed[name] = getattr(parser.parse_args([*_required(parser), *argv]), name)
        except ValueError as error:
            raise ValueError(f"--option {option!r}: {error}") from None
    return parsed


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the positional arguments, so that one flag can be parsed alone."""
    return ["-" for action in parser._actions if not action.option_strings]


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


FEW_LABEL_DRAWS = 5  # draws of the few labelled items for each size (``probes.few_label_draw``)


def _probe_subset(ids: np.ndarray, labels: list[str], per_label: int, seed: int) -> np.ndarray:
    """Positions of at most ``per_label`` items per label (0: all), the first in the keyed id hash order."""
    from quackae.eval.probes import hash_order

    if per_label <= 0:
        return np.arange(len(ids))
    keep = [p for positions in hash_order(ids, labels, f"probe{seed}").values() for p in positions[:per_label]]
    return np.asarray(sorted(keep), dtype=np.int64)


class ProbeSplit:
    """Ids ``ids`` (N,), labels ``y`` (N,) and the split (0/1/2 train/validation/test per item) every feature set
    is probed on."""

    def __init__(self, ids: np.ndarray, y: np.ndarray, split: np.ndarray, classes: int, seed: int) -> None:
        self.ids, self.y, self.classes, self.seed = ids, y, classes, seed
        self.labels = [str(label) for label in y.tolist()]
        self.train, self.val, self.test = (np.flatnonzero(split == part) for part in (0, 1, 2))
        self.decays: dict[str, float] = {}  # the weight decay each full-label probe chose

    def accuracy(
        self, features: np.ndarray, train: np.ndarray | None = None, decay: float | None = None
    ) -> tuple[float, float]:
        """``(test accuracy, weight decay)`` of the probe on ``features`` (N, F) fitted on the items ``train``
        (default: the whole training split), over the columns that vary there, with the weight decay ``decay``
        (default: chosen on validation)."""
        from quackae.eval.probes import PROBE_DECAYS, tuned_linear_probe

        train = self.train if train is None else train
        x = features[:, features[train].std(axis=0) > 0]  # (N, F')
        predicted, decay = tuned_linear_probe(
            x[train], self.y[train], x[self.val], self.y[self.val], x[self.test], self.classes, self.seed,
            PROBE_DECAYS if decay is None else (decay,),
        )  # fmt: skip
        return round(float((predicted == self.y[self.test]).mean()), 4), decay

    def full(self, features: np.ndarray, name: str) -> float:
        accuracy, self.decays[name] = self.accuracy(features)
        return accuracy

    def draw(self, per_class: int, number: int) -> np.ndarray:
        """Positions of ``per_class`` training items of each class (all of a smaller class), draw ``number``: the
        few-label draw ``quackae classify`` makes (``probes.few_label_draw``)."""
        from quackae.eval.probes import few_label_draw

        return few_label_draw(self.ids, self.labels, self.train, per_class, number, self.seed)

    def few_label(self, features: np.ndarray) -> dict[str, dict[str, Any]]:
        """Per size in ``probes.FEW_LABELS``: the few-label curve ``quackae classify`` reports
        (``probes.few_label_curve``) over ``FEW_LABEL_DRAWS`` draws."""
        from quackae.eval.probes import few_label_curve

        def probe(train: np.ndarray, decay: float | None) -> tuple[float, float]:
            return self.accuracy(features, train, decay)

        return few_label_curve(probe, self.ids, self.labels, self.train, self.seed, draws=FEW_LABEL_DRAWS)


def _write_prepared(root: Path, name: str, rows: list[dict[str, Any]], settings: dict[str, int]) -> Path:
    """``rows`` as ``root/NAME.jsonl``, prepared into ``root/NAME`` with ``settings``' vocabulary and length."""
    from quackae.stages.prepare import PrepareConfig, prepare

    with (root / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"id": row["id"], "text": row["text"], "label": row.get("label")}) + "\n")
    out = root / name
    prepare(
        PrepareConfig(
            inputs=(str(root / f"{name}.jsonl"),),
            out=str(out),
            vocab_size=settings["vocab_size"],
            max_length=settings["max_length"],
        )
    )
    return out


def _train(data: Path, out: Path, steps: int, seed: int, batch_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """``quackae train`` on ``data`` for ``steps`` steps; its summary plus ``train_seconds``."""
    from quackae.stages.train import TrainConfig, train

    started = time.time()
    summary = train(
        TrainConfig(
            data=str(data), out=str(out), accelerator="cpu", devices="1", max_steps=steps, max_epochs=-1, seed=seed,
            **({"batch_size": batch_size} if batch_size else {}), **options,
        )
    )  # fmt: skip
    return {**summary.figures(), "train_seconds": round(time.time() - started, 1)}


def _held_out(summary: dict[str, Any]) -> dict[str, Any]:
    """A training run's figures the bench reports: steps, time, held-out reconstruction, the bag-of-words loss."""
    figures = {
        "steps": summary["global_step"],
        "train_seconds": summary["train_seconds"],
        "best_val_loss": summary["best_val_loss"],
        # None where no reconstruction was trained (summary's greedy_skipped says so)
        **{k: None if summary[k] is None else round(summary[k], 4) for k in ("token_accuracy", "exact_match")},
    }
    return figures | {k: summary[k] for k in ("train_bow_loss", "val_bow_loss") if summary.get(k) is not None}


def _models(summary: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """The run's best checkpoint (its last when too short to validate) and the same model untrained."""
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.checkpoints import load_model

    model = load_model(summary["best_checkpoint"] or summary["last_checkpoint"])
    torch.manual_seed(seed)
    return model, QuackAutoEncoder(**dict(model.hparams))


def _pretrained(
    root: Path, texts: list[str], probe: ProbeSplit, steps: int, batch_size: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The in-domain pretraining row: train on the site corpus's paragraphs that are not the probe's ``texts``,
    encode ``texts`` with that run's tokenizer and model, and probe them (full and few labels) on ``probe``."""
    from quackae.data.corpus import site_docstrings
    from quackae.model.encoder import QuackEncoder

    seen = set(texts)
    rows = [{"id": row["id"], "text": row["text"]} for row in site_docstrings() if row["text"] not in seen]
    summary = _train(
        _write_prepared(root, "pretrain", rows, CORPORA["site"]), root / "pretrain-run", steps, probe.seed,
        batch_size, options,
    )  # fmt: skip
    encoder = QuackEncoder.from_run(root / "pretrain-run", device="cpu")
    sequences = encoder.tokenize(texts)
    model, untrained = _models(summary, probe.seed)
    trained_x, untrained_x = _encode_all(model, sequences), _encode_all(untrained, sequences)
    return {
        "corpus": "site paragraphs that are not probe items",
        "items": len(rows),
        **_held_out(summary),
        "probe_trained": probe.full(trained_x, "pretrained"),
        "probe_untrained": probe.full(untrained_x, "pretrained untrained"),
        "few_label": {"trained": probe.few_label(trained_x), "untrained": probe.few_label(untrained_x)},
    }


def _probe_items(dataset: Any, per_label: int, seed: int) -> tuple[np.ndarray, list[str], list[Any], ProbeSplit]:
    """``(ids, classes, token sequences, split)`` of the labelled items the probe takes (``per_label`` a label)."""
    from quackae.eval.probes import stratified_split

    table = dataset.select_columns(["id", "input_ids", "label"]).to_dict()
    labelled = [i for i, label in enumerate(table["label"]) if label is not None]
    ids = np.asarray([table["id"][i] for i in labelled], dtype=np.int64)
    labels = [str(table["label"][i]) for i in labelled]
    sequences = [table["input_ids"][i] for i in labelled]
    chosen = _probe_subset(ids, labels, per_label, seed)
    ids, labels, sequences = ids[chosen], [labels[i] for i in chosen], [sequences[i] for i in chosen]
    classes = sorted(set(labels))
    y = np.asarray([classes.index(label) for label in labels], dtype=np.int64)
    split, _ = stratified_split(ids, labels, seed, 0.15, 0.15)
    return ids, classes, sequences, ProbeSplit(ids, y, split, len(classes), seed)


def _by_pooling(model: Any, untrained: Any, sequences: list[Any], probe: ProbeSplit) -> tuple[dict, dict]:
    """The probe on the trained model and on its untrained twin with each pooling (each put back after)."""
    from quackae.model.config import POOLINGS

    pooling = model.pooling
    by_pooling: dict[str, Any] = {}
    untrained_by_pooling: dict[str, Any] = {}
    for name in POOLINGS:
        for net, figures, which in ((model, by_pooling, "trained"), (untrained, untrained_by_pooling, "untrained")):
            net.set_pooling(name)
            figures[name] = probe.full(_encode_all(net, sequences), f"{which} {name}")
    model.set_pooling(pooling)
    untrained.set_pooling(pooling)
    return by_pooling, untrained_by_pooling


def quality_run(
    corpus: str,
    steps: int,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    workdir: str | Path | None = None,
    batch_size: int = 0,
    kind: str | None = None,
    pretrain: bool = False,
) -> dict[str, Any]:
    """Prepare ``corpus``, train ``steps`` steps with the train defaults plus ``options``, and probe.

    ``kind`` (``stdlib`` or ``site``) picks the prepare settings for a JSONL ``corpus`` (default:
    ``corpus`` itself, else ``stdlib``'s). Pooling changes only what is stored, not training, so
    the one trained model and its untrained twin are also probed with every pooling
    (``probe_by_pooling``, ``probe_untrained_by_pooling``). ``pretrain`` adds the pretraining row
    (``pretrained``). Returns the figures as a dict (see the module docstring).
    """
    from quackae.data.prepared import load_prepared
    from quackae.eval.probes import bag_of_tokens

    options = dict(options or {})
    settings = CORPORA.get(kind or corpus, CORPORA["stdlib"])
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="quackae-quality-", dir=workdir) as folder:
        root = Path(folder)
        rows = corpus_rows(corpus)
        prepared = _write_prepared(root, "prepared", rows, settings)
        summary = _train(prepared, root / "run", steps, seed, batch_size, options)

        dataset, tokenizer, _ = load_prepared(prepared)
        ids, classes, sequences, probe = _probe_items(dataset, settings["probe_per_label"], seed)
        y = probe.y
        model, untrained = _models(summary, seed)
        pooling = model.pooling
        counts = np.log1p(bag_of_tokens(sequences, tokenizer.get_vocab_size()))  # (N, V)
        majority = int(np.bincount(y[probe.train], minlength=len(classes)).argmax())
        by_pooling, untrained_by_pooling = _by_pooling(model, untrained, sequences, probe)
        result = {
            "bench": "quality",
            "corpus": corpus,
            "seed": seed,
            "items": len(rows),
            "probe_items": {"train": len(probe.train), "val": len(probe.val), "test": len(probe.test)}
            | {"classes": len(classes)},
            "options": options,
            "model": {k: model.hparams[k] for k in ("embed_size", "hidden_size", "pooling", "dropout", "denoise")}
            | {k: model.hparams.get(k) for k in ("bow_weight", "reconstruction_weight", "input_word_dropout")}
            | {"bow_pooling": model.bow_pooling},
            **_held_out(summary),
            "probe_trained": by_pooling[pooling],
            "probe_untrained": untrained_by_pooling[pooling],
            "probe_by_pooling": by_pooling,
            "probe_untrained_by_pooling": untrained_by_pooling,
            "probe_bag_of_tokens": probe.full(counts, "bag of tokens"),
            "majority": round(float((y[probe.test] == majority).mean()), 4),
            "few_label": {
                "trained": probe.few_label(_encode_all(model, sequences)),
                "untrained": probe.few_label(_encode_all(untrained, sequences)),
                "bag_of_tokens": probe.few_label(counts),
            },
            "few_label_draws": FEW_LABEL_DRAWS,
            "probe_weight_decay": probe.decays,
            "torch_threads": torch.get_num_threads(),
        }
        if pretrain:
            text_of = {row["id"]: row["text"] for row in rows}
            texts = [text_of[int(i)] for i in ids]
            result["pretrained"] = _pretrained(root, texts, probe, steps, batch_size, options)
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
        pretrain=config.pretrain,
    )
