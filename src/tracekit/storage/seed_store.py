"""The seed's LMDB activation store (seed 003's activation logger), read only.

Layout: one LMDB environment (a directory holding ``data.mdb``) whose main database maps the
SHA-256 hex digest of the formatted prompt (the same key tracekit uses) to a value that is
either

- a UTF-8 JSON object: the entry's metadata (``generation``, ``model``, ``input_length``,
  ``timestamp``, ...), or ``{"activations": ..., "metadata": {...}}``; or
- a pickle of ``{"activations": ..., "metadata": {...}}`` (activations as numpy arrays, alone
  or in a dict by layer name).

Pickles are read by :class:`~tracekit.storage.restricted_pickle.RestrictedUnpickler`, which
builds plain containers, strings, numbers and numpy arrays and refuses every other class by name,
so reading a store cannot run code from it. ``allow_pickle=True`` uses :mod:`pickle` itself, which
runs any code the store holds: for stores whose values hold other objects (torch tensors).

:func:`open_any_store` opens either kind: a tracekit store
(:mod:`tracekit.storage.activation_store`) or this one.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracekit.errors import UnsafeInputError
from tracekit.storage.activation_store import (
    DB_ACTIVATIONS,
    DB_INFO,
    DB_META,
    ActivationStore,
    StoreHandle,
    StoreStats,
    _check_store_path,
    _open_env,
    count_array,
)
from tracekit.storage.restricted_pickle import UnsafePickleError, restricted_loads

SEED_FORMAT = "seed-003-lmdb"
"""``StoreStats.format`` of a seed store."""
_KEY = re.compile(rb"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SeedEntry:
    """One decoded value: its metadata (None when unreadable), activations (None when the
    value has none) and the status ``ok``, ``missing`` (no activations) or ``corrupt``."""

    key: str
    metadata: dict[str, Any] | None
    activations: Any
    status: str
    kind: str
    """``json`` or ``pickle``."""


def is_seed_store(path: str | Path) -> bool:
    """Whether ``path`` is an LMDB environment whose main database holds prompt-hash keys
    (and none of a tracekit store's named databases)."""
    store = Path(path)
    if not (store / "data.mdb").is_file():
        return False
    env = _open_env(store, readonly=True)
    try:
        with env.begin() as txn, txn.cursor() as cursor:
            names = list(itertools.islice(cursor.iternext(values=False), 64))
    finally:
        env.close()
    keys = [bytes(k) for k in names]
    if not keys or {DB_ACTIVATIONS, DB_META, DB_INFO} & set(keys):
        return False
    return all(_KEY.match(k) for k in keys)


class SeedStore(StoreHandle):
    """A read-only view of a seed store, with :class:`ActivationStore`'s reading interface
    for ``reconstruct`` and ``log stats`` (``provenance``, ``iter_metadata``, ``stats``)."""

    needs_prompt = False
    """Seed metadata need not repeat the prompt: the key is its hash."""

    def __init__(self, path: str | Path, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        _check_store_path(self.path, for_writing=False)
        self.env = _open_env(self.path, readonly=True)

    @property
    def provenance(self) -> dict[str, dict[str, Any]]:
        return {}  # the seed's logger recorded none

    def _decode(self, key: str, value: bytes) -> SeedEntry:
        stripped = value.lstrip()
        if stripped[:1] in (b"{", b"["):
            try:
                data = json.loads(value)
            except ValueError:
                return SeedEntry(key, None, None, "corrupt", "json")
            return _split(key, data, "json")
        try:
            data = pickle.loads(value) if self.allow_pickle else restricted_loads(value)  # noqa: S301
        except UnsafePickleError as exc:
            raise UnsafeInputError(
                f"entry {key} of {self.path} is a pickle that needs {exc}, which tracekit does "
                "not load (only containers, strings, numbers and numpy arrays)",
                "pass --allow-pickle to load it with pickle, which EXECUTES CODE from the "
                "store: only for a store you made yourself",
            ) from None
        except Exception:  # a truncated or damaged pickle: counted, like a corrupt entry
            return SeedEntry(key, None, None, "corrupt", "pickle")
        return _split(key, data, "pickle")

    def entries(self) -> Iterator[tuple[SeedEntry, int]]:
        """Every entry decoded, with its value's size in bytes, in key order."""
        with self.env.begin() as txn, txn.cursor() as cursor:
            for raw_key, value in cursor:
                key = bytes(raw_key).decode("utf-8", "replace")
                yield self._decode(key, bytes(value)), len(value)

    def iter_metadata(self) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        """(key, metadata or None when unreadable, activations status) per entry.

        A JSON value holding only metadata counts as ``ok``: the seed's JSON logger kept no
        activations next to it, and its reconstruct used every such entry."""
        for entry, _ in self.entries():
            status = "ok" if entry.kind == "json" and entry.status == "missing" else entry.status
            yield entry.key, entry.metadata, status

    def stats(self) -> StoreStats:
        """Entries, arrays (by name, from the decoded values) and bytes of the store."""
        arrays: dict[str, dict[str, Any]] = {}
        entries = with_acts = act_bytes = meta_bytes = 0
        for entry, size in self.entries():
            entries += 1
            if entry.activations is None:
                meta_bytes += size
                continue
            with_acts += 1
            act_bytes += size
            named = (
                entry.activations
                if isinstance(entry.activations, dict)
                else {"activations": entry.activations}
            )
            for name, array in named.items():
                shape = tuple(getattr(array, "shape", ()))
                dtype = str(getattr(array, "dtype", type(array).__name__))
                count_array(arrays, str(name), dtype, shape)
        counts = (entries, with_acts, act_bytes, meta_bytes)
        return StoreStats.of_store(self, counts, arrays, provenance={}, format=SEED_FORMAT)


def _split(key: str, data: Any, kind: str) -> SeedEntry:
    """Metadata and activations of a decoded value (``{activations, metadata}`` or metadata)."""
    if not isinstance(data, dict):
        return SeedEntry(key, None, None, "corrupt", kind)
    if isinstance(data.get("metadata"), dict):
        acts = data.get("activations")
        return SeedEntry(key, data["metadata"], acts, "ok" if acts is not None else "missing", kind)
    return SeedEntry(key, data, None, "missing", kind)


def open_any_store(path: str | Path, allow_pickle: bool = False) -> ActivationStore | SeedStore:
    """A tracekit store, or a seed store (see the module docstring) when ``path`` is one."""
    store = Path(path)
    _check_store_path(store, for_writing=False)
    if is_seed_store(store):
        return SeedStore(store, allow_pickle=allow_pickle)
    return ActivationStore(store)
