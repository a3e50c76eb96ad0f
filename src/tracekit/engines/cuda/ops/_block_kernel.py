"""Triton source of :mod:`tracekit.engines.cuda.ops.block` (imported only where Triton is).

Kept in a module of its own, as the other kernels are: Triton resolves a kernel's helper
functions through the module's globals, and the rest of tracekit must import without Triton.
"""

import triton
import triton.language as tl


@triton.jit
def _input_tile(  # pragma: no cover - GPU or interpreter
    x_ptr,
    ln_ptr,
    r,
    offs_m,
    kk,
    mask,
    stride_xm,
    K: tl.constexpr,
    NORM_IN: tl.constexpr,
    dtype: tl.constexpr,
):
    """The product's input tile at columns ``kk``: ``x`` itself, or (``NORM_IN``) the RMSNorm
    of the residual states ``x`` with row factors ``r``, rounded as the reference norm rounds
    (``weight * (x * r).to(dtype)``, both factors in the model dtype)."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0)
    if NORM_IN:
        xn = (x.to(tl.float32) * r[:, None]).to(dtype)
        ln = tl.load(ln_ptr + kk, mask=kk < K, other=0.0)
        x = (ln[None, :].to(tl.float32) * xn.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _residual_out(  # pragma: no cover - GPU or interpreter
    y,
    res_ptr,
    out_ptr,
    cap_ptr,
    capw_ptr,
    ss_ptr,
    offs_m,
    offs_n,
    pid_n,
    M,
    N,
    CAPTURE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    dtype: tl.constexpr,
):
    """Epilogue of a residual product for one block of output columns: ``out = res + y``
    (``y`` rounded to the model dtype first, the sum rounded again), the capture
    ``cap += out * capw``, and this block's per-row sums of squares of ``out`` for the next
    norm: ``ss[slot, :]`` for 16-column slots, this block's sums in its first slot and zeros
    in the others it covers (so the slots hold the same total whatever the block size)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    res = tl.load(res_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    out = (res + y.to(dtype).to(tl.float32)).to(dtype)
    tl.store(out_ptr + idx, out, mask=mask)
    outf = out.to(tl.float32)
    if CAPTURE:
        capw = tl.load(capw_ptr + offs_m, mask=offs_m < M, other=0.0)
        cap = tl.load(cap_ptr + idx, mask=mask, other=0.0)
        tl.store(cap_ptr + idx, cap + outf * capw[:, None], mask=mask)
    ss = tl.sum(tl.where(mask, outf * outf, 0.0), axis=1)  # [BLOCK_M]
    SLOTS: tl.constexpr = BLOCK_N // 16
    offs_s = tl.arange(0, SLOTS)
    vals = tl.where(offs_s[:, None] == 0, ss[None, :], 0.0)
    tl.store(ss_ptr + (pid_n * SLOTS + offs_s)[:, None] * BLOCK_M + offs_m[None, :], vals)


@triton.jit
def block_gemv_kernel(  # pragma: no cover - runs on the GPU (or the Triton interpreter)
    x_ptr,
    w_ptr,
    y_ptr,
    ss_in_ptr,
    ln_ptr,
    res_ptr,
    ws_ptr,
    cnt_ptr,
    ss_out_ptr,
    cap_ptr,
    capw_ptr,
    eps,
    M,
    N,
    K: tl.constexpr,
    stride_xm,
    stride_wn,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SS_SLOTS: tl.constexpr,
    SS_P2: tl.constexpr,
    NORM_IN: tl.constexpr,
    GATED_OUT: tl.constexpr,
    RES_OUT: tl.constexpr,
    CAPTURE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """``x @ w.T`` for program (block of N, K slice), with what surrounds it in a decoder
    block folded in:

    - ``NORM_IN``: ``x`` holds residual states; the input is their RMSNorm, from the row sums
      of squares ``ss_in`` (``[SS_SLOTS, BLOCK_M]`` partial sums, added here in slot order)
      and the norm weight ``ln`` (no norm kernel before the product).
    - ``GATED_OUT``: ``w`` holds gate rows ``[0, N)`` then up rows ``[N, 2N)``; each program
      computes both for its block and stores ``silu(gate) * up`` (no SiLU kernel after it).
    - ``RES_OUT``: stores ``res + x @ w.T`` (and, with ``CAPTURE``, adds it into the capture
      sums) with its rows' sums of squares for the next ``NORM_IN`` product (no residual-add
      and norm kernel after it). With ``SPLIT_K > 1`` each program stores its float32 partial
      product into ``ws`` and the last program of a block (a counter per block) sums the
      partials in slice order and finishes the block.
    - otherwise: ``y`` gets the product (``SPLIT_K == 1``) or the float32 partials
      ``[SPLIT_K, M, N]``, summed by the product's consumer.

    The first weight tile is loaded before anything else: with programmatic dependent launch
    (``USE_PDL``) that load overlaps the previous kernel's tail, and the wait for its results
    comes after it.
    """
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_len: tl.constexpr = K // SPLIT_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    kk = pid_k * k_len + offs_k
    k_ok = offs_k < k_len
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    w = tl.load(w_rows + kk[None, :], mask=n_ok & k_ok[None, :], other=0.0)
    if GATED_OUT:
        u_rows = w_rows + N * stride_wn
        u = tl.load(u_rows + kk[None, :], mask=n_ok & k_ok[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM_IN:
        offs_s = tl.arange(0, SS_P2)
        ss = tl.load(
            ss_in_ptr + offs_s[:, None] * BLOCK_M + offs_m[None, :],
            mask=offs_s[:, None] < SS_SLOTS,
            other=0.0,
        )
        r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    mask = m_ok & k_ok[None, :]
    x = _input_tile(x_ptr, ln_ptr, r, offs_m, kk, mask, stride_xm, K, NORM_IN, dtype)
    acc = tl.dot(x, tl.trans(w), out_dtype=tl.float32)
    if GATED_OUT:
        acc_u = tl.dot(x, tl.trans(u), out_dtype=tl.float32)
    for k0 in range(BLOCK_K, k_len, BLOCK_K):
        kk = pid_k * k_len + k0 + offs_k
        k_ok = (k0 + offs_k) < k_len
        x = _input_tile(
            x_ptr, ln_ptr, r, offs_m, kk, m_ok & k_ok[None, :], stride_xm, K, NORM_IN, dtype
        )
        w = tl.load(w_rows + kk[None, :], mask=n_ok & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        if GATED_OUT:
            u = tl.load(u_rows + kk[None, :], mask=n_ok & k_ok[None, :], other=0.0)
            acc_u += tl.dot(x, tl.trans(u))
    out_mask = m_ok & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    if GATED_OUT:
        gate = acc.to(dtype).to(tl.float32)
        up = acc_u.to(dtype).to(tl.float32)
        tl.store(y_ptr + idx, (gate * tl.sigmoid(gate) * up).to(dtype), mask=out_mask)
    elif RES_OUT:
        if SPLIT_K == 1:
            _residual_out(
                acc, res_ptr, y_ptr, cap_ptr, capw_ptr, ss_out_ptr, offs_m, offs_n, pid_n, M,
                N, CAPTURE, BLOCK_M, BLOCK_N, dtype,
            )  # fmt: skip
        else:
            tl.store(ws_ptr + pid_k * M * N + idx, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial stored before the release below
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                y = tl.load(ws_ptr + idx, mask=out_mask, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    y += tl.load(
                        ws_ptr + s * M * N + idx, mask=out_mask, other=0.0, cache_modifier=".cg"
                    )
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
                _residual_out(
                    y, res_ptr, y_ptr, cap_ptr, capw_ptr, ss_out_ptr, offs_m, offs_n, pid_n, M,
                    N, CAPTURE, BLOCK_M, BLOCK_N, dtype,
                )  # fmt: skip
    else:
        tl.store(y_ptr + pid_k * M * N + idx, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
