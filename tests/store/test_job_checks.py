"""What keeps the ranks of one encode job from mixing a store: a joining rank refuses other inputs than its
leader's, and the store is marked complete only when it holds every selected id exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quackae.core.errors import QuackError
from quackae.store.job import _check_joined, complete_manifest
from quackae.store.layout import layout_named
from quackae.store.manifest import PROVENANCE_KEYS

STORE = Path(__file__).resolve().parents[1] / "legacy" / "store-ee38aa6" / "store-shards"


@pytest.fixture()
def store(tmp_path) -> Path:
    return Path(shutil.copytree(STORE, tmp_path / "store"))


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("text", False, "another text setting"),
        ("layout", "files", "another layout"),
        ("dataset_fingerprint", "0" * 64, "another dataset"),
        ("checkpoint_sha256", "1" * 64, "another model"),
        ("selection", {"filtered": True, "label_field": "label"}, "another selection"),
    ],
)
def test_a_rank_joining_with_other_inputs_than_its_leader_refuses_in_one_line(store, key, value, words):
    header = {k: _manifest(store)[k] for k in PROVENANCE_KEYS}
    _check_joined(store, header)  # the leader's own inputs: joins
    with pytest.raises(QuackError) as refused:
        _check_joined(store, {**header, key: value})
    message = str(refused.value)
    assert "\n" not in message and key in message and "start every rank with the same command" in message
    assert words.split()[0] in message


def test_a_store_missing_or_repeating_a_selected_id_is_not_marked_complete(store):
    manifest = _manifest(store)
    ids = np.asarray(sorted(int(i) for i in _ids(store)), dtype=np.int64)  # the 40 ids the store holds
    fields = {k: v for k, v in manifest.items() if k not in ("complete", "items", "ids_sha256", "written_at")}
    layout = layout_named("shards")
    before = (store / "manifest.json").read_bytes()
    with pytest.raises(QuackError, match="holds 40 of the 41 items its selection keeps \\(1 missing"):
        complete_manifest(store, layout, None, fields, manifest["selection"], "j", expected=np.append(ids, 10**6))
    with pytest.raises(QuackError, match="not marked complete"):  # a unit holding an id outside the selection
        complete_manifest(store, layout, None, fields, manifest["selection"], "j", expected=ids[1:])
    assert (store / "manifest.json").read_bytes() == before  # nothing marked
    done = complete_manifest(store, layout, None, fields, manifest["selection"], "j", expected=ids)
    assert done["complete"] is True and done["items"] == 40


def _ids(store: Path) -> list[int]:
    from quackae import EncodingStore

    return list(EncodingStore(store).ids())


def test_a_rank_whose_leader_never_locks_says_so_then_gives_up_in_one_line(tmp_path, monkeypatch, caplog):
    """A rank started with another --out than rank 0 waits for a leader that never comes: it warns while it waits
    and then refuses, naming the flag (no silent hang)."""
    import logging

    from quackae.store import job

    monkeypatch.setattr(job, "SAY_WAITING_S", 0.1)
    caplog.set_level(logging.WARNING)
    (tmp_path / "store").mkdir()
    with pytest.raises(QuackError) as refused:
        job._wait_for_a_holder(tmp_path / "store", 0.5)
    assert "waited 0 s for rank 0 to lock" in str(refused.value) and "the same --out" in str(refused.value)
    assert [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()], caplog.text


def test_an_encode_refused_for_its_rank_count_leaves_no_store_behind(tmp_path, capsys):
    from quackae.cli.command import main

    legacy = STORE.parent
    out = tmp_path / "store"
    args = ["encode", str(legacy / "prepared"), "--model", str(legacy / "run"), "--out", str(out)]
    assert main([*args, "--accelerator", "cpu", "--devices", "99"]) == 2
    assert "--devices 99 would start 99 processes" in capsys.readouterr().err
    assert not out.exists()  # refused before the store was made: no incomplete header for verify to report


def test_a_rank_gone_at_the_end_of_job_barrier_is_one_line_not_the_process_group_s_traceback():
    from types import SimpleNamespace

    from quackae.store.job import every_rank_done

    def barrier(name):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:22182.\nGLHF")

    with pytest.raises(QuackError) as stopped:
        every_rank_done(SimpleNamespace(strategy=SimpleNamespace(barrier=barrier)))
    message = str(stopped.value)
    assert "\n" not in message and "another rank of this encode job stopped" in message
    assert "Connection closed by peer" in message and "run the same command on every rank again" in message
    every_rank_done(SimpleNamespace(strategy=SimpleNamespace(barrier=lambda name: None)))  # every rank there
