"""Row tables on disk: CSV files (every value text, ``None`` written as an empty cell) and
JSONL files, parsed and written here only. The responses CSVs (:mod:`tracekit.storage.experiment`)
and the judge's input and output tables go through it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tracekit.errors import InputError
from tracekit.storage.atomic import atomic_open, write_text


def parse_csv(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts of text) and column names of CSV ``text``; quoted cells may hold newlines."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = list(reader.fieldnames or [])
    return [dict(row) for row in reader], columns


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with ``columns`` (others ignored, missing or ``None`` cells empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def read_table(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names of a ``.csv`` (all values text) or ``.jsonl`` file."""
    if not path.is_file():
        raise InputError(f"input file not found: {path}", "check --input")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not text.strip():
        raise InputError(f"input file {path} is empty", "judge a CSV or JSONL file with rows")
    if path.suffix.lower() == ".csv":
        rows, columns = parse_csv(text)
    else:
        rows, columns = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
            if not isinstance(item, dict):
                raise InputError(f"{path} line {number} is not a JSON object")
            rows.append(item)
            columns.extend(k for k in item if k not in columns)
    if not rows:
        raise InputError(f"input file {path} has no rows", "judge a CSV or JSONL file with rows")
    return rows, columns


def write_table(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write rows atomically as CSV (None -> empty cell) or JSONL (None -> null)."""
    if path.suffix.lower() == ".csv":
        write_text(path, csv_text(rows, columns))
        return
    with atomic_open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
