"""The experiment layout: responses CSVs, activation files, metadata and resume bookkeeping.

One trait of one experiment lives in ``<experiments_dir>/<EXP>/<TRAIT>/``::

    trait_definition.json          the trait exactly as the run used it
    metadata.json                  model, template, generation parameters, layers, versions
    responses/pos.csv, neg.csv     final responses, rows sorted by id (written atomically)
    responses/parts/               resume journal: one JSON file per finished batch
    activations/metadata.json      layers, poolings, shapes, file names, source
    activations/{pos,neg}_{pooling}.npy   float32 [n_rows, n_layers, hidden], rows = CSV order
    activations/{pos,neg}_{pooling}.pt    with --pt: the same tensor (torch.load)
    activations/{pos,neg}_{pooling}_ids.npy   int64 row ids: the first axis of those files
    activations/parts/             slot files: activations by row id, written as batches finish

Resume: each batch writes its rows' activations into the slot files (when captured; flushed to
disk) and then its response part, atomically; a row is finished exactly when a response part
holds it. A killed run, started again, reads the parts, skips finished ids and loses none; the
final CSV and activation files are rebuilt at the end of every run (see
:mod:`tracekit.storage.activation_slots`: a complete run's slot file is renamed into place).
The response parts are kept (they are the journal); ``--force`` removes them together with the
outputs.

Row ids pair the polarities: pos row ``k`` and neg row ``k`` share the question and the
instruction pair. Anything that combines pos and neg pairs by id, never by row order.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from tracekit.errors import InputError, OutputExistsError
from tracekit.storage.atomic import (
    write_json,
    write_text,
)
from tracekit.storage.table import csv_text, parse_csv
from tracekit.storage.text import read_utf8

if TYPE_CHECKING:
    import numpy as np

    from tracekit.traits import TraitDefinition

logger = logging.getLogger(__name__)

Polarity = Literal["pos", "neg", "neutral"]
"""``neutral``: rows without an instruction (steered runs, see tracekit.engines.steering)."""
POLARITIES: tuple[Polarity, Polarity] = ("pos", "neg")

RESPONSE_COLUMNS = (
    "id",
    "question",
    "instruction",
    "prompt",
    "response",
    "finish_reason",
    "n_tokens",
)
"""Columns ``generate`` writes; ``trait_score`` (and ``coherence``) follow when judged."""
REQUIRED_COLUMNS = ("question", "prompt", "response")
"""Columns ``extract activations`` needs in a CSV that came from elsewhere."""


class _Under:
    """A :class:`TraitPaths` path: ``name`` under the trait root or under another of its
    paths (``parent``, an attribute name), so the layout reads as one table."""

    def __init__(self, name: str, parent: str = "root") -> None:
        self.name, self.parent = name, parent

    @overload
    def __get__(self, paths: None, owner: type) -> _Under: ...
    @overload
    def __get__(self, paths: TraitPaths, owner: type | None = None) -> Path: ...
    def __get__(self, paths: TraitPaths | None, owner: type | None = None) -> Path | _Under:
        if paths is None:
            return self
        parent: Path = getattr(paths, self.parent)
        return parent / self.name


@dataclass(frozen=True)
class TraitPaths:
    """Every path of one trait in one experiment."""

    root: Path

    trait_definition = _Under("trait_definition.json")
    metadata = _Under("metadata.json")
    responses_dir = _Under("responses")
    parts_dir = _Under("parts", "responses_dir")
    run_file = _Under("run.json", "parts_dir")
    """Settings of the run that wrote the parts (resume must use the same ones)."""
    activations_dir = _Under("activations")
    activation_parts_dir = _Under("parts", "activations_dir")
    activations_metadata = _Under("metadata.json", "activations_dir")
    vectors_dir = _Under("vectors")

    @classmethod
    def of(cls, experiments_dir: str | Path, experiment: str, trait: str) -> TraitPaths:
        return cls(Path(experiments_dir) / experiment / trait)

    def responses_csv(self, polarity: Polarity) -> Path:
        return self.responses_dir / f"{polarity}.csv"

    def activation_file(self, polarity: Polarity, pooling: str, suffix: str = ".npy") -> Path:
        return self.activations_dir / f"{polarity}_{pooling}{suffix}"

    def ids_file(self, polarity: Polarity, pooling: str) -> Path:
        return self.activations_dir / f"{polarity}_{pooling}_ids.npy"


# --- resume journal -------------------------------------------------------------------------
def _part_name(polarity: Polarity, first_id: int) -> str:
    return f"{polarity}-{first_id:07d}"


def write_batch_part(
    paths: TraitPaths,
    polarity: Polarity,
    rows: Sequence[Mapping[str, Any]],
    pooled: Mapping[str, np.ndarray] | None = None,
    tag: str = "",
) -> None:
    """Record one finished batch: activations first (into the slot files, flushed), then the
    response rows (the commit).

    ``tag`` is appended to the part's name (data-parallel runs name the process that wrote it;
    readers glob ``{polarity}-*``, so tagged and untagged parts are read alike).
    """
    from tracekit.storage.activation_slots import write_slots

    if not rows:
        return
    name = _part_name(polarity, min(int(r["id"]) for r in rows)) + tag
    if pooled:
        write_slots(paths, polarity, [int(r["id"]) for r in rows], pooled)
    write_json(paths.parts_dir / f"{name}.json", {"polarity": polarity, "rows": list(rows)})


def read_parts(paths: TraitPaths, polarity: Polarity) -> dict[int, dict[str, Any]]:
    """Finished rows of ``polarity`` by id, from the journal."""
    rows: dict[int, dict[str, Any]] = {}
    if not paths.parts_dir.is_dir():
        return rows
    for part in sorted(paths.parts_dir.glob(f"{polarity}-*.json")):
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(
                f"resume journal file {part} is unreadable: {exc}",
                "delete it to regenerate that batch, or pass --force to start over",
            ) from None
        for row in data.get("rows", []):
            rows[int(row["id"])] = row
    return rows


def check_run_settings(
    paths: TraitPaths, settings: Mapping[str, Any], force: bool, partial: bool = False
) -> bool:
    """Compare ``settings`` with those of an earlier partial run; True if resuming.

    Writes the settings when there is nothing to resume. A different earlier run is an error
    unless ``force`` (the caller then clears the trait with :func:`clear_outputs`).
    ``partial``: ``settings`` are some of the keys (those known before the model loads): only
    they are compared, and nothing is written.
    """
    canonical = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if paths.run_file.is_file():
        previous = json.loads(paths.run_file.read_text(encoding="utf-8"))
        keys = set(canonical) if partial else set(previous) | set(canonical)
        changed = sorted(k for k in keys if previous.get(k) != canonical.get(k))
        if changed:
            raise OutputExistsError(
                f"{paths.root} holds results of a run with different settings "
                f"({', '.join(changed)})",
                "pass --force to discard them, or use another --experiment",
            )
        return True
    if not partial:
        write_json(paths.run_file, canonical)
    return False


def check_unjournaled_outputs(paths: TraitPaths) -> None:
    """Refuse outputs in the trait folder that no ``generate`` run journaled there.

    A folder whose journal (:attr:`TraitPaths.run_file`) exists holds an earlier run's outputs,
    which a rerun resumes or rebuilds (:func:`check_run_settings` compares the settings).
    Anything else there (the seeds' ``responses/*.csv`` with their ``trait_score`` column,
    ``activations/all_layers.pt``, a hand-made CSV) would be replaced by files of other rows:
    refused unless ``--force`` (which removes them with :func:`clear_outputs`).
    """
    if paths.run_file.is_file():
        return
    found = [paths.responses_csv(p) for p in POLARITIES] + [paths.metadata]
    for folder in (paths.activations_dir, paths.root / "generations"):
        if folder.is_dir():
            found += sorted(f for f in folder.rglob("*") if f.is_file())
    existing = [str(p.relative_to(paths.root)) for p in found if p.is_file()]
    if existing:
        shown = ", ".join(existing[:4]) + (
            f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        )
        raise OutputExistsError(
            f"{paths.root} holds outputs that no tracekit generate run wrote there ({shown})",
            "pass --force to replace them (they are deleted), or use another --experiment",
        )


def check_activation_metadata(paths: TraitPaths) -> None:
    """Refuse an ``activations/metadata.json`` that tracekit did not write (the seeds'
    extraction metadata): writing activations would replace it. tracekit's own is updated
    (it keeps one entry per pooling)."""
    target = paths.activations_metadata
    if not target.is_file():
        return
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("poolings"), dict):
        raise OutputExistsError(
            f"{target} was not written by tracekit (no 'poolings' entry) and would be replaced",
            "pass --force to replace it, or move it away first",
        )


def clear_outputs(paths: TraitPaths) -> None:
    """Remove responses, activations, generation caches, metadata and the journal of one
    trait (``--force``)."""
    for folder in (paths.responses_dir, paths.activations_dir, paths.root / "generations"):
        if folder.is_dir():
            shutil.rmtree(folder)
    for file in (paths.metadata,):
        file.unlink(missing_ok=True)


# --- final files ----------------------------------------------------------------------------
def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = list(RESPONSE_COLUMNS)
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def write_responses_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows (sorted by id) as CSV atomically; extra keys become extra columns."""
    write_text(path, csv_text(sorted(rows, key=lambda r: int(r["id"])), _columns(rows)))


