"""``quackae run PIPELINE.yaml`` and ``quackae demo``: stages from a pipeline file, outputs chained.

A pipeline file names a ``root`` folder and a list of stages; each stage is a mapping with
``stage`` (``corpus``, ``prepare``, ``train``, ``encode``, ``classify``, ``export``) and that
stage's flags, spelled as the config fields (``vocab_size``, ``max_time``, ...). Relative paths
resolve against ``root``. Every stage's config is built and checked before the first one runs,
and every path a stage reads must exist or be written by an earlier stage, so a typo or a
missing file fails at once, not after training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import types
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quackae.core.atomic import write_atomic
from quackae.core.errors import QuackError, StrictError
from quackae.core.results import StageResult
from quackae.core.safeyaml import read_yaml
from quackae.stages.configs import DemoConfig, RunConfig
from quackae.stages.table import PIPELINE_STAGES

log = logging.getLogger(__name__)


def _shipped_pipelines() -> Path:
    """The pipelines quackae ships: ``quackae/pipelines`` in an installed wheel (package data), else the
    checkout's top-level ``pipelines/`` folder (what the wheel packs)."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "pipelines"
    return installed if installed.is_dir() else package.parent / "pipelines"


REPO_PIPELINES = _shipped_pipelines()


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
    """Parse and check a pipeline file: ``(root, [(stage name, config, function)])``.

    The file is read through ``safeyaml.read_yaml`` (aliases bounded, no cycles); every value must have
    its flag's type (a whole number for ``batch_size``, a string for a path or ``max_time``, ...), and
    every problem of every stage is named with the stage's number in the file.
    """
    path = Path(file)
    spec = read_yaml(path, "pipeline file", "see pipelines/demo.yaml for the format")
    if not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise QuackError(f"{path} needs a non-empty 'stages' list")
    unknown_keys = sorted(str(key) for key in spec if key not in ("root", "stages"))
    if unknown_keys:
        raise QuackError(f"{path}: unknown top-level keys {', '.join(unknown_keys)} (known: root, stages)")
    chosen = root if root is not None else spec.get("root")
    if chosen is not None and not isinstance(chosen, str):
        raise QuackError(f"{path}: root must be one folder name (a string), got {_describe(chosen)}")
    base = Path(chosen or "storage")
    problems, plan, outs = [], [], {}
    for number, stage in enumerate(spec["stages"], start=1):
        if not isinstance(stage, dict) or "stage" not in stage:
            problems.append(f"stage {number}: a mapping with a 'stage' key is needed")
            continue
        name = stage["stage"]
        if not isinstance(name, str) or name not in PIPELINE_STAGES:
            problems.append(f"stage {number}: unknown stage {name!r} (known: {', '.join(PIPELINE_STAGES)})")
            continue
        if isinstance(stage.get("out"), str):
            outs[number] = _resolve(stage["out"], base)  # what it writes, even if its other flags are wrong
        config_cls, function = PIPELINE_STAGES[name].load()
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        values = {k: v for k, v in stage.items() if k != "stage"}
        unknown = sorted(str(k) for k in values if k not in fields)
        if unknown:
            problems.append(f"stage {number} ({name}): unknown keys {', '.join(unknown)} (known: {', '.join(fields)})")
            continue
        hints = typing.get_type_hints(config_cls)
        wrong = [problem for key, value in values.items() if (problem := _type_problem(key, hints[key], value))]
        if wrong:
            problems.extend(f"stage {number} ({name}): {problem}" for problem in wrong)
            continue
        if accelerator and "accelerator" in fields:
            values["accelerator"] = accelerator
        for key, value in list(values.items()):
            if fields[key].metadata.get("path"):
                values[key] = _resolve(value, base)
            elif isinstance(value, list):
                values[key] = tuple(value)
        try:
            plan.append((number, name, config_cls(**values), function))
        except (TypeError, ValueError) as error:
            problems.append(f"stage {number} ({name}): {error}")
    problems.extend(_missing_inputs(plan, outs))
    if problems:
        raise QuackError(f"{path}: " + "; ".join(problems))
    return base, [(name, config, function) for _, name, config, function in plan]


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    kind = "nothing (null)" if value is None else kinds.get(type(value), type(value).__name__)
    return kind if value is None or isinstance(value, (list, dict)) else f"{kind} ({value!r})"


