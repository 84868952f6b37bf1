"""Every command's stage function returns a typed result: a frozen dataclass of figures, whose lines and exit
status are drawn from those figures."""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest

from quackae.core.results import StageResult
from quackae.stages.table import STAGES


def _result_classes(hint: object) -> set[object]:
    """The classes a return annotation names (a union's members; None dropped)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return {member for member in typing.get_args(hint) if member is not type(None)}
    return {hint}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_command_returns_a_frozen_result_dataclass(name):
    _, function = STAGES[name].load()
    returned = _result_classes(typing.get_type_hints(function)["return"])
    for cls in returned:
        assert isinstance(cls, type) and issubclass(cls, StageResult), (name, cls)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, (name, cls)
        for field in dataclasses.fields(cls):
            assert field.name not in ("lines", "exit_code"), (name, field.name)  # drawn from figures, not carried


def test_a_result_reads_as_the_dict_results_did_and_dumps_to_json():
    from quackae.stages.export import ExportResult

    result = ExportResult(out="all.parquet", store="store", rows=3)
    assert result.rows == 3 and result["rows"] == 3 and result.get("rows") == 3 and "rows" in result
    assert result.get("items") is None and result.get("items", 7) == 7 and "items" not in result
    with pytest.raises(KeyError):
        result["items"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rows = 4  # type: ignore[misc]
    assert json.loads(json.dumps(result.figures())) == {"out": "all.parquet", "store": "store", "rows": 3}
    assert result.lines() == ["exported 3 items from store to all.parquet"]
    assert result.exit_code == 0 and result.written == "all.parquet"


def test_verify_fails_the_command_from_its_problem_count_and_lists_each_problem():
    from quackae.stages.verify import VerifyResult

    ok = VerifyResult(store="s", layout="shards", units=2, items=9, data=None, expected=None, problems=0, details=())
    assert ok.exit_code == 0 and ok.lines() == ["s: ok, 9 items in 2 shards"]
    details = ("s/shards/a.parquet: does not parse (truncated)", "s: id 4: missing (in p, not stored)")
    bad = dataclasses.replace(ok, data="p", expected=10, problems=2, details=details)
    assert bad.exit_code == 1
    assert bad.lines() == [*details, "s: 2 problems (9 items in 2 shards, 10 expected from p)"]
    assert json.loads(json.dumps(bad.figures()))["details"] == list(details)


def test_the_command_line_prints_the_result_lines_and_exits_with_its_status(monkeypatch, capsys):
    from quackae.cli import command
    from quackae.stages.verify import VerifyResult

    bad = VerifyResult(
        store="s", layout="shards", units=1, items=1, data=None, expected=None, problems=1, details=("x",)
    )
    monkeypatch.setitem(command.COMMANDS, "verify", dataclasses.replace(STAGES["verify"]))
    monkeypatch.setattr(command, "_load", lambda name: (STAGES[name].load_config(), lambda config: bad))
    assert command.main(["verify", "s"]) == 1
    assert capsys.readouterr().out.splitlines() == ["x", "s: 1 problems (1 items in 1 shards)"]


def test_train_results_lines_follow_its_figures():
    from quackae.stages.train import SKIPPED_GREEDY, TrainResult

    common = {"run": "r", "stop_reason": "max_steps", "stop_detail": "--max-steps 5 reached", "global_step": 5}
    result = TrainResult(**common, epochs=1, validations=0, test_items=40, last_checkpoint="r/checkpoints/last.ckpt")
    lines = result.lines()
    assert lines[0] == "training stopped: --max-steps 5 reached at step 5 (0 validations in this start)"
    assert lines[1].startswith("no validation ran before the stop") and "last.ckpt" in lines[1]
    assert lines[2] == "no checkpoint was written: training stopped before its first step"  # none evaluated
    scored = dataclasses.replace(
        result,
        best_checkpoint="r/checkpoints/best.ckpt",
        evaluated_checkpoint="r/checkpoints/best.ckpt",
        greedy_sampled=20,
        greedy_items=12,
        greedy_token_accuracy=0.5,
        greedy_exact_match=0.25,
    )
    lines = scored.lines()
    assert len(lines) == 2 and "of 12 sampled of 40 test items; 8 sampled left unscored" in lines[1]
    assert "greedy token accuracy 0.500, exact match 0.250 (best checkpoint r/checkpoints/best.ckpt)" in lines[1]
    skipped = dataclasses.replace(scored, greedy_items=0, greedy_token_accuracy=None, greedy_skipped=SKIPPED_GREEDY)
    assert skipped.lines()[-1] == f"held-out greedy reconstruction skipped: {SKIPPED_GREEDY}"
    figures = scored.figures()
    assert figures["token_accuracy"] == 0.5 and figures["exact_match"] == 0.25  # the first summaries' names


def test_every_public_stage_function_s_result_is_a_public_name():
    import quackae

    for name in ("prepare", "train", "encode", "reconstruct", "verify", "export", "classify", "plot", "run_pipeline"):
        function = getattr(quackae, name)
        for cls in _result_classes(typing.get_type_hints(function)["return"]):
            assert getattr(quackae, cls.__name__) is cls, (name, cls)
