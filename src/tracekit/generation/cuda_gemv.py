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
_CHOICES: dict[tuple[int, int, int, str], bool] = {}


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


def linear(x: torch.Tensor, w: torch.Tensor, use_gemv: bool) -> torch.Tensor:
    """``F.linear(x, w)``; through the Triton kernel when ``use_gemv`` (see :func:`choose`)."""
    import torch
    import torch.nn.functional as F

    if use_gemv:
        return torch.ops.tracekit.gemv(x, w)
    return F.linear(x, w)


def _nbytes(w: torch.Tensor) -> int:
    return max(1, w.numel() * w.element_size())


def _time(fn: Any, reps: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def choose(rows: int, w: torch.Tensor, force: bool = False) -> bool:
    """True when the Triton kernel computes ``x @ w.T`` for ``rows`` rows correctly and faster.

    ``force`` skips the timing (correctness is still checked). Decided once per
    (rows, N, K, dtype, force) and process; called outside CUDA graph capture.
    """
    import torch
    import torch.nn.functional as F

    key = (rows, w.shape[0], w.shape[1], str(w.dtype) + ("/force" if force else ""))
    if key in _CHOICES:
        return _CHOICES[key]
    use = False
    if (
        w.device.type == "cuda"
        and rows <= MAX_ROWS
        and w.dtype in (torch.bfloat16, torch.float16)
        and w.is_contiguous()
    ):
        gemv = _build()
        if gemv is not None:
            try:
                x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
                want = F.linear(x, w).float()
                got = gemv(x, w).float()
                err = float((got - want).norm() / want.norm().clamp(min=1e-12))
                if err > 1e-2:
                    logger.warning("Triton gemv off by %.2e for %s: using cuBLAS", err, key)
                elif force:
                    use = True
                else:
                    # time over enough weight copies that L2 cannot hold them: decode steps
                    # stream every weight from HBM
                    copies = [w] + [w.clone() for _ in range(min(15, (256 << 20) // _nbytes(w)))]
                    t_gemv = _time(lambda: [gemv(x, c) for c in copies]) / len(copies)
                    t_blas = _time(lambda: [F.linear(x, c) for c in copies]) / len(copies)
                    del copies
                    use = t_gemv < 0.97 * t_blas
                    logger.debug(
                        "gemv %s: triton %.1f us, cuBLAS %.1f us", key, 1e3 * t_gemv, 1e3 * t_blas
                    )
            except Exception as exc:  # a kernel that does not build must not stop generation
                logger.warning("Triton gemv unavailable (%s): using cuBLAS", exc)
    _CHOICES[key] = use
    return use


def choices() -> dict[tuple[int, int, int, str], bool]:
    """The decisions made so far (for benchmarks and logs)."""
    return dict(_CHOICES)
