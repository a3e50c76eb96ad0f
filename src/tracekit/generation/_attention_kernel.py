"""Triton source of :mod:`tracekit.generation.cuda_attention` (imported only where Triton is).

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
def _attend(  # pragma: no cover - GPU or interpreter
    q,
    kb,
    v_src,
    v_mask,
    j_ok,
    m,
    total,
    acc,
    scaling,
    V_LOADED: tl.constexpr,
    IEEE: tl.constexpr,
    dtype: tl.constexpr,
):
    """One block of cached keys ``kb`` (``[BLOCK_N, BLOCK_D]``, slots where ``j_ok``) and
    their values folded into the online softmax ``(m, total, acc)`` of the query heads ``q``.
    The values: ``v_src`` itself where ``V_LOADED``, else loaded from the pointers ``v_src``
    (where ``v_mask``) once the scores are computed."""
    if IEEE:  # noqa: SIM108 - a constexpr branch: Triton compiles only one side
        s = tl.dot(q, tl.trans(kb), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kb))
    s = tl.where(j_ok[None, :], s * scaling, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    total = total * alpha + tl.sum(p, axis=1)
    if V_LOADED:  # noqa: SIM108
        vb = v_src
    else:
        vb = tl.load(v_src, mask=v_mask, other=0.0)
    if IEEE:  # noqa: SIM108
        pv = tl.dot(p.to(dtype), vb, input_precision="ieee")
    else:
        pv = tl.dot(p.to(dtype), vb)
    acc = acc * alpha[:, None] + pv
    return m_new, total, acc


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
    stride_s,
    L,
    B,
    scaling,
    S: tl.constexpr,
    H: tl.constexpr,
    KV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    PRELOAD: tl.constexpr = False,
):
    if USE_PDL:  # programmatic dependent launch: everything read here may be the last kernel's
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
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
    n = tl.arange(0, BLOCK_N)
    if PRELOAD:
        # the first block of cached keys and values, asked for before the q/k/v loads, so the
        # two round trips to memory overlap instead of following each other (slots below
        # ``slot`` only: the new key and value are stored at ``slot`` below)
        slot = tl.load(slot_ptr)
        cache = (b * KV + kvh).to(tl.int64) * L * D
        start = tl.load(pad_ptr + b)
        if WINDOW > 0:
            start = tl.maximum(start, slot - WINDOW + 1)
        j0 = start + n
        j0_ok = j0 < slot
        offs0 = cache + j0[:, None] * D + d[None, :]
        kb0 = tl.load(k_ptr + offs0, mask=j0_ok[:, None] & d_ok[None, :], other=0.0)
        vb0 = tl.load(v_ptr + offs0, mask=j0_ok[:, None] & d_ok[None, :], other=0.0)

    # query heads of this kv head: [BLOCK_G, BLOCK_D], rotated, in the model dtype
    q_base = (kvh * G + g)[:, None] * D
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = _load_sum(qkv_ptr, bias_ptr, row, q_base + d[None, :], q_mask, stride_s, S, HAS_BIAS,
                  dtype)  # fmt: skip
    q_r = _load_sum(qkv_ptr, bias_ptr, row, q_base + d_rot[None, :], q_mask, stride_s, S,
                    HAS_BIAS, dtype)  # fmt: skip
    q = (q * cos[None, :] + sign[None, :] * q_r * sin[None, :]).to(dtype)
    # the new key (rotated) and value
    k_base = H * D + kvh * D
    k = _load_sum(qkv_ptr, bias_ptr, row, k_base + d, d_ok, stride_s, S, HAS_BIAS, dtype)
    k_r = _load_sum(qkv_ptr, bias_ptr, row, k_base + d_rot, d_ok, stride_s, S, HAS_BIAS,
                    dtype)  # fmt: skip
    k = (k * cos + sign * k_r * sin).to(dtype)
    v_base = (H + KV) * D + kvh * D
    v = _load_sum(qkv_ptr, bias_ptr, row, v_base + d, d_ok, stride_s, S, HAS_BIAS, dtype)
    v = v.to(dtype)

    if not PRELOAD:  # (the order of the loads as it was measured, sessions 3-15)
        slot = tl.load(slot_ptr)
        cache = (b * KV + kvh).to(tl.int64) * L * D
    tl.store(k_ptr + cache + slot * D + d, k, mask=d_ok)
    tl.store(v_ptr + cache + slot * D + d, v, mask=d_ok)

    if not PRELOAD:
        start = tl.load(pad_ptr + b)
        if WINDOW > 0:
            start = tl.maximum(start, slot - WINDOW + 1)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = start
    if PRELOAD:
        if start < slot:  # a block with no valid slot would make m -inf and alpha nan
            m, total, acc = _attend(q, kb0, vb0, None, j0_ok, m, total, acc, scaling, True,
                                    IEEE, dtype)  # fmt: skip
        first = start + BLOCK_N
    # earlier slots from the cache; every block starts at a valid slot, so m stays finite
    for n0 in range(first, slot, BLOCK_N):
        j = n0 + n
        j_ok = j < slot
        kv_mask = j_ok[:, None] & d_ok[None, :]
        offs = cache + j[:, None] * D + d[None, :]
        kb = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        m, total, acc = _attend(q, kb, v_ptr + offs, kv_mask, j_ok, m, total, acc, scaling,
                                False, IEEE, dtype)  # fmt: skip
    # the new token itself, from registers
    s_cur = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scaling
    m_new = tl.maximum(m, s_cur)
    alpha = tl.exp(m - m_new)
    p_cur = tl.exp(s_cur - m_new)
    total = total * alpha + p_cur
    acc = acc * alpha[:, None] + p_cur[:, None] * v.to(tl.float32)[None, :]
    out = acc / total[:, None]
    tl.store(out_ptr + b * H * D + q_base + d[None, :], out.to(dtype), mask=q_mask)
