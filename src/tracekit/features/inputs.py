"""Reading the sentences CSV of ``extract features``: texts, labels, and their checks.

Every problem is found before anything is written: a missing column, an empty sentence or a
label outside the configured range is one :class:`InputError` naming the row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tracekit.errors import InputError


@dataclass(frozen=True)
class Sentences:
    """The rows of a sentences CSV, in file order (row i becomes ``sentence_{i:06d}.npz``)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        """Fingerprint of texts and labels, so a resumed run can tell the CSV changed."""
        payload = json.dumps([self.texts, self.labels], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(payload).hexdigest()


def read_sentences(
    path: Path, text_column: str, label_column: str, label_range: tuple[int, int]
) -> Sentences:
    """Read and check ``path``; row numbers in messages are 1-based data rows (header excluded)."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"sentences file not found: {path}", "check the --sentences path")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        from tracekit.storage.text import read_utf8

        read_utf8(path, "CSV")  # raises, naming the line
        raise
    except Exception as exc:  # pandas raises several parser error types; one message serves
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read sentences CSV {path}: {first}") from exc
    columns = [str(c) for c in frame.columns]
    for option, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in columns:
            raise InputError(
                f"{path} has no column '{column}' (columns: {', '.join(columns) or 'none'})",
                f"name the right one with {option}",
            )
    if frame.empty:
        raise InputError(f"{path} has no rows", "add sentences below the header")
    low, high = label_range
    texts: list[str] = []
    labels: list[int] = []
    for row, (text, raw_label) in enumerate(
        zip(frame[text_column], frame[label_column], strict=True), start=1
    ):
        if not text.strip():
            raise InputError(f"{path} row {row}: the '{text_column}' cell is empty")
        try:
            label = int(raw_label.strip())
        except ValueError:
            raise InputError(
                f"{path} row {row}: label '{raw_label}' in '{label_column}' is not an integer",
                f"labels are integers {low}-{high}",
            ) from None
        if not low <= label <= high:
            raise InputError(
                f"{path} row {row}: label {label} is outside {low}-{high}",
                "fix the label or set the allowed range with --label-range MIN-MAX",
            )
        texts.append(text)
        labels.append(label)
    return Sentences(texts=texts, labels=labels)