def read_responses_csv(path: Path, required: Sequence[str] = REQUIRED_COLUMNS) -> list[dict]:
    """Rows of a responses CSV (``generate``'s or one made elsewhere, e.g. by vLLM).

    Without an ``id`` column rows get ids ``0..n-1`` in file order (pairing then relies on the
    pos and neg files listing the same questions in the same order; say so in the docs).
    """
    if not path.is_file():
        raise InputError(f"responses file not found: {path}", "run 'tracekit generate' first")
    rows, columns = parse_csv(read_utf8(path, "CSV"))
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(
            f"{path} is missing column(s) {', '.join(missing)}",
            f"a responses CSV needs the columns {', '.join(required)} (id optional)",
        )
    seen: set[int] = set()
    for index, row in enumerate(rows):
        raw = row.get("id")
        try:
            row_id = int(raw) if raw not in (None, "") else index
        except ValueError:
            raise InputError(f"{path}: row {index + 1} has a non-integer id '{raw}'") from None
        if row_id in seen:
            raise InputError(f"{path}: id {row_id} appears twice", "ids must be unique per file")
        seen.add(row_id)
        row["id"] = row_id
    return rows


def has_scores(csv_path: Path, metrics: tuple[str, ...]) -> bool:
    """Whether every row of a responses CSV has a score column for each metric."""
    if not csv_path.is_file():
        return False
    rows = read_responses_csv(csv_path, ())
    return all(f"{m}_score" in r for r in rows for m in metrics)


