"""BackgroundWrites: one write in flight on one thread, results and errors handed back."""

import threading
import time

import pytest

from tracekit.storage.background import BackgroundWrites


def test_writes_run_in_order_on_one_thread_one_at_a_time():
    writes = BackgroundWrites("tracekit-test")
    events: list[tuple[str, int, str]] = []

    def write(n: int, seconds: float) -> int:
        events.append(("start", n, threading.current_thread().name))
        time.sleep(seconds)
        events.append(("end", n, threading.current_thread().name))
        return n * 10

    assert writes.submit(write, 1, 0.2) is None  # nothing before it
    assert ("end", 1) not in [e[:2] for e in events]  # returned while the write goes on
    # the second submit waits for the first write and hands back its result
    assert writes.submit(write, 2, 0.0) == 10
    assert ("end", 1) in [e[:2] for e in events]
    assert writes.close() == 20
    assert [e[:2] for e in events] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    names = {e[2] for e in events}
    assert len(names) == 1 and names.pop().startswith("tracekit-test")
    assert writes.wait_seconds > 0.1  # the caller waited for the first write


def test_a_failed_write_is_raised_by_the_next_submit_and_its_write_does_not_run():
    writes = BackgroundWrites()
    ran: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    writes.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writes.submit(ran.append, 1)
    assert ran == []
    assert writes.close() is None  # nothing left in flight
