"""Errors that the CLI reports as one line: a user mistake, never a bug."""

from __future__ import annotations


class QuackError(Exception):
    """A user mistake (bad file, flag, row or checkpoint); the message names it and the fix. Exit code 2."""


class StrictError(QuackError):
    """A ``--strict`` run refused because rows were rejected. Exit code 1."""
