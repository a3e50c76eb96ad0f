"""Crash test: kill ``generate``, ``log`` and ``extract features`` with SIGKILL at chosen points,
run them again until they finish, and compare the outputs with an uninterrupted run.

Kill points (each a real ``kill -9`` of a real ``python -m tracekit`` process):

- ``after-load``: the model is loaded and the run has prepared its output (generate: the
  activation slot files exist; log: the LMDB store exists; extract features: the manifest
  exists), nothing committed yet;
- ``after-commit``: right after the k-th commit (a resume-journal part, a store transaction, a
  sentence file) becomes visible, polled every 10 ms;
- ``random``: at a uniformly random moment of the run (mid-write more often than not).

After every kill the same command runs again (and may be killed again); the last run goes to
the end. The outputs are then compared with the uninterrupted run's, bit for bit: responses
CSVs and activation files (generate), every store entry's arrays and metadata less its
timestamp (log), every sentence file's arrays (extract features). Nothing may be lost or
duplicated, no temp file may be left, and no lock may block a rerun.

Short form: ``tests/integration/test_crash_harness.py`` (CI). Long form (documented in
``benchmarks/RESULTS.md``)::

    python tests/crash_harness.py --kills 12 --seed 0        # 12 kills per job, 36 in all
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parents[1] / "src")
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What is 7 times 6?",
    "Which planet is known as the red planet?",
    "What do bees make?",
    "What is the boiling point of water in Celsius?",
    "Name a large land mammal.",
]
SENTENCES = [
    "The receipt lists every item we bought.",
    "I told my manager how many hours I worked.",
    "Clouds gathered over the quiet harbour.",
    "She counted the coins twice before paying.",
    "The train left exactly on time this morning.",
    "He admitted he had not read the report.",
    "Our neighbours planted tulips in the spring.",
    "The recipe calls for two cups of flour.",
]


@dataclass(frozen=True)
class Job:
    """One verb under test: its inputs, its command, its commits and its outputs."""

    name: str
    prepare: Callable[[Path], None]
    """Write the inputs into the work folder."""
    args: Callable[[Path], list[str]]
    output: Callable[[Path], Path]
    loaded: Callable[[Path], bool]
    """Whether the run has loaded the model and prepared its output (the after-load point)."""
    commits: Callable[[Path], int]
    """Commits visible so far."""
    snapshot: Callable[[Path], dict[str, Any]]
    """Everything compared with the uninterrupted run."""
    bitwise: bool = True
    """Whether a resumed run must be bit-identical. extract features pads the sentences left
    after a kill into other batches than an uninterrupted run does: its float arrays then agree
    to float32 rounding (tests/tolerance.py), not bit for bit."""


def _words(command: str) -> list[str]:
    """A command line's arguments (the work folders have no spaces in their paths)."""
    return command.split()


# --- generate -----------------------------------------------------------------------------
def _generate_root(work: Path) -> Path:
    return work / "exp" / "e" / "refusal"


def _generate_snapshot(work: Path) -> dict[str, Any]:
    root = _generate_root(work)
    files = [
        *sorted((root / "responses").glob("*.csv")),
        *sorted((root / "activations").glob("*.npy")),
    ]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


GENERATE = Job(
    name="generate",
    prepare=lambda work: None,
    args=lambda work: _words(
        f"generate --experiment e --traits refusal --experiments-dir {work / 'exp'} "
        "--n-examples 4 --batch-size 2 --max-new-tokens 3 --temperature 0 --layers 0,30 "
        "--pooling response_avg,prompt_last --no-chat-template --device cpu"
    ),
    output=_generate_root,
    loaded=lambda work: any((_generate_root(work) / "activations" / "parts").glob("*.slots.npy")),
    commits=lambda work: len(list((_generate_root(work) / "responses" / "parts").glob("*-*.json"))),
    snapshot=_generate_snapshot,
)


# --- log ----------------------------------------------------------------------------------
def _store_count(work: Path) -> int:
    from tracekit.errors import StoreError
    from tracekit.storage.activation_store import open_store

    try:
        with open_store(work / "store") as reader:
            return len(reader)
    except StoreError:  # not created yet, or its databases not committed yet
        return 0


