"""Capture rings: the decode step stores each captured layer's state, the host adds them up.

A captured decode step used to add each captured layer's state into float32 response sums
(``sums += state * weight``). That add reads the sums, and they come from memory: the step
streams the model's weights through L2 and evicts them. The kernel that adds them also computes
the next norm, so the whole step waits for the read, once per captured layer. With a ring, the
step instead stores ``state * weight`` (in the model's dtype: weights are 0 or 1, so this is
exact) into slot ``step % K`` of a ``[K, batch, hidden]`` buffer; a store waits for nothing.
The host, which counts the steps it replays, calls :meth:`CaptureRings.flush` every K steps
and once at the end of a run: one kernel adds the filled slots into the sums, in step order,
so the sums are bit for bit those of an add per step of the stored states. (The add inside
the compiled step summed the states before their rounding to the model's dtype, since
inductor keeps a fused kernel's intermediates in float32; with bfloat16 the two differ by
that rounding.)
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from tracekit.engines.cuda.ops.gemv import import_kernel

if TYPE_CHECKING:
    import torch

BLOCK = 1024
"""Columns (of batch x hidden) per program of the flush kernel."""


@functools.cache
def _kernel() -> Any:
    """The flush kernel, defined once per process; ``None`` without Triton."""
    found = import_kernel("tracekit.engines.cuda.ops._ring_kernel", "ring_flush_kernel")
    return None if found is None else found[1]


def _offsets(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 element offsets of ``tensors`` from the first one (all of one dtype)."""
    import torch

    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    gaps = [t.data_ptr() - base for t in tensors]
    if any(gap % size for gap in gaps):  # pragma: no cover - allocators align far more
        raise RuntimeError("capture buffers are not aligned to their element size")
    return torch.tensor([gap // size for gap in gaps], dtype=torch.long, device=tensors[0].device)


class CaptureRings:
    """A ring of ``size`` steps per response-sum buffer of ``sums`` (float32 ``[B, hidden]``
    each, by layer), in ``dtype``."""

    def __init__(self, sums: dict[int, torch.Tensor], size: int, dtype: torch.dtype) -> None:
        import torch

        if size < 1 or not sums:
            raise ValueError("a capture ring needs at least one slot and one layer")
        self.size = size
        self.sums = sums
        self.rings = {
            layer: torch.zeros((size, *buf.shape), dtype=dtype, device=buf.device)
            for layer, buf in sums.items()
        }
        first = next(iter(sums.values()))
        self.width = first.numel()
        sums_list, rings_list = list(sums.values()), list(self.rings.values())
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        self._use_kernel = (first.is_cuda or interpret) and _kernel() is not None
        if self._use_kernel:
            self._args = (
                sums_list[0],
                _offsets(sums_list),
                rings_list[0],
                _offsets(rings_list),
            )

    def flush(self, count: int) -> None:
        """Add slots ``0 .. count - 1`` of every ring into its sums, in slot order (the steps
        since the last flush, the first of them in slot 0)."""
        if count < 1:
            return
        if count > self.size:
            raise ValueError(f"{count} slots to flush from a ring of {self.size}")
        if not self._use_kernel:
            for layer, buf in self.sums.items():
                ring = self.rings[layer]
                for k in range(count):
                    buf.add_(ring[k].float())
            return
        grid = (len(self.sums), -(-self.width // BLOCK))
        _kernel()[grid](*self._args, self.width, count, RING=self.size, BLOCK=BLOCK)
