"""The module rules a contributor relies on: packages in layers, stages stand apart, one table, short modules,
and a command line that answers ``--help`` and flag errors without loading the heavy libraries."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quackae import cli
from quackae.stages import PIPELINE_STAGES, STAGES
from quackae.stages import pipeline as pipeline_module

PACKAGE = Path(__file__).resolve().parent.parent / "quackae"
MAX_LINES = 400
HEAVY = ("torch", "pytorch_lightning", "lightning", "datasets", "pyarrow")


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_of(path): path for path in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = sorted(name.split(".")[1] for name, path in MODULES.items() if path.name == "__init__.py" and "." in name)
STAGE_MODULES = sorted(
    name for name in MODULES if name.startswith("quackae.stages.") and name not in ("quackae.stages.table",)
)


def imported_modules(module: str) -> set[str]:
    """Every ``quackae.*`` module ``module`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "quackae":
            assert all(alias.name == "__version__" for alias in node.names), f"{module} imports the public face"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quackae"):
            found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES
            )
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("quackae"))
    return found


def allowed_packages(package: str) -> set[str]:
    """The packages ``package``'s ``__init__`` docstring says it may import (``May import: ...``)."""
    doc = ast.get_docstring(ast.parse(MODULES[f"quackae.{package}"].read_text())) or ""
    match = re.search(r"May import:(.*?)(?:\n\n|$)", doc, re.S)
    assert match, f"quackae/{package}/__init__.py's docstring does not say what it may import"
    return set(re.findall(r"quackae\.(\w+)", match.group(1)))


def test_every_package_says_what_it_owns_and_what_it_may_import():
    assert set(PACKAGES) >= {"core", "data", "model", "runs", "store", "eval", "viz", "stages", "cli", "bench"}
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse(MODULES[f"quackae.{package}"].read_text())) or ""
        assert len(doc.split()) >= 10, package
        allowed_packages(package)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_packages_it_names(package):
    allowed = allowed_packages(package) | {package}
    for module in (name for name in MODULES if name.startswith(f"quackae.{package}.") or name == f"quackae.{package}"):
        for imported in imported_modules(module):
            parts = imported.split(".")
            assert len(parts) > 1 and parts[1] in allowed, (
                f"{module} imports {imported}; {package} may import {allowed}"
            )


def test_the_layers_have_no_cycle():
    graph = {package: allowed_packages(package) - {package} for package in PACKAGES}
    done: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"packages import each other: {' -> '.join((*path, package))}"
        if package not in done:
            for other in graph.get(package, ()):
                visit(other, (*path, package))
            done.add(package)

    for package in PACKAGES:
        visit(package, ())


def test_top_level_holds_only_the_public_face():
    top = sorted(name for name, path in MODULES.items() if name.count(".") == 1 and path.name != "__init__.py")
    assert top == ["quackae.__main__"], top


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_no_stage_module_imports_another(module):
    others = set(STAGE_MODULES) - {module, "quackae.stages.configs"}
    assert not imported_modules(module) & others, f"{module} imports stage modules {imported_modules(module) & others}"


def test_command_line_and_pipelines_share_one_table_of_stages():
    assert cli.COMMANDS is STAGES
    assert pipeline_module.PIPELINE_STAGES is PIPELINE_STAGES
    for name, stage in STAGES.items():
        config_cls, function = stage.load()
        assert callable(function) and config_cls.__dataclass_params__.frozen, name
        assert stage.load_config() is config_cls, name


def test_no_module_grows_past_a_few_hundred_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


_PARSERS = """
import sys
from quackae.cli import build_parser
from quackae.stages import STAGES
for name in STAGES:
    build_parser(name)
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print(",".join(heavy))
"""


def test_every_subcommand_parser_builds_without_the_heavy_libraries():
    """``--help`` and flag errors of every command are answered before torch, Lightning, datasets or pyarrow load."""
    done = subprocess.run(
        [sys.executable, "-c", _PARSERS.format(heavy=HEAVY)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"building the parsers imported {done.stdout.strip()}"


def test_a_flag_error_names_the_subcommands_help_and_loads_no_heavy_library():
    code = (
        "import sys\nfrom quackae.cli import main\n"
        "try:\n    main(['train', 'data', '--max-stepz', '3'])\nexcept SystemExit as stop:\n    code = stop.code\n"
        f"print(code, sorted(n for n in {HEAVY!r} if n in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[-2] == "2 []", done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--max-stepz" in line and line.endswith("(see quackae train --help)"), line


def test_model_defaults_live_in_model_config():
    from quackae.model.autoencoder import QuackAutoEncoder
    from quackae.model.config import ModelConfig
    from quackae.stages.train import TrainConfig

    model = QuackAutoEncoder(32)
    train = TrainConfig()
    for name, value in vars(ModelConfig(num_embeddings=32)).items():
        assert model.hparams[name] == value, name
        if hasattr(train, name):
            assert getattr(train, name) == value, name


def test_the_wheel_lists_every_package_and_ships_the_pipelines():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(project["packages"]) == packages | {"quackae.pipelines"}
    assert project["package-dir"]["quackae.pipelines"] == "pipelines"
    assert (PACKAGE.parent / "pipelines" / "demo.yaml").is_file()
    assert pipeline_module.REPO_PIPELINES == PACKAGE.parent / "pipelines"  # a checkout reads its own folder


def test_the_test_files_follow_the_packages():
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders <= set(PACKAGES), folders - set(PACKAGES)  # tests/PACKAGE/ for each package's tests
    at_top = sorted(p.name for p in tests.glob("test_*.py"))
    # the top holds only what spans every package: the layering, the README's promises, earlier versions' files
    assert at_top == ["test_architecture.py", "test_legacy.py", "test_readme_claims.py"], at_top
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))  # one module name each: pytest imports them by their file name
