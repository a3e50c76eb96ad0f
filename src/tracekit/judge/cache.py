"""The judge cache: one SQLite file of raw judge answers keyed by what determines them.

Key = SHA-256 of (backend, judge model, metric, prompt template, question, response). The value
is the judge's raw answer (:class:`~tracekit.judge.scoring.RawAnswer`), so scoring options
such as ``min_mass`` apply to cached answers too. Failed judgments are never stored (a rerun
retries them). Every answer is committed as soon as it arrives, so a crash loses only the
requests in flight. Nothing secret is stored: no API key, no headers, no base URL.

Why SQLite and not LMDB (docs/judge.md has the long form): the cache is small (hundreds of
bytes per answer), written one row at a time by a single event loop, and read by key; SQLite is
in the standard library, needs no map size, is one file a user can inspect with ``sqlite3``,
and its WAL mode lets several judge runs (or ``generate`` jobs) share one cache safely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from tracekit.errors import StoreError
from tracekit.judge.scoring import RawAnswer

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def default_cache_path() -> Path:
    """``<tracekit cache dir>/judge/cache.sqlite`` (``TRACEKIT_CACHE_DIR`` moves it)."""
    from tracekit.models.embedded import cache_root

    return cache_root() / "judge" / "cache.sqlite"


def cache_key(
    backend: str, judge_model: str, metric: str, template: str, question: str, response: str
) -> str:
    """Hex SHA-256 of the six things that determine a judge's answer."""
    payload = json.dumps(
        [backend, judge_model, metric, template, question, response], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """A SQLite-backed map from :func:`cache_key` to :class:`RawAnswer`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit: each put is its own transaction, durable once it returns
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(
                    f"judge cache {path} has schema version {version}, expected {SCHEMA_VERSION}",
                    "pass --cache with another path, or delete the old cache file",
                )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, backend TEXT, "
                "judge_model TEXT, metric TEXT, answer TEXT NOT NULL, created REAL)"
            )
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"cannot open judge cache {path}: {exc}",
                "pass --cache with another path, or --no-cache",
            ) from None

    def get_many(self, keys: Iterable[str]) -> dict[str, RawAnswer]:
        """The cached answers among ``keys`` (unknown keys are absent from the result)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, RawAnswer] = {}
        for start in range(0, len(wanted), 500):  # stay under SQLite's variable limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk
            ).fetchall()
            for key, answer in rows:
                try:
                    found[key] = RawAnswer.from_json(answer)
                except (ValueError, TypeError, KeyError):
                    logger.warning("ignoring an unreadable judge cache entry %s", key[:12])
        return found

    def put(self, key: str, backend: str, judge_model: str, metric: str, raw: RawAnswer) -> None:
        """Store one answer (committed before this returns)."""
        self._db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
            (key, backend, judge_model, metric, raw.to_json(), time.time()),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()
