"""Long work does not look hung: the job's size up front, a first estimate after the first
batch, a CPU warning for large jobs, and a closing speed line without the model load."""

import pytest

from tracekit.cli._common import batch_progress, note_long_cpu_job
from tracekit.console import err_console


@pytest.fixture()
def wide(monkeypatch):
    monkeypatch.setattr(err_console, "width", 400)


def test_size_before_the_first_batch_then_an_estimate(wide):
    with err_console.capture() as captured, batch_progress(150) as (on_total, on_batch):
        on_total(10)
        on_batch(2, 300)
        on_batch(2, 300)  # only the first batch gives the estimate
    text = captured.get()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0] == "10 rows to run of up to 150 new tokens; the first batch sets the estimate"
    assert lines[1].startswith("first batch: 2 rows, 300 new tokens in ")
    assert lines[1].endswith("for the 8 rows left")
    assert text.count("first batch:") == 1


@pytest.mark.parametrize(
    ("device", "rows", "tokens", "warned"),
    [("cpu", 400, 150, True), ("cpu", 10, 32, False), ("cuda", 400, 150, False)],
)
def test_a_large_job_on_cpu_is_announced(wide, device, rows, tokens, warned):
    with err_console.capture() as captured:
        note_long_cpu_job(device, rows, tokens)
    text = " ".join(captured.get().split())
    assert (f"note: on CPU: {rows:,} responses of up to {tokens} new tokens" in text) is warned


def test_generate_speed_line_reports_load_and_generation_apart(tmp_path, monkeypatch):
    """'2 new tokens in 44.9 s (0.0 tok/s)' counted the model load as generation time."""
    from tracekit.cli.generate import _print_result
    from tracekit.console import out_console
    from tracekit.jobs.generate import GenerateResult, TraitResult

    result = GenerateResult(
        model="m",
        traits=[TraitResult(trait="refusal", root=tmp_path, rows={"pos": 1, "neg": 1})],
        seconds=44.9,
        tokens=200,
        batch_size=8,
        generation_seconds=4.0,
        processes=[{"load_seconds": 40.0}],
    )
    monkeypatch.setattr(out_console, "width", 400)
    with out_console.capture() as captured:
        _print_result(result)
    text = " ".join(captured.get().split())
    assert (
        "200 new tokens in 4.0 s of generation (50.0 tok/s); model load 40.0 s; 44.9 s in all"
        in text
    )


def test_the_cpu_note_comes_with_the_job_size_after_the_checks(wide):
    """Announced when the job is about to run (a refused job prints no note)."""
    with err_console.capture() as captured, batch_progress(150, "cpu") as (on_total, _):
        on_total(400)
    lines = [line for line in captured.get().splitlines() if line.strip()]
    assert lines[0].startswith("note: on CPU: 400 responses of up to 150 new tokens")
    assert lines[1].startswith("400 rows to run")


def test_no_estimate_when_the_first_batch_was_the_whole_job(wide):
    with err_console.capture() as captured, batch_progress(24) as (on_total, on_batch):
        on_total(15)
        on_batch(15, 326)
    assert "first batch:" not in captured.get()


def test_a_new_total_mid_run_keeps_the_rate_and_time_left(wide, monkeypatch):
    """rich's update(total=...) forgets a task's speed samples: the bar showed '- rows/s' and
    no time left after the total moved, and the size line promised a new first estimate."""
    import time

    monkeypatch.setenv("TRACEKIT_PROGRESS", "1")  # draw the bar although stderr is captured
    with err_console.capture() as captured, batch_progress(150) as (on_total, on_batch):
        on_total(10)
        on_batch(2, 300)
        time.sleep(0.05)
        on_batch(2, 300)
        on_total(12)
        time.sleep(0.05)
        on_batch(2, 300)
    lines = [line for line in captured.get().splitlines() if line.strip()]
    assert lines[2] == "12 rows to run in all now (was 10)"
    assert sum("the first batch sets the estimate" in line for line in lines) == 1
    (bar,) = [line for line in lines if line.startswith("rows ")]
    assert " 6/12 " in bar
    assert "- rows/s" not in bar and " rows/s" in bar  # the speed of all 6 rows
    assert "-:--:--" not in bar  # and a time left from it
