"""What each process setting ``quackae encode`` gives itself is worth: the whole command, side by side.

``quackae encode DATA --model RUN`` runs ``--rounds`` times with each set of settings, in turn (all of them,
none, each one alone), every run into a new store; the settings are the ones ``quackae.stages.table`` names
for encode, switched by replacing that entry's ``settings`` before the command line runs (the same code
otherwise). Prints, per set, the median wall, user and system seconds and peak RSS of the whole process, and
the median of the per-round ratio of its wall time to the run without settings in the same round.

    OMP_NUM_THREADS=1 python benchmarks/encode_settings.py PREPARED RUN --rounds 6 --dir /tmp/settings
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNNER = (
    "import dataclasses, sys\n"
    "from quackae.stages import table\n"
    "names = tuple(n for n in sys.argv[1].split(',') if n)\n"
    "table.STAGES['encode'] = dataclasses.replace(table.STAGES['encode'], settings=names)\n"
    "from quackae.cli.command import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def one_run(settings: tuple[str, ...], data: str, run: str, out: Path) -> dict[str, float]:
    """Wall, user and system seconds and peak RSS (MB) of one whole ``quackae encode`` process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", RUNNER, ",".join(settings), "encode", data, "--model", run, "--out", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"quackae encode with settings {settings} failed (exit {os.waitstatus_to_exitcode(status)})")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024}


def main() -> None:
    from quackae.stages.table import STAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a prepared folder")
    parser.add_argument("run", help="a RUN folder or checkpoint")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args()
    names = STAGES["encode"].settings
    sets = {"all": names, "none": (), **{f"{name} alone": (name,) for name in names}}
    root = Path(args.dir or os.environ.get("TMPDIR", "/tmp")) / "quackae-encode-settings"
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in sets}
    for round_ in range(args.rounds):
        for label, settings in sets.items():
            runs[label].append(one_run(settings, args.data, args.run, root / label.replace(" ", "-")))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]['wall']:.2f} s" for k, v in runs.items()), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    for label, figures in runs.items():
        medians = {key: statistics.median(f[key] for f in figures) for key in ("wall", "user", "sys", "peak_mb")}
        ratios = [f["wall"] / none["wall"] for f, none in zip(figures, runs["none"], strict=True)]
        print(
            f"{label:>24}: wall {medians['wall']:.2f} s, user {medians['user']:.2f} s, sys {medians['sys']:.2f} s, "
            f"peak {medians['peak_mb']:.0f} MB; wall / none {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
