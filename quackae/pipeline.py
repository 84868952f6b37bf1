"""``quackae run PIPELINE.yaml`` and ``quackae demo``: stages from a pipeline file, outputs chained.

A pipeline file names a ``root`` folder and a list of stages; each stage is a mapping with
``stage`` (``corpus``, ``prepare``, ``train``, ``encode``, ``classify``, ``export``) and that
stage's flags, spelled as the config fields (``vocab_size``, ``max_time``, ...). Relative paths
resolve against ``root``. Every stage's config is built and checked before the first one runs,
so a typo fails at once, not after training.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quackae.errors import QuackError

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[str, str, str]] = {
    "corpus": ("quackae.corpus", "CorpusConfig", "build_corpus"),
    "prepare": ("quackae.prepare", "PrepareConfig", "prepare"),
    "train": ("quackae.train", "TrainConfig", "train"),
    "encode": ("quackae.encode", "EncodeConfig", "encode"),
    "classify": ("quackae.classifier", "ClassifyConfig", "classify"),
    "export": ("quackae.store", "ExportConfig", "export"),
}

REPO_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@dataclass(frozen=True)
class RunConfig:
    pipeline: str = field(metadata={"positional": True, "help": "pipeline YAML file"})
    root: str | None = field(default=None, metadata={"help": "output root, overriding the file's root"})
    accelerator: str | None = field(
        default=None, metadata={"help": "accelerator for every model stage, overriding the file"}
    )


@dataclass(frozen=True)
class DemoConfig:
    out: str = field(default="storage/demo", metadata={"help": "where the demo writes everything"})
    accelerator: str | None = field(
        default=None, metadata={"help": "accelerator for every model stage (the demo file says cpu)"}
    )


def _resolve(value: Any, root: Path) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_resolve(v, root) for v in value)
    if value is None:
        return None
    path = Path(str(value))
    return str(path if path.is_absolute() else root / path)


def load_pipeline(
    file: str | Path, root: str | None = None, accelerator: str | None = None
) -> tuple[Path, list[tuple[str, Any, Any]]]:
    """Parse and check a pipeline file: ``(root, [(stage name, config, function)])``."""
    path = Path(file)
    if not path.is_file():
        raise QuackError(f"pipeline file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise QuackError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise QuackError(f"{path} needs a non-empty 'stages' list")
    base = Path(root or spec.get("root") or "storage")
    problems, plan = [], []
    for number, stage in enumerate(spec["stages"], start=1):
        if not isinstance(stage, dict) or "stage" not in stage:
            problems.append(f"stage {number}: a mapping with a 'stage' key is needed")
            continue
        name = stage["stage"]
        if name not in STAGES:
            problems.append(f"stage {number}: unknown stage {name!r} (known: {', '.join(STAGES)})")
            continue
        module_name, config_name, function_name = STAGES[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            log.warning("stage %d (%s): not yet available in this version, skipped", number, name)
            continue
        config_cls = getattr(module, config_name)
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        values = {k: v for k, v in stage.items() if k != "stage"}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            problems.append(f"stage {number} ({name}): unknown keys {', '.join(unknown)} (known: {', '.join(fields)})")
            continue
        if accelerator and "accelerator" in fields:
            values["accelerator"] = accelerator
        for key, value in list(values.items()):
            if fields[key].metadata.get("path"):
                values[key] = _resolve(value, base)
            elif isinstance(value, list):
                values[key] = tuple(value)
        try:
            plan.append((name, config_cls(**values), getattr(module, function_name)))
        except (TypeError, ValueError) as error:
            problems.append(f"stage {number} ({name}): {error}")
    if problems:
        raise QuackError(f"{path}: " + "; ".join(problems))
    return base, plan


def run_pipeline(config: RunConfig) -> list[dict[str, Any]]:
    """Run every stage of a pipeline file in order; returns each stage's summary."""
    root, plan = load_pipeline(config.pipeline, config.root, config.accelerator)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for name, stage_config, function in plan:
        log.info("stage %s", name)
        started = time.time()
        summary = function(stage_config) or {}
        results.append({"stage": name, "seconds": round(time.time() - started, 1), **_brief(name, summary)})
    (root / "pipeline.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _print_results(root, results)
    return results


def _brief(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    keys = {
        "corpus": ("out", "rows", "labelled", "labels"),
        "prepare": ("out", "rows_read", "rows_kept", "rejected_total", "truncated", "vocab_size"),
        "train": ("run", "global_step", "best_val_loss", "token_accuracy", "exact_match", "test_items"),
        "encode": ("store", "items_written", "items_skipped", "encoding_size", "items_per_s"),
        "classify": (
            "out",
            "accuracy",
            "macro_f1",
            "majority_accuracy",
            "linear_probe_accuracy",
            "bag_of_tokens_accuracy",
        ),
        "export": ("out", "rows"),
    }[name]
    brief = {k: summary.get(k) for k in keys if k in summary}
    if name == "prepare":
        brief["out"] = summary.get("config", {}).get("out")
    return brief


def _print_results(root: Path, results: list[dict[str, Any]]) -> None:
    print(f"\nquackae pipeline finished; everything is under {root}/")
    for result in results:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in result.items() if k not in ("stage",))
        print(f"  {result['stage']:>9}: {figures}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run_demo(config: DemoConfig) -> list[dict[str, Any]]:
    """Run ``pipelines/demo.yaml`` end to end into ``config.out``."""
    file = REPO_PIPELINES / "demo.yaml"
    if not file.is_file():
        file = Path("pipelines/demo.yaml")
    return run_pipeline(RunConfig(pipeline=str(file), root=config.out, accelerator=config.accelerator))
