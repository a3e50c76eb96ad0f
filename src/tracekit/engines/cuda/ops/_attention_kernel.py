"""Triton source of :mod:`tracekit.engines.cuda.ops.attention` (imported only where Triton is).

Kept in a module of its own: Triton resolves a kernel's helper functions through the module's
globals, and the rest of tracekit must import without Triton.
"""

import triton
import triton.language as tl


@triton.jit
def _load_sum(  # pragma: no cover - GPU or interpreter
    qkv_ptr,
    bias_ptr,
    row,
    cols,
    mask,
    stride_s,
    S: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    dtype: tl.constexpr,
):
    """Columns ``cols`` of row ``row`` of the q/k/v product: partials summed in order,
    rounded to ``dtype``, bias added (and rounded), returned in float32."""
    x = tl.load(qkv_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, S):
        x += tl.load(qkv_ptr + s * stride_s + row + cols, mask=mask, other=0.0).to(tl.float32)
    x = x.to(dtype).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _head_norm(x, r, w_ptr, cols, mask, dtype: tl.constexpr):  # pragma: no cover - GPU
    """Gemma's per-head RMSNorm of ``x`` (float32) by the rows' ``1/rms`` ``r`` and the
    float32 scale ``1 + w`` at ``cols``: scaled in float32, rounded once to ``dtype``."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (x * r * w).to(dtype).to(tl.float32)


@triton.jit
def _softcap(s, CAP: tl.constexpr):  # pragma: no cover - GPU or interpreter
    """``CAP * tanh(s / CAP)`` (``tanh`` through ``exp``: the same in float32, and Triton's
    language has no tanh of its own); ``s`` unchanged where ``CAP`` is 0."""
    if CAP > 0:
        t = tl.exp(2.0 * s / CAP)
        s = CAP * (1.0 - 2.0 / (t + 1.0))
    return s


@triton.jit
def _add_token(m, total, acc, s, v):  # pragma: no cover - GPU or interpreter
    """The online softmax's running max ``m``, sum ``total`` and output ``acc`` with one more
    key's scores ``s`` (per query head) and its value ``v``."""
    m_new = tl.maximum(m, s)
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new)
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    return m_new, total * alpha + p, acc


