"""Real corpora on every machine with Python: docstrings, labelled by top-level module or package.

``stdlib_docstrings``: the first paragraph of each public function's or class's docstring (and
of its public methods') in the standard library, with the module it came from as ``label``.
``site_docstrings``: the same from the source files of the installed site-packages, labelled by
top-level package; it reads the files with ``ast`` and imports nothing, so no package code runs.
Both are built deterministically: modules, files and members are visited in sorted order and
duplicate texts are dropped.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import logging
import pkgutil
import sys
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from quackae.core.results import StageResult

log = logging.getLogger(__name__)

# Modules with side effects on import (a browser, a window, printed text) or nothing to read.
_SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "xxsubtype",
    "xxlimited",
    "xxlimited_35",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "_winapi",
    "nt",
    "__phello__",
    "__hello__",
    "idle",
    "webbrowser",
    "readline",
    "curses",
}


def _first_paragraph(doc: object) -> str | None:
    if not isinstance(doc, str) or not doc:
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    return text if 20 <= len(text) <= 400 else None


def _members(module: object) -> list[object]:
    found = []
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or not (
            inspect.isfunction(member) or inspect.isclass(member) or inspect.isbuiltin(member)
        ):
            continue
        found.append(member)
        if inspect.isclass(member):
            for attr, method in sorted(vars(member).items()):
                if not attr.startswith("_") and (inspect.isfunction(method) or inspect.ismethoddescriptor(method)):
                    found.append(method)
    return found


def _submodules(package: object) -> list[object]:
    """Public submodules one level below a package, imported quietly; those that fail are skipped."""
    found = []
    for info in sorted(pkgutil.iter_modules(getattr(package, "__path__", []) or []), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("tool", "main"):
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                found.append(importlib.import_module(f"{package.__name__}.{info.name}"))
        except Exception:  # noqa: BLE001 - optional parts of the standard library may be missing
            continue
    return found


def stdlib_docstrings(min_per_label: int = 40, max_labels: int = 16) -> list[dict[str, object]]:
    """Rows ``{"id", "text", "label", "module"}`` from the standard library's docstrings.

    ``label`` is the module for the ``max_labels`` modules with the most rows (each with at least
    ``min_per_label``) and None (unlabelled) for the rest; ``module`` is always the module.
    """
    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_") and n not in _SKIP)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in names:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this platform lacks is simply skipped
            continue
        for submodule in [module, *_submodules(module)]:
            for member in _members(submodule):
                origin = str(getattr(member, "__module__", None) or name).lstrip("_").split(".")[0]
                if origin not in (name, "builtins"):
                    continue  # re-exported from another module: counted there
                text = _first_paragraph(getattr(member, "__doc__", None))
                if text and text not in seen:
                    seen.add(text)
                    rows.append((name, text))
    return _label_rows(rows, min_per_label, max_labels)


def _label_rows(rows: list[tuple[str, str]], min_per_label: int, max_labels: int) -> list[dict[str, object]]:
    counts = Counter(label for label, _ in rows)
    labels = {label for label, n in counts.most_common(max_labels) if n >= min_per_label}
    return [
        {"id": i, "text": text, "label": label if label in labels else None, "module": label}
        for i, (label, text) in enumerate(rows)
    ]


def _source_docstrings(tree: ast.Module) -> list[str]:
    """Docstrings of the public classes, functions and methods of a parsed module, in source order."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            found.append(ast.get_docstring(node))
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                        found.append(ast.get_docstring(child))
    return [doc for doc in found if doc]


def site_docstrings(
    min_per_label: int = 200,
    max_labels: int = 24,
    site: str | Path | None = None,
    max_file_bytes: int = 1_000_000,
) -> list[dict[str, object]]:
    """Rows ``{"id", "text", "label", "module"}`` from the docstrings of the installed site-packages.

    Every ``.py`` file under each top-level package of ``site`` (default: this interpreter's
    purelib folder) is parsed with ``ast`` (never imported) and the first paragraph of each public
    class's, function's and method's docstring becomes a row; ``module`` is the top-level package,
    ``label`` is that package for the ``max_labels`` packages with the most rows (each with at least
    ``min_per_label``) and None for the rest. Test folders, private packages and files over
    ``max_file_bytes`` are skipped.
    """
    root = Path(site) if site is not None else Path(sysconfig.get_paths()["purelib"])
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for package in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        name = package.name
        if name.startswith("_") or name in _SKIP or not name.isidentifier():
            continue
        for file in sorted(package.rglob("*.py")):
            parts = file.relative_to(package).parts
            if any(part in ("tests", "test", "testing") or part.startswith("_test") for part in parts):
                continue
            try:
                if file.stat().st_size > max_file_bytes:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(file.read_bytes(), filename=str(file))
            except (OSError, SyntaxError, ValueError):
                continue  # unreadable or not Python this interpreter parses
            for doc in _source_docstrings(tree):
                text = _first_paragraph(doc)
                if text and text not in seen:
                    seen.add(text)
                    rows.append((name, text))
    return _label_rows(rows, min_per_label, max_labels)


def write_jsonl(rows: list[dict[str, object]], path: str | Path) -> Path:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return file


@dataclass(frozen=True)
class CorpusConfig:
    out: str = field(default="corpus.jsonl", metadata={"path": True, "help": "JSONL file to write"})
    min_per_label: int = field(default=40, metadata={"help": "drop modules with fewer docstrings"})
    max_labels: int = field(default=16, metadata={"help": "keep the modules with the most docstrings"})

    def __post_init__(self) -> None:
        if self.min_per_label < 1 or self.max_labels < 2:
            raise ValueError("min_per_label must be at least 1 and max_labels at least 2")


@dataclass(frozen=True)
class CorpusResult(StageResult):
    """The corpus file written: its rows, how many carry a label, and how many labels."""

    out: str
    rows: int
    labelled: int
    labels: int


def build_corpus(config: CorpusConfig) -> CorpusResult:
    """Write the standard-library docstring corpus as JSONL (``id``, ``text``, ``label``)."""
    rows = stdlib_docstrings(config.min_per_label, config.max_labels)
    write_jsonl(rows, config.out)
    labels = Counter(str(row["label"]) for row in rows if row["label"] is not None)
    log.info(
        "wrote %d docstrings (%d labelled, %d labels) to %s", len(rows), sum(labels.values()), len(labels), config.out
    )
    return CorpusResult(out=str(config.out), rows=len(rows), labelled=sum(labels.values()), labels=len(labels))
