"""Provenance records of the activation store: which setups may share a store.

A record describes a logging setup (:func:`tracekit.actlog.logger.build_provenance`). Entries of
two setups may share a store when the :data:`PROVENANCE_COMPAT_FIELDS` agree and so do the
weights (:func:`tracekit.models.weights.weights_mismatch`). Records are matched by content, not
only by :func:`provenance_id`, so a store whose ids an older tracekit computed from fewer fields
is resumed under its own record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tracekit.errors import StoreError
from tracekit.models.weights import WEIGHTS_FIELDS, shown_value, weights_mismatch

PROVENANCE_COMPAT_FIELDS = (
    "model",
    "revision",
    "tokenizer_sha256",
    "prompt_format",
    "prompt_format_sha256",
    "generation",
    "layers",
    "sequence_mode",
    "dtype",
    "model_dtype",
)
"""Fields of a provenance record that must agree for entries to share a store."""


def provenance_id(record: Mapping[str, Any]) -> str:
    """Short stable id of the compatibility-relevant part of a provenance record."""
    compat = {name: record.get(name) for name in (*PROVENANCE_COMPAT_FIELDS, *WEIGHTS_FIELDS)}
    text = json.dumps(compat, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _field_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first compatibility field that differs, as ``field 'old' (store) != 'new' (this
    run)``; None when they all agree."""
    for name in PROVENANCE_COMPAT_FIELDS:
        if old.get(name) != new.get(name):
            was, now = shown_value(old.get(name)), shown_value(new.get(name))
            return f"{name} {was} (store) != {now} (this run)"
    return None


def describe_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The first compatibility field that differs (see :func:`_field_mismatch`)."""
    return _field_mismatch(old, new) or "provenance differs"


def provenance_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Why entries of ``new`` may not share a store with those of ``old``, None when they may."""
    return _field_mismatch(old, new) or weights_mismatch(old, new)


def matching_provenance(
    known: Mapping[str, Mapping[str, Any]], new: Mapping[str, Any]
) -> str | None:
    """The id of a record in ``known`` whose entries ``new``'s may share (its own id first)."""
    pid = provenance_id(new)
    candidates = [pid, *(k for k in known if k != pid)]
    return next(
        (k for k in candidates if k in known and provenance_mismatch(known[k], new) is None), None
    )


def refuse_other_setup(
    path: Path | str, known: Mapping[str, Mapping[str, Any]], new: Mapping[str, Any]
) -> None:
    """Raise the one-line error for logging ``new`` into the store at ``path`` holding ``known``
    (none of which ``new`` matches)."""
    old = next(iter(known.values()))
    mismatch = provenance_mismatch(old, new) or describe_mismatch(old, new)
    what = (
        f"with other weights of model {shown_value(old.get('model'))}"
        if mismatch.startswith(WEIGHTS_FIELDS)
        else "by another setup"
    )
    raise StoreError(
        f"store {path} was written {what}: {mismatch}",
        "log into a new --lmdb path, or pass --allow-mixed to keep both in one store",
    )


def check_entry_provenance(
    path: Path,
    records: Mapping[str, Any],
    entries: Iterable[tuple[str, Mapping[str, Any] | None, str]],
) -> None:
    """Refuse the store at ``path`` (to merge from) when any of its ``entries`` (key,
    metadata, status) points at a provenance id its ``records`` do not define: a merge would
    copy entries nobody can tell the setup of."""
    undefined: dict[str, str] = {}  # provenance id -> the first key pointing at it
    for key, meta, _ in entries:
        pid = str((meta or {}).get("provenance_id"))
        if pid not in records:
            undefined.setdefault(pid, key)
    if undefined:
        pid, key = next(iter(undefined.items()))
        raise StoreError(
            f"store {path} has entries whose provenance id is not among its provenance "
            f"records ({len(undefined)} undefined id(s), e.g. {pid!r} of entry {key[:16]}...)",
            "the store is damaged or was edited by hand: merge only stores tracekit wrote",
        )
