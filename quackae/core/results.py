"""What a stage function returns: a frozen dataclass of typed figures, one class per command.

A result is data: its fields are the figures a stage measured (``quackae run`` records them in
``pipeline.json``, ``train`` and ``prepare`` write them to ``summary.json`` and ``prepare.json``). What a
person reads is drawn from those fields by ``lines()``, and whether the command failed by ``exit_code``,
so neither travels as a value of its own. ``result["name"]`` and ``result.get("name")`` read a figure as
the dict results of quackae 0.1's first releases allowed; new code reads the attribute.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class StageResult:
    """The base of every stage's result: no figures of its own."""

    def lines(self) -> list[str]:
        """What the command prints when the stage ends (nothing unless the stage says otherwise)."""
        return []

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0 unless the stage found something wrong (``verify``)."""
        return 0

    @property
    def written(self) -> str | None:
        """The folder or file the stage wrote, whose new files the command lists; None when it wrote none."""
        out = getattr(self, "out", None)
        return str(out) if out is not None else None

    def figures(self) -> dict[str, Any]:
        """The fields as plain JSON values (tuples become lists), in field order."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __getitem__(self, name: str) -> Any:
        if name in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, name)
        return self.figures()[name]  # a figure a result adds to its fields (KeyError when none)

    def __contains__(self, name: object) -> bool:
        return name in self.figures()

    def get(self, name: str, default: Any = None) -> Any:
        """A field's value by name, or ``default`` when the result has no such field."""
        try:
            return self[name]
        except KeyError:
            return default


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