def _type_problem(key: str, hint: Any, value: Any) -> str | None:
    """None when a pipeline file's ``value`` fits the config field's type ``hint``, else what is wrong."""
    if _fits(hint, value):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(base)
    if typing.get_origin(base) is tuple:
        wanted = f"a list of {_TYPE_WORDS.get(typing.get_args(base)[0], 'values')}"
    if base is not hint:
        wanted = f"{wanted} or null"
    quote = ""
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        quote = " (quote it: YAML reads 1:00:00 as a number of seconds)" if key == "max_time" else " (quote it)"
    return f"{key} must be {wanted}, got {_describe(value)}{quote}"


_TYPE_WORDS = {int: "whole numbers", str: "strings", float: "numbers"}


def _fits(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return (item is str and isinstance(value, str)) or (
            isinstance(value, list) and all(_fits(item, v) for v in value)
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _missing_inputs(plan: list[tuple[int, str, Any, Any]], outs: dict[int, str]) -> list[str]:
    """Paths stages read that neither exist now nor are written by an earlier stage (its ``out``)."""
    problems: list[str] = []
    for number, name, config, _ in plan:
        written = [Path(out) for earlier, out in outs.items() if earlier < number]
        for f in dataclasses.fields(config):
            if not f.metadata.get("path") or f.name == "out":
                continue
            value = getattr(config, f.name)
            for item in value if isinstance(value, tuple) else (value,):
                if item is None:
                    continue
                wanted = Path(item)
                made = any(wanted == out or out in wanted.parents for out in written)
                if not made and not wanted.exists():
                    problems.append(
                        f"stage {number} ({name}): {f.name} {wanted} does not exist and no earlier stage writes it"
                    )
    return problems


@dataclass(frozen=True)
class RunResult(StageResult):
    """A pipeline's run: per stage, its name, seconds and the figures its table entry names (``pipeline.json``).

    Each stage printed its own lines as it ended, so the result prints none."""

    out: str  # the pipeline's root
    stages: tuple[dict[str, Any], ...]

    def __iter__(self) -> Iterator[dict[str, Any]]:  # the stages, as ``run_pipeline``'s list was read
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)


def run_pipeline(config: RunConfig) -> RunResult:
    """Run every stage of a pipeline file in order; returns each stage's brief figures."""
    root, plan = load_pipeline(config.pipeline, config.root, config.accelerator)
    if root.exists() and not root.is_dir():
        raise QuackError(f"the pipeline's root {root} is a file; give it a folder")
    root.mkdir(parents=True, exist_ok=True)
    estimate = estimate_line(plan)
    if estimate:
        print(estimate, flush=True)
    pipeline_started = time.time()
    results = []
    for name, stage_config, function in plan:
        log.info("stage %s", name)
        started = time.time()
        result = function(stage_config)
        lines = result.lines() if result is not None else []
        for line in lines:
            print(line, flush=True)
        if result is not None and result.exit_code:
            raise StrictError(f"stage {name} failed: {lines[-1]}")
        results.append({"stage": name, "seconds": round(time.time() - started, 1), **_brief(name, result)})
    write_atomic(root / "pipeline.json", json.dumps(results, indent=2, default=str) + "\n")
    _print_results(root, results)
    print_written([root], pipeline_started)
    return RunResult(out=str(root), stages=tuple(results))


def _brief(name: str, result: StageResult | None) -> dict[str, Any]:
    figures = result.figures() if result is not None else {}
    return {k: figures[k] for k in PIPELINE_STAGES[name].brief if figures.get(k) is not None}  # measured ones


def _print_results(root: Path, results: list[dict[str, Any]]) -> None:
    print(f"\nquackae pipeline finished; everything is under {root}/")
    for result in results:
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in result.items() if k not in ("stage",))
        print(f"  {result['stage']:>9}: {figures}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run_demo(config: DemoConfig) -> RunResult:
    """Run the shipped ``pipelines/demo.yaml`` end to end into ``config.out``."""
    file = REPO_PIPELINES / "demo.yaml"
    return run_pipeline(RunConfig(pipeline=str(file), root=config.out, accelerator=config.accelerator))


# ---------------------------------------------------------------------------------------------- outputs
def written_files(roots: list[str | Path], since: float) -> list[str]:
    """What was written under ``roots`` since ``since`` (a ``time.time()``), one line each.

    A file is one line; a folder with more than three new files is one line with its counts by
    suffix (``storage/q-store/0/ (4771 .npz, 4771 .png)``), so a store of millions stays short.
    """
    since -= 1.0  # file system clocks are coarser than time.time()
    lines: list[str] = []
    for root in map(Path, roots):
        if root.is_file():
            if root.stat().st_mtime >= since:
                lines.append(str(root))
            continue
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                if entry.stat().st_mtime >= since:
                    lines.append(str(entry))
                continue
            new = [f for f in entry.rglob("*") if f.is_file() and f.stat().st_mtime >= since]
            if len(new) > 3:
                counts = Counter(f.suffix or f.name for f in new)
                kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items()))
                lines.append(f"{entry}/ ({kinds})")
            else:
                lines.extend(str(f) for f in sorted(new))
    return lines


