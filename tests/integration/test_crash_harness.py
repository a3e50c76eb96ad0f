"""The crash test's short form (issue 31, point 6): ``generate``, ``log`` and ``extract features``
on the embedded model with tiny settings, SIGKILLed at chosen points, run again to the end, and
compared bit for bit with an uninterrupted run. Few kills, to stay short: generate after the
model loaded and right after its first commit; log after the store was created, before its
first commit (a point where a rerun used to refuse the store); extract features right after its
first sentence file. The long form is ``python tests/crash_harness.py`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import crash_harness as harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = {
    "generate": [harness.Kill("after-load"), harness.Kill("after-commit", commit=1)],
    "log": [harness.Kill("after-load")],
    "extract features": [harness.Kill("after-commit", commit=1)],
}


@pytest.mark.parametrize("name", list(harness.JOBS))
def test_killed_then_rerun_equals_an_uninterrupted_run(name: str, tmp_path: Path, cli):
    job = harness.JOBS[name]

    def in_process(job: harness.Job, folder: Path) -> None:
        result = cli(*job.args(folder))
        assert result.exit_code == 0, result.output

    expected, _ = harness.reference(job, tmp_path / "reference", in_process)
    assert expected  # the uninterrupted run wrote outputs to compare
    outcome = harness.crash_and_compare(job, tmp_path / "trial", KILLS[name], expected)
    assert all("finished first" not in hit for hit in outcome.kills), outcome.kills
    assert outcome.equal, outcome.kills
    assert outcome.identical or not job.bitwise
    assert outcome.strays == []  # no temp file of a killed run is left behind
