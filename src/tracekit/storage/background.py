"""One write at a time on a background thread, so a job's next batch runs while it is written.

Used where a batch's results are large (every layer captured) and a write costs as much as the
next batch's device work: the generate job's journal parts and the log job's store
transactions. At most one finished batch is not yet on disk at any time; a job drains it before
it merges, finishes or fails, so a crash of the next batch does not lose the finished one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class BackgroundWrites:
    """Runs submitted writes one after another on one thread, one write in flight.

    :meth:`submit` first waits for the write before it (and raises its error, if it failed),
    so the caller holds at most two batches' data: the one being written and the one being
    made. Writes that must stay on one thread (an LMDB write transaction) all run on the same
    one.
    """

    def __init__(self, name: str = "tracekit-write") -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Any = None
        self.wait_seconds = 0.0
        """Time the caller spent waiting for a write to finish (its device idle meanwhile)."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Start ``fn(*args, **kwargs)`` once the write before it is done; returns what that
        earlier write returned (``None`` when there was none)."""
        before = self.drain()
        self._pending = self._pool.submit(fn, *args, **kwargs)
        return before

    def drain(self) -> Any:
        """Wait for the write in flight; returns what it returned (``None`` if none was)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        started = time.perf_counter()
        try:
            return pending.result()
        finally:
            self.wait_seconds += time.perf_counter() - started

    def close(self) -> Any:
        """:meth:`drain`, then stop the thread; returns what the last write returned."""
        try:
            return self.drain()
        finally:
            self._pool.shutdown(wait=True)
