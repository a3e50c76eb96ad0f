"""Benchmark how fast ``--help`` and TAB completion answer, against bare ``python -c pass``.

Each command runs as a new process, as a shell runs it: the ``tracekit`` console script next
to this Python (``python SCRIPT ...``, what its shebang does), completion through click's
``_TRACEKIT_COMPLETE`` protocol (what the installed bash completion sends). The baseline,
``python -c pass``, runs interleaved with them in the same rounds, so a busy machine slows
both. Reported: the median wall time and CPU time (user + system, the child's rusage) of each
command over ``--repeats`` rounds, and their overheads over the baseline's medians. The
targets (help <= python + 0.3 s, completion <= python + 0.2 s) are checked on CPU time: on a
quiet machine a one-thread command's wall time is its CPU time, and on a shared one the wall
time also counts the wait for a core.

Usage: ``python benchmarks/bench_cli_startup.py [--repeats 15]``; exits 1 if a target is
missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import add_csv_option, write_csv

HELP_TARGET_S = 0.3
COMPLETION_TARGET_S = 0.2
# what a user has typed when pressing TAB: a verb, an option, an option's value
COMPLETIONS = ("tracekit ge", "tracekit generate --ba", "tracekit build-dataset --normalize ")


def _script() -> str:
    """The ``tracekit`` console script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("tracekit")
    found = str(beside) if beside.exists() else shutil.which("tracekit")
    if not found:
        raise SystemExit("no 'tracekit' console script: pip install -e . first")
    return found


def _cases(script: str) -> list[tuple[str, str, list[str], dict[str, str]]]:
    """(label, kind, argv, extra environment) per command."""
    py = sys.executable

    def complete(words: str) -> dict[str, str]:
        return {
            "_TRACEKIT_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        }

    return [
        ("python -c pass", "baseline", [py, "-c", "pass"], {}),
        ("tracekit --help", "help", [py, script, "--help"], {}),
        ("tracekit generate --help", "help", [py, script, "generate", "--help"], {}),
        (
            "tracekit extract activations --help",
            "help",
            [py, script, "extract", "activations", "--help"],
            {},
        ),
        ("tracekit build-dataset --help", "help", [py, script, "build-dataset", "--help"], {}),
    ] + [(f"TAB: {words}", "completion", [py, script], complete(words)) for words in COMPLETIONS]


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of ``argv``."""
    cpu = _cpu_of_children()
    start = time.perf_counter()
    done = subprocess.run(
        argv, env={**os.environ, **env, "COLUMNS": "100"}, capture_output=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0 or (argv[1:] != ["-c", "pass"] and not done.stdout.strip()):
        raise SystemExit(f"{argv} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return wall, _cpu_of_children() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    add_csv_option(parser)
    args = parser.parse_args()
    cases = _cases(_script())
    wall: dict[str, list[float]] = {label: [] for label, *_ in cases}
    cpu: dict[str, list[float]] = {label: [] for label, *_ in cases}
    for _label, _, argv, env in cases:  # warm the file cache once
        _time(argv, env)
    for _ in range(args.repeats):  # interleaved: every round runs every command once
        for label, _, argv, env in cases:
            seconds, cpu_seconds = _time(argv, env)
            wall[label].append(seconds)
            cpu[label].append(cpu_seconds)
    base_wall = statistics.median(wall["python -c pass"])
    base_cpu = statistics.median(cpu["python -c pass"])
    print(
        f"# {platform.node()} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.1f} · "
        f"Python {platform.python_version()} · median of {args.repeats} rounds"
    )
    print(
        "| command | wall s | over python, wall s | CPU s | over python, CPU s | target s "
        "| met (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    missed = 0
    rows = []
    for label, kind, _, _ in cases:
        target = {"help": HELP_TARGET_S, "completion": COMPLETION_TARGET_S}.get(kind)
        w, c = statistics.median(wall[label]), statistics.median(cpu[label])
        met = "" if target is None else ("yes" if c - base_cpu <= target else "NO")
        missed += met == "NO"
        over = ("", "") if target is None else (f"{w - base_wall:+.3f}", f"{c - base_cpu:+.3f}")
        shown = "" if target is None else f"{target:.1f}"
        print(f"| `{label}` | {w:.3f} | {over[0]} | {c:.3f} | {over[1]} | {shown} | {met} |")
        rows.append({"command": label, "wall_s": w, "over_python_wall_s": over[0], "cpu_s": c,
                     "over_python_cpu_s": over[1], "target_s": shown, "met": met})  # fmt: skip
    write_csv(args.csv, rows)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