def _log_snapshot(work: Path) -> dict[str, Any]:
    from tracekit.storage.activation_store import open_store

    out: dict[str, Any] = {}
    with open_store(work / "store") as reader:
        for entry in reader:
            meta = {k: v for k, v in entry.metadata.items() if k != "timestamp"}
            arrays = {
                k: (v.dtype.str, v.shape, v.tobytes()) for k, v in (entry.arrays or {}).items()
            }
            out[entry.key] = (json.dumps(meta, sort_keys=True), arrays)
    return out


def _write_qa(work: Path) -> None:
    rows = [{"prompt": q} for q in QUESTIONS[:6]]
    (work / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


LOG = Job(
    name="log",
    prepare=_write_qa,
    args=lambda work: _words(
        f"log --qa {work / 'qa.jsonl'} --lmdb {work / 'store'} --layers 0,30 "
        "--max-new-tokens 3 --batch-size 2 --device cpu"
    ),
    output=lambda work: work / "store",
    loaded=lambda work: (work / "store" / "data.mdb").is_file(),
    commits=_store_count,
    snapshot=_log_snapshot,
)


# --- extract features ---------------------------------------------------------------------
def _features_snapshot(work: Path) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    for path in sorted((work / "feats").glob("sentence_*.npz")):
        with np.load(path, allow_pickle=False) as data:
            out[path.name] = {k: data[k] for k in data}
    return out


def same_outputs(job: Job, got: dict[str, Any], want: dict[str, Any]) -> tuple[bool, bool]:
    """(bit-identical, equal as ``job`` requires): the same files and entries, and the same
    values, float arrays of a non-bitwise job to float32 rounding."""
    import numpy as np

    from tolerance import close_to_scale

    def flat(snapshot: dict[str, Any]) -> dict[str, Any]:
        return {(k, n): v for k, arrays in snapshot.items() for n, v in arrays.items()}

    if job.bitwise:
        return got == want, got == want
    a, b = flat(got), flat(want)
    if a.keys() != b.keys():
        return False, False
    identical = all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in ((a[k], b[k]) for k in a)
    )
    close = all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and (
            close_to_scale(a[k], b[k], str(a[k].dtype))
            if a[k].dtype.kind == "f"
            else np.array_equal(a[k], b[k])
        )
        for k in a
    )
    return identical, close


