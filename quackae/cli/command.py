"""The ``quackae`` console script: one subcommand per stage, each built from the stage's config dataclass.

Every flag comes from a field of a frozen config dataclass (its ``help`` metadata becomes the
``--help`` text and its default the flag's default), so a stage runs the same from Python, from
``quackae`` and from a pipeline file. User mistakes (see ``user_error``) become one line
on stderr and exit code 2; a refused ``--strict`` run exits 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import pickle
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

from quackae import __version__
from quackae.core.errors import StrictError, unpickling_reason
from quackae.core.ranks import global_rank
from quackae.stages.table import STAGES, add_config_arguments, config_from_namespace

log = logging.getLogger(__name__)

COMMANDS = STAGES  # every command is a stage of the one table in quackae.stages


def _load(name: str) -> tuple[type, Callable[[Any], Any]]:
    return COMMANDS[name].load()


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="quackae",
        description="Turn a text corpus into stored, fixed-size learned encodings.",
    )
    parser.add_argument("--version", action="version", version=f"quackae {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    verbose_help = "also show the libraries' start-up notices and warnings, which quackae hides otherwise"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    parser.command = command
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, stage in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=stage.help, description=stage.help)
        sub_parser.add_argument(  # after the command too; absent there, the value before the command stands
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
        if name == command:
            add_config_arguments(sub_parser, stage.load_config())
            if name == "bench":
                sub_parser.add_argument(
                    "--json", action="store_true", help="print the figures as one JSON object on the last line"
                )
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
    return None


class _RankZeroFilter(logging.Filter):
    """Under DDP only rank 0 reports progress; warnings and errors come from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or global_rank() == 0


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RankZeroFilter())


class _OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr (naming the flag and pointing at the command's own ``--help``)
    and exit 2."""

    command: str | None = None  # the subcommand on the line, whose --help an error points at

    def error(self, message: str) -> typing.NoReturn:
        prog = f"{self.prog} {self.command}" if self.command and self.prog == "quackae" else self.prog
        self.exit(2, f"{prog}: error: {message} (see {prog} --help)\n")


# OSErrors that come from the user's paths or machine (full disk, no permission, a file where a
# folder belongs ...), not from a bug: reported as one line.
_USER_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOENT,
    errno.ENAMETOOLONG,
}


def user_error(error: BaseException) -> str | None:
    """The one line to print for a user mistake, or None for a bug (which stays a traceback).

    User mistakes: ``QuackError`` and ``ValueError`` (checked flags, files, rows, checkpoints),
    Lightning's ``MisconfigurationException`` (a Trainer setting this machine cannot honour), a file
    refused by the safe unpickler, and the ``OSError``s in ``_USER_ERRNOS``.
    """
    misconfiguration = getattr(
        sys.modules.get("lightning_fabric.utilities.exceptions"), "MisconfigurationException", None
    )
    if isinstance(error, ValueError) or (misconfiguration is not None and isinstance(error, misconfiguration)):
        text = str(error)
    elif isinstance(error, pickle.UnpicklingError):
        text = f"refused to load a file that holds more than tensors and plain values: {unpickling_reason(error)}"
    elif isinstance(error, OSError) and error.errno in _USER_ERRNOS:
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        text = f"{error.strerror or error}: {where}" if where else str(error)
        if error.errno == errno.EEXIST:
            text += " (choose another path)"
    else:
        return None
    return " ".join(text.split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from quackae.core.process import apply_thread_policy

    threads = apply_thread_policy()  # before any stage imports torch
    try:
        return _main(list(sys.argv[1:] if argv is None else argv), threads)
    except KeyboardInterrupt:  # Ctrl-C while the command's modules were still loading
        print("quackae: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str], threads: dict[str, str] | None = None) -> int:
    command = _command_of(argv)
    parser = build_parser(command)
    namespace = parser.parse_args(argv)
    if namespace.command is None:
        parser.print_help()
        return 2
    setup_logging(namespace.log_level)
    if threads and "OMP_NUM_THREADS" in threads:
        count = threads["OMP_NUM_THREADS"]
        log.info("other work holds cores: %s torch thread(s) (set OMP_NUM_THREADS to choose)", count)
    from quackae.core.process import process_settings

    if not namespace.verbose:
        from quackae.cli.quiet import quiet_libraries

        quiet_libraries()
    started = time.time()
    try:
        config_cls, function = _load(namespace.command)
        config = config_from_namespace(config_cls, namespace)
        with process_settings(COMMANDS[namespace.command].settings):  # the stage's modules are loaded by now
            result = function(config)
    except KeyboardInterrupt:
        print(f"quackae {namespace.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        print(f"quackae {namespace.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, StrictError) else 2
    if result is None:  # a rank of a DDP job other than 0: rank 0 reports
        return 0
    for line in result.lines():
        print(line)
    if namespace.command == "bench" and namespace.json:
        print(json.dumps(result.figures(), sort_keys=True))
    out = getattr(namespace, "out", None) or result.written
    if namespace.command not in ("run", "demo") and isinstance(out, str) and global_rank() == 0:
        from quackae.stages.pipeline import print_written

        print_written([out], started)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
