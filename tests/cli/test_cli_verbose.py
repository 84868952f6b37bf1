"""``--verbose`` is read before the command and after it alike."""

from __future__ import annotations

import pytest

from quackae.cli.command import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_verbose_is_accepted_before_and_after_every_command(command):
    positional = ["x"] * sum(
        1 for action in build_parser(command)._subparsers._group_actions[0].choices[command]._actions
        if not action.option_strings
    )  # fmt: skip
    parse = build_parser(command).parse_args
    assert parse([command, *positional]).verbose is False
    assert parse(["--verbose", command, *positional]).verbose is True
    assert parse([command, *positional, "--verbose"]).verbose is True
    assert parse(["--verbose", command, "--verbose", *positional]).verbose is True


def test_verbose_after_the_command_turns_the_library_notices_on(tmp_path, monkeypatch, capsys):
    import quackae.cli.quiet as quiet

    calls = []
    monkeypatch.setattr(quiet, "quiet_libraries", lambda: calls.append("quiet"))
    missing = str(tmp_path / "missing")
    assert main(["verify", missing, "--verbose"]) == 2  # a one-line refusal, not a flag error
    assert calls == [] and "unrecognized" not in capsys.readouterr().err
    assert main(["verify", missing]) == 2
    assert calls == ["quiet"]
