"""What the README promises about prepare, train and the writer, each checked here."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from quackae.cli import main

LEGACY = Path(__file__).resolve().parent / "legacy" / "store-ee38aa6"


def _words(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "duck goose swan apple pear plum river stone".split()
    return [" ".join(rng.choice(words, size=5)) for _ in range(count)]


def test_a_rerun_into_a_store_of_another_dataset_is_refused_in_one_line(tmp_path, capsys):
    for name in ("prepared", "run"):
        shutil.copytree(LEGACY / name, tmp_path / name)
    store = tmp_path / "store"
    encode = ["encode", "--model", str(tmp_path / "run"), "--out", str(store)]
    assert main([*encode[:1], str(tmp_path / "prepared"), *encode[1:]]) == 0
    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(_words(20, 1))))
    tokenizer = str(tmp_path / "run" / "tokenizer.json")
    assert main(["prepare", str(corpus), "--tokenizer", tokenizer, "--out", str(tmp_path / "other")]) == 0
    before = sorted(p.name for p in (store / "shards").iterdir())
    capsys.readouterr()
    assert main([*encode[:1], str(tmp_path / "other"), *encode[1:]]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(store) in line and "dataset" in line, line
    assert sorted(p.name for p in (store / "shards").iterdir()) == before


def test_prepare_format_reads_a_file_whose_name_does_not_say_it(tmp_path, capsys):
    rows = tmp_path / "rows.data"
    rows.write_text("".join(json.dumps({"id": 10 + i, "text": t}) + "\n" for i, t in enumerate(_words(30, 2))))
    out = tmp_path / "prepared"
    assert main(["prepare", str(rows), "--vocab-size", "280", "--out", str(out)]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(["prepare", str(rows), "--format", "jsonl", "--vocab-size", "280", "--out", str(out)]) == 0
    from quackae.data.prepared import load_prepared

    assert sorted(load_prepared(out)[0]["id"]) == list(range(10, 40))


def test_resume_restores_the_optimizer_state(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_words(80, 3)) + "\n")
    assert main(["prepare", str(corpus), "--vocab-size", "280", "--out", str(tmp_path / "p")]) == 0
    flags = ["--embed-size", "8", "--hidden-size", "8", "--batch-size", "8", "--accelerator", "cpu"]
    flags += ["--devices", "1", "--val-check-interval", "1.0", "--eval-items", "0"]
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "p"), "--out", str(run), "--max-steps", "2", *flags]) == 0
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    states = saved["optimizer_states"][0]["state"]
    assert {int(state["step"]) for state in states.values()} == {2}
    for state in states.values():  # mark the saved optimizer state: only a restored optimizer counts on from 100
        state["step"] = torch.tensor(100.0)
    torch.save(saved, last)
    assert (
        main(["train", str(tmp_path / "p"), "--out", str(run), "--max-steps", "3", "--resume", str(last), *flags]) == 0
    )
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3
    # one more step on the restored optimizer; a fresh one would say 1, a run started over 3
    assert {int(state["step"]) for state in resumed["optimizer_states"][0]["state"].values()} == {101}


def test_the_writers_memory_stays_flat_over_many_batches(tmp_path):
    from quackae.store.writer import AutoencoderWriter
    from tests.conftest import STORE_HEADER

    def peak(batches: int, where: Path) -> int:
        header = {**STORE_HEADER, "layout": "shards", "encoding_size": 256, "selection": {}}
        writer = AutoencoderWriter(storage_path=where, manifest=header, shard_size=256)
        rng = np.random.default_rng(0)
        tracemalloc.start()
        for number in range(batches):
            metas = [{"id": number * 64 + k} for k in range(64)]
            writer.write_batch(metas, rng.standard_normal((64, 256)).astype(np.float32))
        writer.flush()
        writer.write_manifest()
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    peak(4, tmp_path / "warm")  # the modules the first write imports are not the writer's memory
    few, many = peak(40, tmp_path / "few"), peak(400, tmp_path / "many")
    extra = 360 * 64 * 256 * 4  # the bytes of the encodings the second writer stores beyond the first's
    assert many - few < extra / 10, (few, many, extra)  # bookkeeping per shard and id only, no encodings kept


def _torchrun_ranks(
    tmp_path: Path,
    store: Path,
    run_id: str,
    *flags: str,
    rank_one_first: bool = False,
    rank_flags: dict[int, tuple[str, ...]] | None = None,
    codes: tuple[int, ...] = (0, 0),
) -> dict[int, tuple[str, str]]:
    """``quackae encode`` into ``store`` as two CPU ranks started as torchrun starts them (RANK, WORLD_SIZE,
    TORCHELASTIC_RUN_ID from --rdzv-id, ...); their exit codes must be ``codes``; returns each rank's (stdout,
    stderr). ``rank_one_first``: rank 0 starts 2 s later; ``rank_flags``: flags one rank gets and the other not."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "quackae", "encode", str(tmp_path / "prepared"), "--model", str(tmp_path / "run")]
    command += ["--out", str(store), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *flags]
    ranks = {}
    for rank in (1, 0) if rank_one_first else (0, 1):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": run_id, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        if rank == 0 and rank_one_first:
            time.sleep(2)  # rank 1 looks at the store before rank 0 locks it
        own = [*command, *(rank_flags or {}).get(rank, ())]
        ranks[rank] = subprocess.Popen(own, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outputs = {rank: process.communicate(timeout=120) for rank, process in sorted(ranks.items())}
    finally:
        for process in ranks.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert tuple(ranks[rank].returncode for rank in (0, 1)) == codes, [outputs[r][1][-1500:] for r in (0, 1)]
    return outputs


def _writers(shards: Path, names: set[str] | None = None) -> dict[str, set[int]]:
    """The ranks that wrote each run's shards (``{run}-{rank}-{seq}.arrow``), by run; ``names`` leaves those out."""
    runs: dict[str, set[int]] = {}
    for path in shards.iterdir():
        if path.name not in (names or set()):
            run, rank, _ = path.stem.split("-")
            runs.setdefault(run, set()).add(int(rank))
    return runs


def test_two_torchrun_ranks_share_one_store_and_write_each_item_once(tmp_path):
    from quackae import EncodingStore

    for name in ("prepared", "run"):
        shutil.copytree(LEGACY / name, tmp_path / name)
    store = tmp_path / "store"
    # 40 items at the CPU's default of 128 a batch: one batch, which once went whole to rank 0 and left rank 1's
    # predict loader empty ("PredictLoader within local rank has zero length")
    _torchrun_ranks(tmp_path, store, "claims", "--shard-size", "8")
    ids, _ = EncodingStore(store).to_numpy()
    expected = sorted(load_prepared_ids(tmp_path / "prepared"))
    assert sorted(ids.tolist()) == expected  # every item, once
    assert list(_writers(store / "shards").values()) == [{0, 1}]  # both ranks wrote their share into the one store


def test_torchrun_reruns_of_one_job_finish_a_store_that_holds_some_items(tmp_path, capsys):
    from quackae import EncodingStore

    for name in ("prepared", "run"):
        shutil.copytree(LEGACY / name, tmp_path / name)
    store, shards = tmp_path / "store", tmp_path / "store" / "shards"
    encode = ["encode", str(tmp_path / "prepared"), "--model", str(tmp_path / "run"), "--out", str(store)]
    assert main([*encode, "--shard-size", "13", "--accelerator", "cpu", "--devices", "1"]) == 0
    single = sorted(shards.iterdir())
    assert [len(EncodingStore(store).ids())] == [40] and len(single) == 4  # 13 + 13 + 13 + 1
    single[-1].unlink()  # one item left to encode: fewer than the ranks, rank 1 gets none
    _torchrun_ranks(tmp_path, store, "again")
    first = set(_writers(shards, {p.name for p in single}))
    single[1].unlink()  # 13 left (not a multiple of 2), again under the same --rdzv-id, whose records the store holds
    _torchrun_ranks(tmp_path, store, "again", rank_one_first=True)
    runs = _writers(shards, {p.name for p in single})
    assert len(first) == 1 and len(runs) == 2 and runs[first.pop()] == {0}, runs  # a run's name is never reused
    assert sorted(runs.values(), key=len) == [{0}, {0, 1}], runs  # both ranks wrote their share of the 13
    ids, _ = EncodingStore(store).to_numpy()
    assert sorted(ids.tolist()) == sorted(load_prepared_ids(tmp_path / "prepared"))  # every item, once
    capsys.readouterr()
    assert main(["verify", str(store), "--data", str(tmp_path / "prepared")]) == 0


def test_torchrun_ranks_that_share_the_items_unalike_leave_the_store_incomplete_until_a_rerun(tmp_path, capsys):
    """Ranks started by hand with other batch sizes cut the items into other batches: some are encoded twice,
    some never. Rank 0 then refuses to mark the store complete (one line); the same command on both ranks
    finishes it, each item once."""
    from quackae import EncodingStore

    for name in ("prepared", "run"):
        shutil.copytree(LEGACY / name, tmp_path / name)
    store = tmp_path / "store"
    mixed = {0: ("--batch-size", "7"), 1: ("--batch-size", "128")}
    outputs = _torchrun_ranks(tmp_path, store, "mixed", rank_flags=mixed, codes=(2, 0))
    errors = [line for line in outputs[0][1].splitlines() if line.startswith("quackae encode: error:")]
    assert len(errors) == 1 and "is not marked complete" in errors[0] and "of the 40 items" in errors[0], errors
    assert json.loads((store / "manifest.json").read_text())["complete"] is False
    _torchrun_ranks(tmp_path, store, "mixed-again", "--batch-size", "7")
    ids, _ = EncodingStore(store).to_numpy()
    assert sorted(ids.tolist()) == sorted(load_prepared_ids(tmp_path / "prepared"))  # every item, once
    capsys.readouterr()
    assert main(["verify", str(store), "--data", str(tmp_path / "prepared")]) == 0


def load_prepared_ids(path: Path) -> list[int]:
    from quackae.data.prepared import load_prepared

    return list(load_prepared(path)[0]["id"])
