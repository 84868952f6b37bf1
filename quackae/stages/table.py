"""The one table of quackae's stages and commands, read by the command line and by ``quackae run``.

Each entry names the module, its frozen config dataclass and its stage function; modules are
imported only when their command runs, so ``quackae --help`` and a mistyped command stay fast.
A stage function never prints: it returns a typed result (a frozen dataclass of figures,
``quackae.core.results.StageResult``; ``quackae run`` records them in ``pipeline.json``) whose ``lines()``
the command line prints and whose ``exit_code`` it exits with; ``brief`` names the figures a pipeline shows
in its closing table.

``add_config_arguments`` is the one way a config is built from strings: one flag per field of its dataclass,
typed by the field, for the command line and for ``quackae bench --option NAME=VALUE`` alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONFIGS = "quackae.stages.configs"


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    function: str
    help: str
    pipeline: bool = False  # whether a pipeline file may list it
    brief: tuple[str, ...] = ()  # the figures ``quackae run`` shows for it

    config_module: str = CONFIGS  # where the config class lives: a module that imports no heavy library
    # process settings (quackae.core.process) the command line applies around this stage, where measured to pay
    settings: tuple[str, ...] = ()

    def load_config(self) -> type:
        """The config class alone: what the command line needs for ``--help`` and flag errors."""
        return getattr(importlib.import_module(self.config_module), self.config)

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        """``(config class, stage function)``, importing the stage's module now."""
        return self.load_config(), getattr(importlib.import_module(self.module), self.function)


STAGES: dict[str, Stage] = {
    "corpus": Stage(
        "quackae.data.corpus",
        "CorpusConfig",
        "build_corpus",
        "write the standard-library docstring corpus as JSONL",
        pipeline=True,
        config_module="quackae.data.corpus",
        brief=("out", "rows", "labelled", "labels"),
    ),
    "prepare": Stage(
        "quackae.stages.prepare",
        "PrepareConfig",
        "prepare",
        "tokenize a text corpus into a prepared dataset",
        pipeline=True,
        brief=("out", "rows_read", "rows_kept", "rejected_total", "truncated", "vocab_size"),
    ),
    "train": Stage(
        "quackae.stages.train",
        "TrainConfig",
        "train",
        "train a QuackAutoEncoder on a prepared dataset",
        pipeline=True,
        brief=(
            "run",
            "global_step",
            "stop_reason",
            "best_val_loss",
            "greedy_token_accuracy",
            "greedy_exact_match",
            "teacher_forced_val_token_accuracy",
            "greedy_items",
            "test_items",
            "greedy_skipped",
        ),
    ),
    "encode": Stage(
        "quackae.stages.encode",
        "EncodeConfig",
        "encode",
        "store one encoding per item of a prepared dataset",
        pipeline=True,
        brief=("store", "items_written", "items_skipped", "encoding_size", "items_per_s"),
        # glibc's defaults fault in the GRU's per-step blocks afresh (1-2 s of system time per 10,000 items) and
        # the predict loop's objects set off full collections of the loaded heap (a tenth of a third of runs)
        settings=("keep_freed_memory", "settled_heap"),
    ),
    "reconstruct": Stage(
        "quackae.stages.reconstruct",
        "ReconstructConfig",
        "reconstruct",
        "print texts beside their greedy reconstructions",
    ),
    "verify": Stage(
        "quackae.stages.verify", "VerifyConfig", "verify", "check a store and list every problem", pipeline=True
    ),
    "export": Stage(
        "quackae.stages.export",
        "ExportConfig",
        "export",
        "export an encoding store to one Parquet file",
        pipeline=True,
        brief=("out", "rows"),
    ),
    "classify": Stage(
        "quackae.stages.classify",
        "ClassifyConfig",
        "classify",
        "train a classifier on stored encodings",
        pipeline=True,
        brief=(
            "out",
            "accuracy",
            "macro_f1",
            "majority_accuracy",
            "linear_probe_accuracy",
            "bag_of_tokens_accuracy",
        ),
    ),
    "bench": Stage(
        "quackae.bench",
        "BenchConfig",
        "run_bench",
        "measure throughput and quality on data it makes",
        config_module="quackae.bench",
    ),
    "plot": Stage("quackae.stages.plot", "PlotConfig", "plot", "draw RUN/curves.png: training and validation curves"),
    "run": Stage("quackae.stages.pipeline", "RunConfig", "run_pipeline", "run the stages a pipeline file lists"),
    "demo": Stage("quackae.stages.pipeline", "DemoConfig", "run_demo", "run pipelines/demo.yaml end to end"),
}

PIPELINE_STAGES = {name: stage for name, stage in STAGES.items() if stage.pipeline}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one argument per field of the dataclass ``config_cls``; ``positional`` metadata makes it positional."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        kind = hints[f.name]
        help_text = meta.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        origin = typing.get_origin(kind)
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = origin in (typing.Union, types.UnionType) and len(args) == 1
        base = args[0] if optional else kind
        if typing.get_origin(base) in (tuple, list):
            item = typing.get_args(base)[0]
            if meta.get("positional"):
                parser.add_argument(
                    f.name, nargs="+" if f.default_factory is dataclasses.MISSING else "*", type=item, help=help_text
                )
            else:
                parser.add_argument(
                    _flag(f.name), nargs="*", type=item, default=default, help=f"{help_text} (default: {default})"
                )
            continue
        if meta.get("positional"):
            parser.add_argument(f.name, type=base, help=help_text)
            continue
        if base is bool:
            parser.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} (default: {default})",
            )
            continue
        parser.add_argument(
            _flag(f.name),
            type=base,
            default=default,
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            help=f"{help_text} (default: {default})",
        )


def config_from_namespace(config_cls: type, namespace: argparse.Namespace) -> Any:
    values = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(namespace, f.name)
        if isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return config_cls(**values)
