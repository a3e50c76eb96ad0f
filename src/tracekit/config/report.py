"""``report steering``'s configuration; the work is :mod:`tracekit.report.steering`."""

from __future__ import annotations

from pathlib import Path

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import ReportPolarity


class SteeringReportConfig(TracekitConfig):
    """Options of ``tracekit report steering``."""

    experiment: str
    trait: str
    experiments_dir: Path = Path("experiments")
    layer: int | None = None
    """The steered layer to report; needed only when the trait has sweeps at several."""
    measure: str | None = None
    """A numeric CSV column, or ``words:FILE`` (fraction of words in a word list)."""
    polarity: ReportPolarity = ReportPolarity.all
    """Which CSV of each set to read (``all``: every one; ``--steer-prompts trait`` sets have
    ``pos.csv`` and ``neg.csv``)."""
    output: Path | None = None
    """The PNG; default ``<trait>/steering/L<layer>/dose_response.png``."""
    plot: bool = True
    force: bool = False