@triton.jit
def decode_attention_kernel(  # pragma: no cover - GPU or interpreter
    qkv_ptr,
    bias_ptr,
    cos_ptr,
    sin_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    pad_ptr,
    out_ptr,
    qn_ptr,
    kn_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    stride_s,
    L,
    B,
    scaling,
    eps,
    S: tl.constexpr,
    H: tl.constexpr,
    KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    QK_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    SPLITS: tl.constexpr = 1,
):
    if USE_PDL:  # programmatic dependent launch: everything read here may be the last kernel's
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)  # this program's share of the cache walk (SPLITS > 1)
    G: tl.constexpr = H // KV
    HALF: tl.constexpr = D // 2
    N: tl.constexpr = (H + 2 * KV) * D
    dtype: tl.constexpr = k_ptr.dtype.element_ty
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    d_rot = tl.where(d < HALF, d + HALF, d - HALF)  # rotate_half: [-x2, x1]
    sign = tl.where(d < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + b * D + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * D + d, mask=d_ok, other=0.0).to(tl.float32)
    row = b * N

    # query heads of this kv head: [BLOCK_G, BLOCK_D], rotated, in the model dtype
    q_base = (kvh * G + g)[:, None] * D
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = _load_sum(qkv_ptr, bias_ptr, row, q_base + d[None, :], q_mask, stride_s, S, HAS_BIAS,
                  dtype)  # fmt: skip
    q_r = _load_sum(qkv_ptr, bias_ptr, row, q_base + d_rot[None, :], q_mask, stride_s, S,
                    HAS_BIAS, dtype)  # fmt: skip
    if QK_NORM:  # Gemma-3: each head normalised before the rotary embedding
        r = tl.rsqrt(tl.sum(q * q, axis=1) / D + eps)[:, None]
        q_r = _head_norm(q_r, r, qn_ptr, d_rot[None, :], d_ok[None, :], dtype)
        q = _head_norm(q, r, qn_ptr, d[None, :], d_ok[None, :], dtype)
    q = (q * cos[None, :] + sign[None, :] * q_r * sin[None, :]).to(dtype)
    # the new key (rotated) and value
    k_base = H * D + kvh * D
    k = _load_sum(qkv_ptr, bias_ptr, row, k_base + d, d_ok, stride_s, S, HAS_BIAS, dtype)
    k_r = _load_sum(qkv_ptr, bias_ptr, row, k_base + d_rot, d_ok, stride_s, S, HAS_BIAS,
                    dtype)  # fmt: skip
    if QK_NORM:
        r_k = tl.rsqrt(tl.sum(k * k, axis=0) / D + eps)
        k_r = _head_norm(k_r, r_k, kn_ptr, d_rot, d_ok, dtype)
        k = _head_norm(k, r_k, kn_ptr, d, d_ok, dtype)
    k = (k * cos + sign * k_r * sin).to(dtype)
    v_base = (H + KV) * D + kvh * D
    v = _load_sum(qkv_ptr, bias_ptr, row, v_base + d, d_ok, stride_s, S, HAS_BIAS, dtype)
    v = v.to(dtype)

    slot = tl.load(slot_ptr)
    cache = (b * KV + kvh).to(tl.int64) * L * D
    # the first share (the only one without SPLITS) writes the new key and value and attends
    # to them: a branch only where there are shares
    if SPLITS == 1:  # noqa: SIM114 - a constexpr branch, then a runtime one
        tl.store(k_ptr + cache + slot * D + d, k, mask=d_ok)
        tl.store(v_ptr + cache + slot * D + d, v, mask=d_ok)
    elif part == 0:
        tl.store(k_ptr + cache + slot * D + d, k, mask=d_ok)
        tl.store(v_ptr + cache + slot * D + d, v, mask=d_ok)

    start = tl.load(pad_ptr + b)
    if WINDOW > 0:
        start = tl.maximum(start, slot - WINDOW + 1)
    hi = slot
    if SPLITS > 1:  # whole blocks of slots per share; the last shares may have none
        share = tl.cdiv(tl.cdiv(slot - start, SPLITS), BLOCK_N) * BLOCK_N
        start = start + part * share
        hi = tl.minimum(start + share, slot)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    # earlier slots from the cache; every block starts at a valid slot, so m stays finite
    for n0 in range(start, hi, BLOCK_N):
        j = n0 + n
        j_ok = j < hi
        kv_mask = j_ok[:, None] & d_ok[None, :]
        offs = cache + j[:, None] * D + d[None, :]
        kb = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        if IEEE:  # noqa: SIM108 - a constexpr branch: Triton compiles only one side
            s = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kb))
        s = tl.where(j_ok[None, :], _softcap(s * scaling, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        if IEEE:  # noqa: SIM108
            pv = tl.dot(p.to(dtype), vb, input_precision="ieee")
        else:
            pv = tl.dot(p.to(dtype), vb)
        acc = acc * alpha[:, None] + pv
        m = m_new
    # the new token itself, from registers (the first share's)
    s_cur = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1)
    s_cur = _softcap(s_cur * scaling, SOFTCAP)
    if SPLITS == 1:  # noqa: SIM114 - a constexpr branch, then a runtime one
        m, total, acc = _add_token(m, total, acc, s_cur, v)
    elif part == 0:
        m, total, acc = _add_token(m, total, acc, s_cur, v)
    if SPLITS == 1:
        out = acc / total[:, None]
        tl.store(out_ptr + b * H * D + q_base + d[None, :], out.to(dtype), mask=q_mask)
    else:  # this share's running max, sum and unnormalised output: combine_kernel adds them
        at = ((b * KV + kvh) * SPLITS + part) * BLOCK_G + g
        tl.store(part_m_ptr + at, m)
        tl.store(part_l_ptr + at, total)
        tl.store(part_acc_ptr + at[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def combine_kernel(  # pragma: no cover - GPU or interpreter
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    H: tl.constexpr,
    KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """The attention output of one (row, kv head) from its ``SPLITS`` shares of the cache walk:
    each share's sums rescaled to the largest running max, added, normalised. The first share
    holds the new token, so that max is finite; a share with no slots has max ``-inf`` and
    weighs 0."""
    if USE_PDL:  # the shares are the kernel before this one
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    G: tl.constexpr = H // KV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    base = (b * KV + kvh) * SPLITS
    parts = tl.arange(0, SPLITS)
    at = (base + parts)[:, None] * BLOCK_G + g[None, :]
    top = tl.max(tl.load(part_m_ptr + at), axis=0)
    total = tl.sum(tl.load(part_l_ptr + at) * tl.exp(tl.load(part_m_ptr + at) - top[None, :]), 0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in tl.static_range(SPLITS):
        rows = (base + i) * BLOCK_G + g
        weight = tl.exp(tl.load(part_m_ptr + rows) - top)
        acc += tl.load(part_acc_ptr + rows[:, None] * BLOCK_D + d[None, :]) * weight[:, None]
    out = acc / total[:, None]
    mask = (g < G)[:, None] & (d < D)[None, :]
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    offs = b * H * D + (kvh * G + g)[:, None] * D + d[None, :]
    tl.store(out_ptr + offs, out.to(dtype), mask=mask)
