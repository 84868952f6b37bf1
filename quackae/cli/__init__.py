"""The ``quackae`` command line: one subcommand per stage of ``quackae.stages``' table.

Owns: the parser built from the stages' config dataclasses, the one error boundary that turns a user
mistake into one line and exit code 2 (``command``), and the library notices a user cannot act on, hidden
unless ``--verbose`` (``quiet``). Building the parser imports no torch, Lightning, datasets or pyarrow.

May import: quackae.core, quackae.stages.
"""

from quackae.cli.command import COMMANDS, build_parser, main, user_error

__all__ = ["COMMANDS", "build_parser", "main", "user_error"]
