"""Reading a YAML file (pipeline files, a RUN's ``config.yaml``) safely and in bounded time.

``yaml.safe_load`` never runs code, but aliases let a small file stand for a huge value: nine
anchors of nine aliases each are a 1.6 KB file whose value has 9**9 leaves (a "billion laughs"),
and an alias inside its own anchor is a cycle that never ends when walked. ``read_yaml`` composes
the document first and refuses one whose values, counted with every alias expanded, are more
than ``MAX_YAML_VALUES``, or whose aliases form a cycle, before building any Python object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quackae.core.errors import QuackError
from quackae.core.files import read_text

# The most values (mappings, lists, keys and scalars, every alias expanded) a YAML file quackae reads may
# stand for: a pipeline file or a run's config.yaml has a few hundred.
MAX_YAML_VALUES = 100_000
# The largest YAML file read.
MAX_YAML_FILE = 1 << 20


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def expanded_size(root: yaml.Node, limit: int = MAX_YAML_VALUES) -> int:
    """How many values ``root`` stands for with every alias expanded; ``_Refused`` past ``limit`` or on a cycle.

    Walks the node graph once (an alias is the very node its anchor names, so sizes are remembered per
    node), without recursion.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            size = 1 + sum(sizes[id(child)] for child in children)
            if size > limit:
                raise _Refused(f"its aliases expand to more than {limit:,} values (nested aliases)")
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _Refused("an alias refers to a value that contains it (an alias cycle)")
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise _Refused("an alias refers to a value that contains it (an alias cycle)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_unique_keys(root: yaml.Node, loader: yaml.SafeLoader) -> None:
    """``_Refused`` naming the lines when a mapping anywhere under ``root`` has a key twice (YAML forbids it; a
    loader would keep the last silently). Keys are compared as the values they stand for (``1`` and ``0x1`` are
    one key); ``<<`` merge keys are not keys of their own."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        stack.extend(_children(node))
        if not isinstance(node, yaml.MappingNode):
            continue
        first_line: dict[Any, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            value = loader.construct_object(key)
            line = key.start_mark.line + 1
            if value in first_line:
                raise _Refused(f"key {value!r} appears twice, at lines {first_line[value]} and {line} (keep one)")
            first_line[value] = line


def parse_yaml(text: str, name: str | Path = "<text>") -> Any:
    """The value of one YAML document, refusing one that aliases blow up or loop (see the module docstring)
    or that has a key twice in one mapping.

    Raises ``_Refused`` or ``yaml.YAMLError``; ``read_yaml`` turns both into one ``QuackError``.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        _check_unique_keys(node, loader)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "file", fix: str = "", expect: type | tuple[type, ...] = dict) -> Any:
    """A YAML file's value, which must be an ``expect`` (a mapping by default); each problem is one
    ``QuackError`` naming the file: not a regular file, not UTF-8, not YAML, aliases that blow up or loop,
    nesting too deep, or a value of another shape."""
    text = read_text(path, what, fix, limit=MAX_YAML_FILE)

    def refuse(reason: str) -> QuackError:
        return QuackError(f"{what} {path} {reason}; {fix}" if fix else f"{what} {path} {reason}")

    try:
        value = parse_yaml(text, path)
    except _Refused as error:
        raise refuse(f"is refused: {error.reason}") from None
    except yaml.YAMLError as error:
        first = " ".join(str(error).split("\n")[:1]) or type(error).__name__
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise refuse(f"is not valid YAML{where} ({first.strip()})") from None
    except RecursionError:
        raise refuse("is nested too deeply") from None
    if not isinstance(value, expect):
        wanted = " or ".join(_NAMES.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,)))
        got = "nothing" if value is None else _NAMES.get(type(value), type(value).__name__)
        raise refuse(f"holds {got}, not {wanted}")
    return value


_NAMES = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
