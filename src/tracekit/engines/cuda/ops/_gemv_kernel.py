"""Triton source of :mod:`tracekit.engines.cuda.ops.gemv` (imported only where Triton is).

Kept in a module of its own, as the attention kernel is: Triton resolves a kernel's helper
functions through the module's globals, and the rest of tracekit must import without Triton.
"""

import triton
import triton.language as tl


@triton.jit
def _gate(  # pragma: no cover - GPU or interpreter
    x,
    up_ptr,
    offs_m,
    kk,
    mask,
    stride_xm,
    GATED: tl.constexpr,
    dtype: tl.constexpr,
):
    """The product's input tile: ``x`` itself, or (``GATED``) ``silu(x) * up`` with ``up``
    read from ``up_ptr`` at the same place, in float32, rounded to ``dtype`` once."""
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(up_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0)
        x = (gate * tl.sigmoid(gate) * up.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _swapped_product(  # pragma: no cover - GPU or interpreter
    x_ptr,
    w_ptr,
    w_rows,
    r_ok,
    offs_m,
    m_ok,
    offs_k,
    pid_k,
    stride_xm,
    stride_wn,
    K: tl.constexpr,
    k_len: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
    GATED: tl.constexpr,
    LATE_LAUNCH: tl.constexpr,
    dtype: tl.constexpr,
):
    """:func:`gemv_kernel`'s sum with the multiply's operands swapped (``SWAPPED``):
    ``w_tile @ x_tile.T``, so the block's weight rows (``w_rows``, 64-256 of them) are the
    multiply's long side and the batch rows (16-64) its short one, the orientation of Hopper's
    tensor-core instructions; returned transposed, ``[BLOCK_M, len(w_rows)]``, as the
    unswapped loop returns its sum.
    No first tile before the wait: the whole loop is left to the pipeliner, whose prologue
    issues the first ``num_stages - 1`` tiles together."""
    EVEN_K: tl.constexpr = k_len % BLOCK_K == 0
    acc = tl.zeros([w_rows.shape[0], BLOCK_M], tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if not LATE_LAUNCH:
            tl.extra.cuda.gdc_launch_dependents()
    for k0 in range(0, k_len, BLOCK_K):
        kk = pid_k * k_len + k0 + offs_k
        if EVEN_K:
            w_mask = r_ok
            x_mask = m_ok
        else:
            k_ok = (k0 + offs_k)[None, :] < k_len
            w_mask = r_ok & k_ok
            x_mask = m_ok & k_ok
        w = tl.load(w_ptr + w_rows[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0.0)
        x = _gate(x, x_ptr + K, offs_m, kk, x_mask, stride_xm, GATED, dtype)
        acc = tl.dot(w, tl.trans(x), acc)
    if USE_PDL and LATE_LAUNCH:
        tl.extra.cuda.gdc_launch_dependents()
    return tl.trans(acc)


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
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    GATED: tl.constexpr = False,
    SWIGLU: tl.constexpr = False,
    LATE_LAUNCH: tl.constexpr = False,
    SWAPPED: tl.constexpr = False,
):
    """``y[k_slice] = x[:, slice] @ w[:, slice].T`` for program (n block, K slice);
    ``y`` is contiguous ``[SPLIT_K, M, N]`` (``[M, N]`` for one slice), cast on store.

    ``GATED``: ``x`` is a gate/up product ``[M, 2K]`` and the product's input is
    ``silu(gate) * up``, computed in float32 and rounded to the weights' dtype once, as the
    compiled decode step computes it (one kernel less per block).

    ``SWIGLU`` (one K slice only): ``w`` holds gate rows ``[0, N)`` then up rows ``[N, 2N)``;
    each program loads the gate and up rows of its block of columns as one tile (alternating,
    so one product covers both), rounds each product to the weights' dtype as a product is
    rounded, and stores ``silu(gate) * up`` ``[M, N]`` (no SiLU kernel after the gate/up
    product).

    ``LATE_LAUNCH``: with ``USE_PDL``, the next kernel is let launch after this program's loop
    instead of after its wait; its early programs then do not take this kernel's places.

    ``SWAPPED``: the multiply's operands swapped (:func:`_swapped_product`), same results. At
    32 rows on an H200 its fastest configuration streamed the weights 5-18% faster than the
    unswapped loop's (docs/engine.md).

    Unswapped, the first weight tile is loaded before anything else: weights are never
    written by the kernel before, so with programmatic dependent launch (``USE_PDL``) that
    load overlaps the previous kernel's tail, and the wait for its results comes after it."""
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_len: tl.constexpr = K // SPLIT_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    if SWIGLU:  # one tile: gate and up rows of each column alternate
        offs_r = tl.arange(0, 2 * BLOCK_N)
        col = pid_n * BLOCK_N + offs_r // 2
        w_rows = col + (offs_r % 2) * N
        r_ok = col[:, None] < N
    else:
        w_rows = offs_n
        r_ok = n_ok
    if SWAPPED:
        acc = _swapped_product(x_ptr, w_ptr, w_rows, r_ok, offs_m, m_ok, offs_k, pid_k,
                               stride_xm, stride_wn, K, k_len, BLOCK_M, BLOCK_K, USE_PDL, GATED,
                               LATE_LAUNCH, dtype)  # fmt: skip
    else:
        kk = pid_k * k_len + offs_k
        k_ok = offs_k < k_len
        w = tl.load(
            w_ptr + w_rows[:, None] * stride_wn + kk[None, :], mask=r_ok & k_ok[None, :], other=0.0
        )
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            if not LATE_LAUNCH:
                tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok & k_ok[None, :], other=0.0
        )
        x = _gate(x, x_ptr + K, offs_m, kk, m_ok & k_ok[None, :], stride_xm, GATED, dtype)
        acc = tl.dot(x, tl.trans(w), out_dtype=tl.float32)
        for k0 in range(BLOCK_K, k_len, BLOCK_K):
            kk = pid_k * k_len + k0 + offs_k
            k_ok = (k0 + offs_k) < k_len
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                mask=m_ok & k_ok[None, :],
                other=0.0,
            )
            x = _gate(x, x_ptr + K, offs_m, kk, m_ok & k_ok[None, :], stride_xm, GATED, dtype)
            w = tl.load(
                w_ptr + w_rows[:, None] * stride_wn + kk[None, :],
                mask=r_ok & k_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        if USE_PDL and LATE_LAUNCH:
            tl.extra.cuda.gdc_launch_dependents()
    if SWIGLU:
        g, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        gate = g.to(dtype).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up.to(dtype).to(tl.float32)
    tl.store(
        y_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok & (offs_n[None, :] < N),
    )
