"""The module rules a contributor relies on: stages stand apart, one table, no module past a few hundred lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from quackae import cli, pipeline
from quackae.stages import PIPELINE_STAGES, STAGES

PACKAGE = Path(__file__).resolve().parent.parent / "quackae"
# Modules that run other stages by design: the pipeline runner and the benchmarks.
RUNNERS = {"quackae.pipeline", "quackae.bench"}
STAGE_MODULES = sorted({stage.module for stage in STAGES.values()} - RUNNERS)


def imported_modules(module: str) -> set[str]:
    """Every ``quackae.*`` module ``module`` imports, at the top or inside a function."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        path = PACKAGE.joinpath(*module.split(".")[1:], "__init__.py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quackae"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("quackae"))
    return found


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_no_stage_module_imports_another(module):
    others = set(STAGE_MODULES) - {module}
    assert not imported_modules(module) & others, f"{module} imports stage modules {imported_modules(module) & others}"


def test_command_line_and_pipelines_share_one_table_of_stages():
    assert cli.COMMANDS is STAGES
    assert pipeline.PIPELINE_STAGES is PIPELINE_STAGES
    for name, stage in STAGES.items():
        config_cls, function = stage.load()
        assert callable(function) and config_cls.__dataclass_params__.frozen, name


def test_no_module_grows_past_a_few_hundred_lines():
    sizes = {p.relative_to(PACKAGE.parent): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 480, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_model_defaults_live_in_model_config():
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.config import ModelConfig
    from quackae.train import TrainConfig

    model = QuackAutoEncoder(32)
    train = TrainConfig()
    for name, value in vars(ModelConfig(num_embeddings=32)).items():
        assert model.hparams[name] == value, name
        if hasattr(train, name):
            assert getattr(train, name) == value, name
