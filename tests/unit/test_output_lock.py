"""One writer per output (issue 31, point 2), with real processes.

A child process holds an output's lock; the verbs that write that output refuse at once, in one
line naming the child's pid, before any model is loaded. A holder killed with SIGKILL leaves no
lock behind (flock locks die with their process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


@contextmanager
def held(output: Path, folder: bool = True) -> Iterator[subprocess.Popen]:
    """A separate process holding ``output``'s lock until the block ends (then SIGKILLed)."""
    script = (
        "import sys\n"
        "from tracekit.storage.atomic import output_lock\n"
        f"with output_lock({str(output)!r}, folder={folder}):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_second_writer_is_refused_naming_the_pid_and_a_killed_one_blocks_nothing(
    tmp_path: Path,
):
    from tracekit.errors import OutputLockedError
    from tracekit.storage.atomic import output_lock

    out = tmp_path / "exp" / "trait"
    with held(out) as child:
        refused = pytest.raises(OutputLockedError, match=rf"being written .*\(pid {child.pid}\)")
        with refused, output_lock(out):
            pass
        os.kill(child.pid, signal.SIGKILL)  # kill -9: no cleanup code runs in the holder
        child.wait()
        with output_lock(out):  # the next run goes ahead
            assert (out / ".tracekit.lock").read_text().strip() == str(os.getpid())
    assert list(out.iterdir()) == []  # the killed holder's lock file went with the next run


def test_a_finished_holder_hands_over_without_a_gap(tmp_path: Path):
    from tracekit.storage.atomic import output_lock

    out = tmp_path / "features"
    with output_lock(out):
        (out / "0.npz").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["0.npz"]  # the lock file is gone
    with output_lock(out), held(tmp_path / "other"):
        pass


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "What is 2+2?"}\n')
    sentences = tmp_path / "s.csv"
    sentences.write_text("sentence,label\nThe sky is blue.,1\n")
    rows = tmp_path / "rows.csv"
    rows.write_text("question,response\nq,r\n")
    return {"qa": qa, "sentences": sentences, "rows": rows}


CASES = {
    # verb: (its arguments, the output it locks, whether that output is a folder)
    "generate": (
        ["generate", "--experiment", "e", "--traits", "refusal", "--experiments-dir", "{tmp}"],
        "{tmp}/e/refusal",
        True,
    ),
    "extract activations": (
        ["extract", "activations", "--experiment", "e", "--trait", "t", "--experiments-dir",
         "{tmp}"],
        "{tmp}/e/t",
        True,
    ),
    "extract vectors": (  # reads the folder's activations; their writer cleans its temps
        ["extract", "vectors", "--experiment", "e", "--trait", "t", "--experiments-dir",
         "{tmp}"],
        "{tmp}/e/t",
        True,
    ),
    "extract features": (
        ["extract", "features", "--sentences", "{tmp}/s.csv", "--output", "{tmp}/feats"],
        "{tmp}/feats",
        True,
    ),
    "log": (["log", "--qa", "{tmp}/qa.jsonl", "--lmdb", "{tmp}/store"], "{tmp}/store", False),
    "judge": (
        ["judge", "--input", "{tmp}/rows.csv", "--eval-prompt", "Q {question} A {answer}",
         "--judge-model", "m", "--base-url", "http://127.0.0.1:9"],
        "{tmp}/rows.csv",
        False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("verb", list(CASES))
def test_each_writing_verb_refuses_a_second_writer_before_loading_a_model(
    verb: str, tmp_path: Path, inputs: dict[str, Path]
):
    args, output, folder = CASES[verb]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    target = Path(output.replace("{tmp}", str(tmp_path)))
    with held(target, folder) as child:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        done = subprocess.run(
            [sys.executable, "-m", "tracekit", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "300"},
            timeout=60,
        )
        after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert len(errors) == 1 and f"(pid {child.pid})" in errors[0], done.stderr
    assert "being written by another tracekit process" in errors[0]
    assert "Traceback" not in done.stderr and "loading" not in done.stderr.lower()
    assert after == before  # nothing written
