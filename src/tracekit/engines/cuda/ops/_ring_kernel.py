"""Triton source of :mod:`tracekit.engines.cuda.ops.ring` (imported only where Triton is).

Kept in a module of its own, like the other kernels: the rest of tracekit must import without
Triton.
"""

import triton
import triton.language as tl


@triton.jit
def ring_flush_kernel(  # pragma: no cover - GPU or interpreter
    sums_ptr,
    sums_off_ptr,
    ring_ptr,
    ring_off_ptr,
    n,
    count,
    RING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """For each layer (program axis 0): ``sums += ring[0] + ... + ring[count - 1]``, added one
    slot at a time in float32, over columns ``BLOCK`` at a time (program axis 1).

    Every layer's tensors are separate allocations: a layer's sums and ring sit at the element
    offsets ``sums_off_ptr[layer]`` and ``ring_off_ptr[layer]`` from the first layer's, so one
    launch serves all layers. All ``RING`` slots are loaded (the unused ones masked), so the
    loads are in flight together."""
    layer = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    sums = sums_ptr + tl.load(sums_off_ptr + layer) + cols
    ring = ring_ptr + tl.load(ring_off_ptr + layer) + cols
    acc = tl.load(sums, mask=mask, other=0.0)
    for k in tl.static_range(RING):
        acc += tl.load(ring + k * n, mask=mask & (k < count), other=0.0).to(tl.float32)
    tl.store(sums, acc, mask=mask)