def carry_extra_columns(csv_path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep columns added to an earlier CSV (e.g. judge scores) for rows that still exist:
    same id and same response text, so a score never lands on a response it did not judge."""
    if not csv_path.is_file():
        return rows
    try:
        old = {
            (int(r["id"]), str(r.get("response", ""))): r for r in read_responses_csv(csv_path, ())
        }
    except Exception:  # an unreadable old CSV is rebuilt from the journal, which is the truth
        return rows
    merged = []
    for row in rows:
        extra = {
            k: v
            for k, v in old.get((int(row["id"]), str(row["response"])), {}).items()
            if k not in row and k not in RESPONSE_COLUMNS
        }
        merged.append({**row, **extra})
    return merged


def ensure_trait_definition(paths: TraitPaths, trait: TraitDefinition, force: bool) -> None:
    """Save the trait definition; refuse to replace a different one without ``force``.

    The file there is compared as a trait, so a persona_vectors-style file (no name or
    description, read with the defaults :func:`~tracekit.traits.load_trait` gives it) that
    defines this same trait is kept as it is."""
    from tracekit.traits import TraitDefinition

    target = paths.trait_definition
    if target.is_file() and not force:
        try:
            same = TraitDefinition.from_file(target) == trait
        except InputError:
            same = False
        if not same:
            raise OutputExistsError(
                f"{target} differs from the trait definition given",
                "pass --force to replace it (and regenerate), or use another --experiment",
            )
        return
    write_text(target, trait.to_json())
