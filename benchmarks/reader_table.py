"""Every file a stage reads, fed wrong-shape inputs: the line ``quackae`` prints and its exit status, as a table.

Builds a tiny corpus, prepared folder, RUN, store and classifier folder under a temporary folder, then for each
(file, damage) pair copies the folder that holds the file, damages the copy and runs the command that reads it.
A case holds when the command exits non-zero with one ``quackae CMD: error:`` line that names the file and no
traceback (``verify``: a problem line naming it); a command that exits 0 does not read that file ("not read").
Run from a checkout with its venv::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reader_table.py > reader-table.md

Prints a Markdown table and a last line with the counts; exits 1 when any case does not hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QUACKAE = [sys.executable, "-m", "quackae"]
TINY = ["--embed-size", "8", "--hidden-size", "16", "--batch-size", "16", "--accelerator", "cpu", "--devices", "1"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(QUACKAE + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def build(root: Path) -> None:
    topics = ["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]
    with (root / "corpus.jsonl").open("w") as handle:
        for i in range(240):
            words = (topics[i % 3] + " ") * (1 + i % 4)
            handle.write(json.dumps({"id": i, "text": f"{words} item {i}", "label": f"t{i % 3}"}) + "\n")
    steps = [
        ["prepare", "corpus.jsonl", "--out", "prepared", "--vocab-size", "300"],
        ["train", "prepared", "--out", "run", "--max-steps", "4", *TINY],
        ["encode", "prepared", "--model", "run", "--out", "store", "--accelerator", "cpu", "--devices", "1"],
        ["classify", "store", "--out", "clf", "--max-epochs", "2", "--accelerator", "cpu", "--devices", "1"],
    ]
    for step in steps:
        done = run(step, root)
        if done.returncode != 0:
            raise SystemExit(f"fixture step {step[0]} failed: {done.stderr[-2000:]}")


def damages() -> dict[str, object]:
    """name -> what to put in place of the file: bytes, or a callable(path) that makes something else there."""

    def directory(path: Path) -> None:
        path.mkdir()

    def fifo(path: Path) -> None:
        os.mkfifo(path)

    def loop(path: Path) -> None:
        path.symlink_to(path.name)

    def dangling(path: Path) -> None:
        path.symlink_to("nowhere-at-all")

    return {
        "missing": None,
        "empty": b"",
        "directory": directory,
        "FIFO": fifo,
        "symlink loop": loop,
        "dangling symlink": dangling,
        "not UTF-8": b"\xff\xfe\x00garbage\x80",
        "JSON list": b"[1, 2, 3]\n",
        "JSON string": b'"text"\n',
        "truncated": "TRUNCATE",
    }


# (the file, relative to the fixture root; the folder copied; the command that reads it, on the copy)
TARGETS = [
    ("prepared/COMPLETE", "prepared", ["train", "{copy}", "--out", "{tmp}/r", "--max-steps", "1", *TINY]),
    ("prepared/prepare.json", "prepared", ["train", "{copy}", "--out", "{tmp}/r", "--max-steps", "1", *TINY]),
    ("prepared/tokenizer.json", "prepared", ["train", "{copy}", "--out", "{tmp}/r", "--max-steps", "1", *TINY]),
    ("prepared/COMPLETE", "prepared", ["encode", "{copy}", "--model", "{root}/run", "--out", "{tmp}/s"]),
    ("run/checkpoints/last.ckpt", "run", ["encode", "{root}/prepared", "--model", "{copy}", "--out", "{tmp}/s"]),
    ("run/tokenizer.json", "run", ["encode", "{root}/prepared", "--model", "{copy}", "--out", "{tmp}/s"]),
    ("run/run.json", "run", ["encode", "{root}/prepared", "--model", "{copy}", "--out", "{tmp}/s"]),
    ("run/checkpoints/last.ckpt", "run", ["reconstruct", "some text", "--model", "{copy}"]),
    ("run/metrics.csv", "run", ["plot", "{copy}", "--out", "{tmp}/c.png"]),
    ("store/manifest.json", "store", ["verify", "{copy}"]),
    ("store/manifest.json", "store", ["export", "{copy}", "--out", "{tmp}/e.parquet"]),
    ("store/manifest.json", "store", ["classify", "{copy}", "--out", "{tmp}/c", "--max-epochs", "1"]),
    ("store/shards/{first_shard}", "store", ["verify", "{copy}"]),
    ("store/shards/{first_shard}", "store", ["export", "{copy}", "--out", "{tmp}/e.parquet"]),
    ("clf/checkpoints/best.ckpt", "clf", ["classify", "{root}/store", "--predict", "{copy}", "--out", "{tmp}/p"]),
    ("clf/classes.json", "clf", ["classify", "{root}/store", "--predict", "{copy}", "--out", "{tmp}/p"]),
    ("corpus.jsonl", None, ["prepare", "{copy}", "--out", "{tmp}/p", "--vocab-size", "300"]),
    ("pipeline.yaml", None, ["run", "{copy}"]),
]


def damage(path: Path, how: object) -> None:
    if how == "TRUNCATE":
        data = path.read_bytes()
        path.write_bytes(data[: max(1, len(data) // 2)])
        return
    path.unlink()
    if how is None:
        return
    if callable(how):
        how(path)
    else:
        path.write_bytes(how)


def verdict(done: subprocess.CompletedProcess, name: str, command: str) -> tuple[str, str]:
    """(the line to show, whether the case holds): one ``quackae CMD: error:`` line naming the file and a non-zero
    exit; for ``verify``, whose report is its output, a non-zero exit with a problem line naming the file; a
    command that does not read the file exits 0 with its usual output ("not read")."""
    if "Traceback" in done.stderr:
        return done.stderr.strip().splitlines()[-1], "NO (traceback)"
    if done.returncode == 0:
        return "(exit 0: the command does not read this file)", "not read"
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"quackae {command}: error:")]
    if command == "verify" and not errors:
        problems = [line for line in done.stdout.splitlines() if name in line]
        return (problems[0], "yes") if problems else (done.stdout.strip()[-200:], "NO")
    if len(errors) != 1:
        return (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1], f"NO ({len(errors)} error lines)"
    return errors[0], "yes" if name in errors[0] else "NO (file not named)"


def main() -> int:
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="quackae-readers-") as tmp:
        root = Path(tmp)
        build(root)
        (root / "pipeline.yaml").write_text("root: out\nstages:\n  - prepare:\n      inputs: [corpus.jsonl]\n")
        first_shard = sorted(p.name for p in (root / "store" / "shards").iterdir())[0]
        for target, folder, command in TARGETS:
            target = target.replace("{first_shard}", first_shard)
            for label, how in damages().items():
                if how == "TRUNCATE" and target.endswith("COMPLETE"):
                    continue
                case = Path(tempfile.mkdtemp(dir=root, prefix="case-"))
                if folder is None:
                    shutil.copy(root / target, case / Path(target).name)
                    copy, file = case / Path(target).name, case / Path(target).name
                else:
                    shutil.copytree(root / folder, case / folder, symlinks=True)
                    copy, file = case / folder, case / target
                if not file.exists() and not file.is_symlink():
                    raise SystemExit(f"the fixture has no {target}")
                damage(file, how)
                args = [a.format(copy=copy, tmp=case, root=root) for a in command]
                done = run(args, root)
                line, held = verdict(done, Path(target).name, command[0])
                failed += held.startswith("NO")
                shown = line.replace(str(root), "…").replace("|", "\\|")
                rows.append(f"| {target} | quackae {command[0]} | {label} | {done.returncode} | {shown} | {held} |")
                print(rows[-1], file=sys.stderr, flush=True)  # progress
                shutil.rmtree(case, ignore_errors=True)
    print("| file | read by | fed | exit | line printed (last line of stderr) | one line naming it |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    unread = sum(row.endswith("| not read |") for row in rows)
    print(f"\n{len(rows)} cases: {len(rows) - failed - unread} hold, {unread} not read, {failed} do not hold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
