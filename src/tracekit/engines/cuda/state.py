"""The device state of a decode step: per-row bookkeeping, KV caches and capture sinks.

Every tensor here has a static address for the life of a runner (:mod:`.runner`), so a whole
step that reads and writes them is recorded once as a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class StepState(NamedTuple):
    """Device tensors that one decode step reads and writes (static addresses)."""

    cur_tok: torch.Tensor  # [B] long, token fed next
    # the step's position is one counter, the cache slot (decode step = slot - start): one
    # kernel per step updates it, where a step and a slot counter took two (not fused)
    slot: torch.Tensor  # [1] long, cache slot of the token fed next (prompt length - 1 at first)
    start: torch.Tensor  # [1] long, the prompt length: the slot of the first token fed
    pad_len: torch.Tensor  # [B] long, left padding of each row
    alive: torch.Tensor  # [B] bool, row still emitting tokens
    feed_weight: torch.Tensor  # [B] float32, 1 when the token fed next belongs to the response
    n_kept: torch.Tensor  # [B] long, response length so far
    eos_hit: torch.Tensor  # [B] bool
    out_tokens: torch.Tensor  # [B, max_new + 1] long
    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] long


class Sink(NamedTuple):
    """What a decode step does where one tracekit layer is read (see :func:`capture`): add
    the steering delta, then capture the (steered) state."""

    buf: torch.Tensor | None
    """float32 ``[B, hidden]`` response sums, or a ring ``[K, B, hidden]`` in the model's dtype
    (:attr:`FastDecoder.capture_ring`); ``None``: the layer is steered, not captured."""
    weight: torch.Tensor  # [B] float32 feed weights of this step's tokens (0 or 1)
    slot: torch.Tensor  # [1] long, the step's cache slot
    start: torch.Tensor  # [1] long, the first response slot (slot - start picks the ring slot)
    delta: torch.Tensor | None = None
    """Steering: ``coef * v`` ``[hidden]`` in the model's dtype, added to the state of every
    row before it is captured and read by the next block (a runner-owned buffer, so a captured
    graph replays the value copied in last; :mod:`tracekit.engines.steering`)."""


def capture(sink: Sink | None, h: torch.Tensor) -> torch.Tensor:
    """The state ``h`` with the sink's steering added; adds it ``* weight`` into the response
    sums, or stores it in the ring's slot for this step. Returns the state the next block reads.

    The store is what makes the ring worth having: adding into the float32 sums reads them
    from memory in the middle of the step (the step's weights have evicted them from L2), and
    the kernel that also computes the next norm waits for that read. A store waits for
    nothing; :meth:`tracekit.engines.cuda.ops.ring.CaptureRings.flush` adds the ring into the
    sums every K steps. Weights are 0 or 1, so ``h * weight`` in the model's dtype is exact:
    the sums are those of the states as stored, the values the next block reads. (The add in
    the step sums ``h`` before its rounding to the model's dtype, since inductor keeps a fused
    kernel's intermediates in float32; that is the only difference.)"""
    if sink is None:
        return h
    buf, weight, slot, start, delta = sink
    if delta is not None:
        h = h + delta
    if buf is None:
        return h
    if buf.dim() == 3:
        ring = buf.shape[0]
        buf.index_copy_(0, (slot - start) % ring, (h * weight[:, None].to(h.dtype))[None])
    else:
        buf.add_(h.float() * weight[:, None])
    return h


class Caches(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor
