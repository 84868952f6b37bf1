"""Errors that the CLI reports as one line: a user mistake, never a bug."""

from __future__ import annotations


class QuackError(ValueError):
    """A user mistake (bad file, flag, row or checkpoint); the message names it and the fix. Exit code 2.

    A ``ValueError``, so code that checks its arguments the Python way catches it too.
    """


class StrictError(QuackError):
    """A ``--strict`` run refused because rows were rejected. Exit code 1."""


def unpickling_reason(error: BaseException) -> str:
    """The telling line of a ``torch.load(weights_only=True)`` refusal (the global it blocked), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "unsupported global" in line.lower()]
    return (telling or lines or [type(error).__name__])[0]
