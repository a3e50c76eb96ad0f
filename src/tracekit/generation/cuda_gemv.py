"""A Triton matrix-vector product for small-batch decode steps, chosen per shape by timing.

At batch 1-32 a decode step's linear layers are matrix-vector products: the cost is reading
the weight once. cuBLAS' kernels for these shapes reach about half of the HBM bandwidth on an
H200 (one tile of output rows per multiprocessor, too few bytes in flight); this kernel gives
each program a thin slab of weight rows and a pipelined loop over K, so every multiprocessor
streams. It is registered as the custom op ``tracekit::gemv`` so ``torch.compile`` treats it
like a cuBLAS call, and CUDA graphs capture it.

Nothing here is trusted blindly: :func:`choose` runs the kernel once per shape against
``F.linear`` (result within bf16 rounding) and times both; the engine uses the kernel only
where it is correct and faster. Without Triton or CUDA every shape keeps ``F.linear``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_ROWS = 64
"""Largest batch (rows of x) the kernel serves; larger batches are matrix products."""

_STATE: dict[str, Any] = {}
_CHOICES: dict[tuple[int, int, int, str], int] = {}


def _build() -> Any:
    """Define the Triton kernel and the custom op once per process; ``None`` without Triton."""
    if "op" in _STATE:
        return _STATE["op"]
    _STATE["op"] = None
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
        return None

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (16, 256, 4, 4),
            (16, 512, 4, 3),
            (32, 256, 4, 4),
            (32, 128, 4, 5),
            (64, 128, 4, 4),
        ]
    ]

    @triton.jit
    def gemv_kernel(  # pragma: no cover - runs on the GPU (or the Triton interpreter)
        x_ptr,
        w_ptr,
        y_ptr,
        M,
        N,
        K: tl.constexpr,
        stride_xm,
        stride_wn,
        stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                mask=(offs_m[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                mask=(offs_n[:, None] < N) & (kk[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # the CPU interpreter has no benchmarker: one fixed configuration there
    tuned = (
        None if interpret else triton.autotune(configs=configs, key=["M", "N", "K"])(gemv_kernel)
    )

    def launch(grid: Any, *args: Any, **kwargs: Any) -> None:
        if tuned is None:
            gemv_kernel[grid](*args, BLOCK_N=16, BLOCK_K=128, **kwargs)
        else:
            tuned[grid](*args, **kwargs)

    # explicit schema: this module's annotations are strings (``from __future__``)
    @torch.library.custom_op(
        "tracekit::gemv", mutates_args=(), schema="(Tensor x, Tensor w) -> Tensor"
    )
    def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for ``x`` [M <= 64, K] and ``w`` [N, K], both contiguous in K."""
        m, k = x.shape
        n = w.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        block_m = max(16, triton.next_power_of_2(m))

        def grid(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        launch(grid, x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=block_m)
        return y

    @gemv.register_fake
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    _STATE["op"] = gemv
    return gemv


LINEAR, TRANSPOSED, TRITON = 0, 1, 2
"""How a linear layer runs: ``F.linear``; ``(w @ x.T).T`` (cuBLAS sees the tall-skinny
orientation and picks other kernels); the Triton kernel."""

_TIMINGS: dict[tuple[int, int, int, str], dict[str, float]] = {}


def linear(x: torch.Tensor, w: torch.Tensor, mode: int) -> torch.Tensor:
    """``x @ w.T`` the way :func:`choose` picked for this shape."""
    import torch
    import torch.nn.functional as F

    if mode == TRITON:
        return torch.ops.tracekit.gemv(x, w)
    if mode == TRANSPOSED:
        return torch.mm(w, x.t()).t()
    return F.linear(x, w)


def _nbytes(w: torch.Tensor) -> int:
    return max(1, w.numel() * w.element_size())


def _time(fn: Any, reps: int = 10) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph.

    A graph, because that is how the decode step runs them: timed from Python, a custom op's
    launch overhead (tens of microseconds) would hide kernels that take a few.
    """
    import torch

    fn()  # autotuning and library handles, outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def choose(rows: int, w: torch.Tensor, force: bool = False) -> int:
    """How to compute ``x @ w.T`` for ``rows`` rows: the fastest correct of ``F.linear``,
    the transposed product and (up to :data:`MAX_ROWS` rows, bf16/fp16) the Triton kernel.

    ``force`` picks the Triton kernel whenever it is correct, without timing (tests). Decided
    once per (rows, N, K, dtype, force) and process; called outside CUDA graph capture. Timing
    cycles over copies of ``w`` larger than L2 together: decode steps stream weights from HBM.
    """
    import torch
    import torch.nn.functional as F

    key = (rows, w.shape[0], w.shape[1], str(w.dtype) + ("/force" if force else ""))
    if key in _CHOICES:
        return _CHOICES[key]
    if w.device.type != "cuda" or not w.is_contiguous():
        _CHOICES[key] = LINEAR
        return LINEAR
    x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
    want = F.linear(x, w).float()
    candidates = {LINEAR: F.linear, TRANSPOSED: lambda a, b: linear(a, b, TRANSPOSED)}
    if rows <= MAX_ROWS and w.dtype in (torch.bfloat16, torch.float16):
        gemv = _build()
        if gemv is not None:
            candidates[TRITON] = gemv
    for mode in list(candidates):
        if mode == LINEAR:
            continue
        try:
            got = candidates[mode](x, w).float()
            err = float((got - want).norm() / want.norm().clamp(min=1e-12))
        except Exception as exc:  # a kernel that does not build must not stop generation
            logger.warning("linear mode %d unavailable for %s (%s)", mode, key, exc)
            err = float("inf")
        if not err <= 1e-2:
            logger.warning("linear mode %d off by %.2e for %s: not used", mode, err, key)
            del candidates[mode]
    if force:
        choice = TRITON if TRITON in candidates else LINEAR
    else:
        copies = [w] + [w.clone() for _ in range(min(15, (256 << 20) // _nbytes(w)))]
        times: dict[int, float] = {}
        for mode, fn in candidates.items():
            try:
                times[mode] = _time(lambda fn=fn: [fn(x, c) for c in copies]) / len(copies)
            except Exception as exc:  # e.g. a capture failure: that mode is not used
                logger.warning("linear mode %d not timed for %s (%s)", mode, key, exc)
        del copies
        if LINEAR not in times:
            _CHOICES[key] = LINEAR
            return LINEAR
        best = min(times, key=lambda m: times[m])
        # a faster alternative must beat cuBLAS' default clearly, not by timing noise
        choice = best if times[best] < 0.95 * times[LINEAR] else LINEAR
        _TIMINGS[key] = {("linear", "transposed", "triton")[m]: 1e3 * t for m, t in times.items()}
    _CHOICES[key] = choice
    return choice


def choices() -> dict[tuple[int, int, int, str], int]:
    """The decisions made so far (for benchmarks and logs)."""
    return dict(_CHOICES)


def timings() -> dict[tuple[int, int, int, str], dict[str, float]]:
    """Microseconds per product per candidate, for the shapes timed so far."""
    return dict(_TIMINGS)
