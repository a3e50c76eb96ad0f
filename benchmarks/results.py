"""What every benchmark shares: its result rows written as CSV (``--csv PATH``).

The benchmarks run on the installed package (``pip install -e .``, or ``PYTHONPATH=src`` from a
checkout); this folder is on ``sys.path`` as the script's own folder, so they import this
module as ``from results import ...``.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def add_csv_option(parser: argparse.ArgumentParser) -> None:
    """``--csv PATH``: also write the result rows there."""
    parser.add_argument(
        "--csv", type=Path, default=None, help="also write the result rows to this CSV file"
    )


def write_csv(path: Path | None, rows: Iterable[Mapping[str, Any]]) -> None:
    """``rows`` as CSV at ``path`` (nothing when ``path`` is None): one column per key, in the
    order the keys first appear."""
    if path is None:
        return
    rows = list(rows)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