def print_written(roots: list[str | Path], since: float) -> None:
    """Print ``written_files`` as the end of a command's output (nothing when nothing was written)."""
    lines = written_files(roots, since)
    if lines:
        print("files written:\n" + "\n".join(f"  {line}" for line in lines))


# ---------------------------------------------------------------------------------------------- time estimate


def estimate_line(plan: list[tuple[str, Any, Any]]) -> str | None:
    """One line estimating the training time of a pipeline capped by steps, from a step timed now.

    Each train stage with ``max_steps`` gets a few training steps of its model size timed on random
    batches of its batch size, about a third to a half of the prepare stage's ``max_length`` wide (a
    length-bucketed batch of a corpus of short texts; about a second); stages capped only by epochs
    or wall clock are not estimated.
    """
    from quackae.model.trainer import default_precision
    from quackae.runs.budget import OVERHEAD, step_text

    prepare = next((config for name, config, _ in plan if name == "prepare"), None)
    parts, total = [], 0.0
    for name, config, _ in plan:
        if name != "train" or config.max_steps <= 0 or config.accelerator not in ("cpu", "auto"):
            continue
        precision = config.precision or default_precision(config.accelerator, training=True)
        if precision not in ("32-true", "32", "bf16-mixed"):
            continue
        seconds_per_step = _time_step(config, prepare, bf16=precision == "bf16-mixed")
        seconds = config.max_steps * seconds_per_step * OVERHEAD
        total += seconds
        parts.append(f"train {config.max_steps:,} steps ({step_text(seconds_per_step, precision)})")
    if not parts:
        return None
    return f"estimated training time on this machine: about {total / 60:.1f} min for " + ", ".join(parts)


def _time_step(config: Any, prepare: Any, bf16: bool) -> float:
    from quackae.runs.budget import seconds_per_step

    vocab = getattr(prepare, "vocab_size", 8000)
    max_length = getattr(prepare, "max_length", 64)
    model = {"num_embeddings": vocab, **config.model_settings()}  # the model the train stage will build
    return seconds_per_step(model, config.batch_size, max(max_length // 3, 1), max(max_length // 2, 1), bf16=bf16)