def _write_sentences(work: Path) -> None:
    with (work / "s.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows([s, i % 2] for i, s in enumerate(SENTENCES))


FEATURES = Job(
    name="extract features",
    prepare=_write_sentences,
    args=lambda work: _words(
        f"extract features --sentences {work / 's.csv'} --output {work / 'feats'} "
        "--label-column label --label-range 0-1 --layers 0-2 --batch-size 2 --device cpu"
    ),
    output=lambda work: work / "feats",
    loaded=lambda work: (work / "feats" / "features.json").is_file(),
    commits=lambda work: len(list((work / "feats").glob("sentence_*.npz"))),
    snapshot=_features_snapshot,
    bitwise=False,
)

JOBS = {job.name: job for job in (GENERATE, LOG, FEATURES)}


# --- running and killing ------------------------------------------------------------------
@dataclass
class Kill:
    point: str
    """``after-load``, ``after-commit`` or ``random``."""
    commit: int = 1
    """For after-commit: kill right after this many commits are visible."""
    delay: float = 0.0
    """For random: seconds after the start."""


@dataclass
class Outcome:
    job: str
    kills: list[str] = field(default_factory=list)
    """What each kill hit: the point and the commits visible then."""
    runs: int = 0
    identical: bool = False
    """Bit-identical to the uninterrupted run."""
    equal: bool = False
    """Equal as the job requires (:attr:`Job.bitwise`)."""
    strays: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _command(job: Job, work: Path) -> list[str]:
    return [sys.executable, "-m", "tracekit", *job.args(work)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "TRACEKIT_PROGRESS": "0"}


def run_to_end(job: Job, work: Path, timeout: float = 600) -> None:
    done = subprocess.run(
        _command(job, work), capture_output=True, text=True, env=_env(), timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(f"{job.name} failed ({done.returncode}): {done.stderr[-3000:]}")


def run_and_kill(job: Job, work: Path, kill: Kill, timeout: float = 600) -> str:
    """Start ``job`` and SIGKILL it at ``kill``; return what the kill hit (or that the run
    finished first). Commits count from this run's start (a resumed run's first new commit is
    commit 1); ``after-load`` is meant for a fresh folder (in a resumed one the prepared output
    is already there, and the kill comes at start-up)."""
    base = job.commits(work)
    proc = subprocess.Popen(
        _command(job, work), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
    )
    started = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - started < timeout:
            if kill.point == "random":
                hit = time.monotonic() - started >= kill.delay
            elif kill.point == "after-load":
                hit = job.loaded(work)
            else:
                hit = job.commits(work) - base >= kill.commit
            if hit:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"{kill.point} ({job.commits(work)} commits, {job.commits(work) - base} new)"
            time.sleep(0.01)
        if proc.poll() is None:
            raise AssertionError(f"{job.name} did not reach {kill.point} in {timeout} s")
        if proc.returncode != 0:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"{job.name} failed ({proc.returncode}): {err[-3000:]}")
        return f"{kill.point}: finished first"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def reference(
    job: Job, folder: Path, run: Callable[[Job, Path], None] = run_to_end
) -> tuple[dict[str, Any], float]:
    """The uninterrupted run's snapshot and its duration (``run``: in a child process by
    default; the CI test runs it in its own process to save a start-up)."""
    folder.mkdir(parents=True, exist_ok=True)
    job.prepare(folder)
    started = time.monotonic()
    run(job, folder)
    return job.snapshot(folder), time.monotonic() - started


def crash_and_compare(
    job: Job, folder: Path, kills: list[Kill], expected: dict[str, Any]
) -> Outcome:
    """Run ``job`` in ``folder`` through ``kills`` (one process each), then to the end; compare."""
    folder.mkdir(parents=True, exist_ok=True)
    job.prepare(folder)
    outcome = Outcome(job.name)
    started = time.monotonic()
    for kill in kills:
        outcome.kills.append(run_and_kill(job, folder, kill))
        outcome.runs += 1
    run_to_end(job, folder)
    outcome.runs += 1
    outcome.seconds = time.monotonic() - started
    outcome.identical, outcome.equal = same_outputs(job, job.snapshot(folder), expected)
    output = job.output(folder)
    scope = output if output.is_dir() and job is not LOG else output.parent
    outcome.strays = sorted(str(p.relative_to(folder)) for p in scope.rglob(".tmp-*"))
    return outcome


def plan_kills(job: Job, n: int, rng: random.Random, duration: float, commits: int) -> list[Kill]:
    """``n`` kills in trials of three on a fresh folder: after the model loads, then at a random
    moment of the resumed run (within the first 60% of an uninterrupted run's duration, which
    includes start-up), then right after the next run's first commit."""
    points = ["after-load", "random", "after-commit"]
    return [Kill(points[i % 3], commit=1, delay=rng.uniform(0.0, 0.6 * duration)) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12, help="kills per job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated job names")
    parser.add_argument("--work", type=Path, default=Path("crash-test-work"))
    parser.add_argument(
        "--kills-per-run", type=int, default=3, help="kills before a run to the end"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, SRC)
    rng = random.Random(args.seed)
    if args.work.exists():
        shutil.rmtree(args.work)
    failures = 0
    for name in args.jobs.split(","):
        job = JOBS[name.strip()]
        expected, duration = reference(job, args.work / job.name.replace(" ", "_") / "reference")
        commits = job.commits(args.work / job.name.replace(" ", "_") / "reference")
        kills = plan_kills(job, args.kills, rng, duration, commits)
        for first in range(0, len(kills), args.kills_per_run):
            trial = args.work / job.name.replace(" ", "_") / f"trial{first // args.kills_per_run}"
            outcome = crash_and_compare(
                job, trial, kills[first : first + args.kills_per_run], expected
            )
            ok = outcome.equal and not outcome.strays
            failures += not ok
            verdict = "identical" if outcome.identical else "fp32-close" if ok else "DIFFERENT"
            print(
                f"{job.name:17s} {verdict:10s} "
                f"runs={outcome.runs} kills: {'; '.join(outcome.kills)}"
                + (f" strays: {outcome.strays}" if outcome.strays else ""),
                flush=True,
            )
    print("all equal" if not failures else f"{failures} trial(s) differ", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
