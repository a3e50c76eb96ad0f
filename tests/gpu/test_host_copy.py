"""HostCopy on a GPU: values are taken as they stand when the copy is queued, and the
transfer to the host runs beside work queued after it instead of ahead of it."""

from __future__ import annotations

import pytest
import torch

from tracekit.engines.interface import HostCopy

pytestmark = pytest.mark.gpu


def test_values_are_taken_when_queued_though_later_work_overwrites_them():
    n = 64 * 2**20  # 256 MB: the copy is still running when the overwrite is queued
    buffer = torch.arange(n, device="cuda", dtype=torch.float32)
    state = torch.full((8,), 3, device="cuda", dtype=torch.long)
    expected = torch.arange(n, dtype=torch.float32)
    for _ in range(3):
        copy = HostCopy({"buffer": buffer, "state": state[:5]})
        buffer.fill_(-1.0)  # what a next batch's prefill does to a graph's static outputs
        state.zero_()
        out = copy.wait()
        assert torch.equal(out["buffer"], expected)
        assert out["state"].tolist() == [3] * 5
        assert out["buffer"].is_pinned()
        buffer.copy_(expected.to("cuda"))
        state.fill_(3)


def test_the_transfer_does_not_hold_back_work_queued_after_it():
    big = torch.ones(128 * 2**20, device="cuda", dtype=torch.float32)  # 512 MB over the bus
    HostCopy({"big": big}).wait()  # pinned memory allocated once, outside the check
    torch.cuda.synchronize()
    copy = HostCopy({"big": big})
    later = torch.cuda.Event()
    later.record()  # work queued on the producing stream after the copy
    later.synchronize()
    # queued on the same stream, this event would only complete after the 512 MB transfer
    assert not copy.ready(), "the stream's later work waited for the transfer to the host"
    assert torch.equal(copy.wait()["big"], torch.ones(128 * 2**20))
    assert copy.ready()


def test_without_snapshot_the_memory_is_not_reused_before_the_transfer_landed():
    """``snapshot=False`` copies the caller's own tensors as they are; freed right after,
    their memory must not go to later work on the producing stream until the transfer read
    it (a 256 MB transfer runs for milliseconds; the overwrite below takes microseconds)."""
    n = 64 * 2**20
    expected = torch.arange(n, dtype=torch.float32)
    for _ in range(3):
        fresh = torch.arange(n, device="cuda", dtype=torch.float32)
        copy = HostCopy({"fresh": fresh}, snapshot=False)
        del fresh
        reused = torch.empty(n, device="cuda", dtype=torch.float32)  # same size: same block
        reused.fill_(-1.0)
        assert torch.equal(copy.wait()["fresh"], expected)
        del reused
