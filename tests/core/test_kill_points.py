"""Outputs a later stage reads, killed at each boundary of their write, are the old output or the whole new one.

The kill is placed, not timed: a child process counts the events that touch the output (a file opened for
writing at or under it; just before and just after an ``os.replace``, ``os.rename``, ``os.link`` or folder
exchange that names it) and dies (``os._exit``) at the k-th. The test runs the write once unkilled to count
the events, then once killed at each, and checks what is left: the prepare folder swap, the classifier
folder swap, a checkpoint write and the store manifest write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

KILLED = 9

_HOOKS = """
import builtins, io, os, sys
import quackae.core.atomic as atomic

KILL_AT, TARGET = int(sys.argv[1]), os.path.abspath(sys.argv[2])
seen = 0


def _touches(path):
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False  # a file descriptor
    return path == TARGET or path.startswith(TARGET + os.sep)


def _event():
    global seen
    seen += 1
    if seen == KILL_AT:
        os._exit(9)


def _opening(real, writes):
    def hooked(file, *args, **kwargs):
        handle = real(file, *args, **kwargs)
        if writes(args, kwargs) and _touches(file):
            _event()
        return handle
    return hooked


def _mode_writes(args, kwargs):
    mode = args[0] if args else kwargs.get("mode", "r")
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def _flags_write(args, kwargs):
    flags = args[0] if args else kwargs.get("flags", 0)
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


def _renaming(real):
    def hooked(a, b, *args, **kwargs):
        touches = _touches(a) or _touches(b)
        if touches:
            _event()
        result = real(a, b, *args, **kwargs)
        if touches:
            _event()
        return result
    return hooked


builtins.open = io.open = _opening(io.open, _mode_writes)
os.open = _opening(os.open, _flags_write)
os.replace, os.rename, os.link = _renaming(os.replace), _renaming(os.rename), _renaming(os.link)
atomic.exchange = _renaming(atomic.exchange)
"""

_PREPARE = """
from quackae.stages.prepare import PrepareConfig, prepare

prepare(PrepareConfig(inputs=sys.argv[3], out=TARGET, vocab_size=280, min_frequency=1))
"""

_CLASSIFIER = """
from pathlib import Path
from quackae.eval import folder

staging = folder.staging_for(Path(TARGET))
for name in ("classes.json", "report.json", "predictions.parquet"):
    (staging / name).write_text("new " + name)
(staging / folder.CHECKPOINT).write_bytes(b"new checkpoint")
folder.commit(staging, Path(TARGET))
"""

_CHECKPOINT = """
import torch
from quackae.model.checkpoints import AtomicCheckpointIO

AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(64, 64)}, TARGET)
"""

_MANIFEST = """
import json
from pathlib import Path
from quackae.store.job import write_manifest

write_manifest(Path(TARGET).parent, json.loads(sys.argv[3]), Path(sys.argv[4]))
"""


def kill_each_event(script: str, target: Path, setup, check, *args: str) -> int:
    """Run ``script`` unkilled on a fresh ``setup()`` to count its events, then killed at each one, calling
    ``check("old" | "new")`` each time on what is left; returns the event count."""

    def run(kill_at: int) -> subprocess.CompletedProcess:
        setup()
        return subprocess.run(
            [sys.executable, "-c", _HOOKS + script + "\nprint(seen)\n", str(kill_at), str(target), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    done = run(0)
    assert done.returncode == 0, done.stderr[-2000:]
    events = int(done.stdout.split()[-1])
    assert events >= 1, "the write did not touch its output"
    check(None)  # the unkilled write leaves the new output
    for kill_at in range(1, events + 1):
        killed = run(kill_at)
        assert killed.returncode == KILLED, f"not killed at event {kill_at}: {killed.stderr[-1000:]}"
        check(kill_at)
    return events


def _lines(count: int, seed: int) -> str:
    words = "duck goose swan apple pear plum river stone".split()
    return "\n".join(" ".join(words[(i * 7 + j * seed) % len(words)] for j in range(5)) for i in range(count)) + "\n"


def test_prepare_killed_at_each_boundary_leaves_the_old_or_the_new_folder(tmp_path):
    from quackae.data.prepared import load_prepared
    from quackae.stages.prepare import PrepareConfig, prepare

    old_corpus, new_corpus, out = tmp_path / "old.txt", tmp_path / "new.txt", tmp_path / "prepared"
    old_corpus.write_text(_lines(30, 3))
    new_corpus.write_text(_lines(50, 5))

    def setup() -> None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        prepare(PrepareConfig(inputs=str(old_corpus), out=str(out), vocab_size=280, min_frequency=1))

    def check(kill_at) -> None:
        rows = len(load_prepared(out)[0])  # refuses a folder without its COMPLETE marker
        assert rows in (30, 50) if kill_at else rows == 50, (kill_at, rows)

    kill_each_event(_PREPARE, out, setup, check, str(new_corpus))


def test_classifier_swap_killed_at_each_boundary_leaves_the_old_or_the_new_folder(tmp_path):
    import shutil

    out = tmp_path / "classifier"
    names = ("classes.json", "report.json", "predictions.parquet", "checkpoints/best.ckpt")

    def setup() -> None:
        shutil.rmtree(out, ignore_errors=True)
        (out / "checkpoints").mkdir(parents=True)
        for name in names:
            (out / name).write_text("old " + Path(name).name)

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    old = {name: f"old {Path(name).name}".encode() for name in names}
    new = {name: f"new {name}".encode() for name in names[:3]} | {names[3]: b"new checkpoint"}

    def check(kill_at) -> None:
        assert files() in (old, new) if kill_at else files() == new, kill_at
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".classifier.") and kill_at is None]

    kill_each_event(_CLASSIFIER, out, setup, check)


def test_checkpoint_write_killed_at_each_boundary_leaves_the_old_or_the_new_checkpoint(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    old, new = torch.zeros(64, 64), torch.ones(64, 64)

    def setup() -> None:
        target.parent.mkdir(exist_ok=True)
        torch.save({"weights": old}, target)

    def check(kill_at) -> None:
        weights = torch.load(target, weights_only=True)["weights"]
        assert torch.equal(weights, new) or (kill_at and torch.equal(weights, old)), kill_at

    kill_each_event(_CHECKPOINT, target, setup, check)


def test_manifest_write_killed_at_each_boundary_leaves_the_old_or_the_new_manifest(tmp_path):
    store = tmp_path / "store"
    staging = store / ".staging"
    old = {"format": "quackae-store", "items": 3, "units": ["a"]}
    new = {"format": "quackae-store", "items": 7, "units": ["a", "b"], "complete": True}

    def setup() -> None:
        staging.mkdir(parents=True, exist_ok=True)
        (store / "manifest.json").write_text(json.dumps(old, indent=2) + "\n")

    def check(kill_at) -> None:
        manifest = json.loads((store / "manifest.json").read_text())
        assert manifest == new or (kill_at and manifest == old), kill_at

    kill_each_event(_MANIFEST, store / "manifest.json", setup, check, json.dumps(new), str(staging))


def test_the_hooks_see_a_plain_write(tmp_path):
    """The harness counts a plain write into the output as an event, so a write that is not atomic is killed
    half done and caught by the checks above."""
    target = tmp_path / "out" / "file"
    script = "os.makedirs(os.path.dirname(TARGET), exist_ok=True)\nwith open(TARGET, 'w') as h:\n    h.write('x')\n"
    done = subprocess.run(
        [sys.executable, "-c", _HOOKS + script + "print(seen)\n", "1", str(target)], capture_output=True, text=True
    )
    assert done.returncode == KILLED and target.read_text() == ""
