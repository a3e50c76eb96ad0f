"""One Triton kernel for a decode step's attention: rotary, KV-cache write and attention.

In the CUDA engine's decode step (:mod:`tracekit.engines.cuda.runner`) the attention of one
block took six kernels: the q/k/v product's sum and rotary embedding (two or three pointwise
kernels), the score product, the softmax and the value product, ~11 us per block at batch 8 on
an H200 for a few KB of work. This kernel does all of it in one launch, one program per
(row, kv head):

1. sums the q/k/v product (the split-K partials of :mod:`tracekit.engines.cuda.ops.gemv`, or
   the product itself), rounds it to the model dtype and adds the bias, as the product would;
2. applies the rotary embedding to the group's query heads and to the key;
3. writes the new key and value into the static cache at ``slot``;
4. attends over the row's valid cache slots (from ``pad_len`` up to ``slot``, within the sliding
   window if any) with an online softmax, the new token included.

A configuration with shares (:data:`CONFIGS`) splits step 4 over several programs per (row, kv
head), each walking a run of whole slot blocks and storing its running max, sum and
unnormalised output; a second kernel (``combine_kernel``) rescales and adds them. The first
share writes the new key and value and attends to the new token.

Gemma's attention is the same with two more constants: scores soft-capped (``cap *
tanh(s / cap)``, Gemma-2) after the scaling, and each query and key head normalised by its
(1 + w) RMSNorm before the rotary embedding (Gemma-3's q/k norms: scaled in float32, rounded
once, as HF's ``Gemma3RMSNorm``).

The grouped query heads of a kv head share one program and one read of its keys and values.
Rounding follows the reference step: q, k and v are rounded to the model dtype after the
product and after the rotary embedding, scores and sums are float32.

It is checked against :func:`reference` (plain torch) before the engine uses it
(:func:`works`); the step falls back to the unfused path where it fails or Triton is missing.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import TYPE_CHECKING, Any

from tracekit.engines.cuda.ops.gemv import (
    fastest_kept,
    import_kernel,
    relative_error,
    sum_partials,
    time_candidates,
)
from tracekit.engines.cuda.plan import AttentionShape

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_STATE: dict[str, Any] = {}


def _build() -> Any:
    """Define the kernel once per process; ``None`` without Triton."""
    if "kernel" in _STATE:
        return _STATE["kernel"]
    _STATE["kernel"] = None
    found = import_kernel("tracekit.engines.cuda.ops._attention_kernel", "decode_attention_kernel")
    combine = import_kernel("tracekit.engines.cuda.ops._attention_kernel", "combine_kernel")
    if found is None or combine is None:
        return None
    triton, decode_attention_kernel = found
    _STATE["triton"] = triton
    _STATE["combine"] = combine[1]
    _STATE["kernel"] = decode_attention_kernel
    return decode_attention_kernel


CONFIGS: tuple[tuple[int, ...], ...] = (
    (16, 1, 3), (64, 1, 1), (64, 2, 3), (64, 4, 2), (64, 4, 3),
    (128, 4, 2), (128, 4, 3), (256, 4, 3), (256, 8, 3),
    (32, 2, 2, 4), (64, 4, 2, 4), (32, 2, 2, 8), (64, 4, 2, 8),
)  # fmt: skip
"""(cache slots per loop step, warps, pipeline stages[, shares]) :func:`kernel_config` times.
Each of the first nine was the fastest, or within 3% of it, for some batch size and cache
length on an H200, timed as the step runs the kernel: one program per row and kv head
wants few warps when there are thousands of programs (batch 128) and long slot blocks when
the cache is long. The last four split each row's cache walk into 4 or 8 shares, one program
each, and add the shares in a second kernel (:func:`decode_attention`): more programs where a
small batch leaves most of the GPU idle (Gemma-2-2B at batch 8: 32 programs); they have not
been timed on a GPU yet, and are picked only where timing finds them faster."""
DEFAULT_CONFIG = (64, 4, 2)
"""The configuration without timing (the CPU interpreter, the correctness check)."""
_CONFIG_TAG = f"{zlib.crc32(repr(CONFIGS).encode()):08x}"[:6]
_CONFIGS: dict[tuple[Any, ...], tuple[int, ...]] = {}


def available() -> bool:
    """True when the kernel can be built (Triton importable)."""
    return _build() is not None


def decode_attention(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    shape: AttentionShape,
    pdl: bool = False,
    config: tuple[int, ...] | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output ``[batch, n_heads * head_dim]`` of one decode step (see the module
    docstring); writes the new key and value into ``k_cache``/``v_cache`` at ``slot``.
    ``pdl``: launched as a programmatic dependent launch (only where
    :func:`tracekit.engines.cuda.ops.gemv.pdl_available`).

    ``qkv``: the q/k/v product ``[batch, N]`` or its split-K partials ``[splits, batch, N]``
    (``N = (n_heads + 2 * n_kv) * head_dim``); ``cos``/``sin``: this step's rotary rows
    ``[batch, head_dim]``; caches ``[batch, n_kv, length, head_dim]``; ``slot``: int64 ``[1]``;
    ``pad_len``: int64 ``[batch]`` (first valid slot of each row); ``config``: one of
    :data:`CONFIGS` (:func:`kernel_config`), :data:`DEFAULT_CONFIG` when ``None``;
    ``q_norm``/``k_norm``: float32 ``[head_dim]`` scales (``1 + w``), wanted where
    ``shape.qk_norm_eps`` is set.
    """
    import torch

    kernel = _build()
    if kernel is None:
        raise RuntimeError("the fused decode attention needs Triton")
    triton = _STATE["triton"]
    n_heads, n_kv, head_dim, scaling, window, softcap, qk_eps = shape
    if qk_eps is not None and (q_norm is None or k_norm is None):
        raise ValueError("a shape with q/k norms needs their q_norm and k_norm scales")
    parts = qkv if qkv.dim() == 3 else qkv.unsqueeze(0)
    parts = parts.contiguous()
    batch, _, length, _ = k_cache.shape
    out = torch.empty((batch, n_heads * head_dim), dtype=k_cache.dtype, device=k_cache.device)
    group = n_heads // n_kv
    block_n, warps, stages, *rest = config or DEFAULT_CONFIG
    splits = rest[0] if rest else 1
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    pdl_args: dict[str, Any] = {"USE_PDL": True, "launch_pdl": True} if pdl else {}
    # each share's running max, sum and unnormalised output (float32), for combine_kernel;
    # without shares the kernel stores none of them (``out`` stands in, never written as such)
    part_m = part_l = part_acc = out
    if splits > 1:
        shares = (batch, n_kv, splits, block_g)
        part_m = torch.empty(shares, dtype=torch.float32, device=out.device)
        part_l = torch.empty(shares, dtype=torch.float32, device=out.device)
        part_acc = torch.empty((*shares, block_d), dtype=torch.float32, device=out.device)
    kernel[(batch, n_kv, splits)](
        parts,
        parts if bias is None else bias,
        cos,
        sin,
        k_cache,
        v_cache,
        slot,
        pad_len,
        out,
        out if q_norm is None else q_norm,
        out if k_norm is None else k_norm,
        part_m,
        part_l,
        part_acc,
        parts.stride(0),
        length,
        batch,
        float(scaling),
        float(qk_eps or 0.0),
        S=parts.shape[0],
        H=n_heads,
        KV=n_kv,
        D=head_dim,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        WINDOW=int(window or 0),
        SOFTCAP=float(softcap or 0.0),
        QK_NORM=qk_eps is not None,
        HAS_BIAS=bias is not None,
        IEEE=k_cache.dtype == torch.float32,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        SPLITS=splits,
        **pdl_args,
    )
    if splits > 1:
        _STATE["combine"][(batch, n_kv)](
            part_m, part_l, part_acc, out, H=n_heads, KV=n_kv, D=head_dim, BLOCK_G=block_g,
            BLOCK_D=block_d, SPLITS=splits, num_warps=4, **pdl_args,
        )  # fmt: skip
    return out


def reference(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    shape: AttentionShape,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`decode_attention` in plain torch (the same arithmetic as the unfused step)."""
    import torch

    from tracekit.engines.cuda.gemma import norm, softcap
    from tracekit.engines.cuda.llama import rotate_half

    n_heads, n_kv, head_dim, scaling, window, cap, qk_eps = shape
    dtype = k_cache.dtype
    x = (sum_partials(qkv) if qkv.dim() == 3 else qkv).to(dtype)
    if bias is not None:
        x = x + bias
    batch = x.shape[0]
    q, k, v = x.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(batch, n_heads, head_dim)
    k = k.reshape(batch, n_kv, head_dim)
    v = v.reshape(batch, n_kv, head_dim)
    if qk_eps is not None:
        assert q_norm is not None and k_norm is not None
        q, k = norm(q, q_norm, qk_eps), norm(k, k_norm, qk_eps)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    k_cache.index_copy_(2, slot, k[:, :, None, :])
    v_cache.index_copy_(2, slot, v[:, :, None, :])
    slots = torch.arange(k_cache.shape[2], device=k_cache.device)
    valid = (slots[None, :] >= pad_len[:, None]) & (slots[None, :] <= slot)
    if window is not None:
        valid = valid & (slots[None, :] > slot - window)
    bias_mask = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    bias_mask = bias_mask.masked_fill(~valid, float("-inf"))
    qg = q.reshape(batch, n_kv, n_heads // n_kv, head_dim)
    scores = softcap(torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scaling, cap)
    probs = torch.softmax(scores + bias_mask[:, None, None, :], dim=-1).to(dtype)
    return torch.matmul(probs, v_cache).reshape(batch, n_heads * head_dim)


def works(
    *,
    batch: int,
    length: int,
    shape: AttentionShape,
    splits: int,
    has_bias: bool,
    dtype: torch.dtype,
    device: torch.device,
    pdl: bool = False,
    config: tuple[int, ...] | None = None,
) -> bool:
    """Run the kernel once on random inputs of this shape against :func:`reference` (random
    q/k norm scales where ``shape`` has q/k norms): outputs and cache writes within the
    dtype's rounding. ``False`` (logged) on any failure."""
    import torch

    if not available():
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_heads, n_kv, head_dim = shape.n_heads, shape.n_kv, shape.head_dim

    def rand(*size: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dt)

    width = (n_heads + 2 * n_kv) * head_dim
    qkv = rand(splits, batch, width, dt=torch.float32) if splits > 1 else rand(batch, width)
    bias = rand(width) if has_bias else None
    angles = torch.rand(batch, head_dim // 2, generator=gen).to(device) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache, v_cache = rand(batch, n_kv, length, head_dim), rand(batch, n_kv, length, head_dim)
    slot = torch.tensor([length - 2], dtype=torch.long, device=device)
    pad_len = torch.randint(0, max(1, length // 2), (batch,), generator=gen).to(device)
    norms: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if shape.qk_norm_eps is not None:
        norms = (1.0 + rand(head_dim, dt=torch.float32), 1.0 + rand(head_dim, dt=torch.float32))
    try:
        k1, v1 = k_cache.clone(), v_cache.clone()
        got = decode_attention(
            qkv, bias, cos, sin, k1, v1, slot, pad_len, shape, pdl, config, *norms
        )
        k2, v2 = k_cache.clone(), v_cache.clone()
        want = reference(qkv, bias, cos, sin, k2, v2, slot, pad_len, shape, *norms)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
        logger.warning("fused decode attention unavailable (%s); using the unfused step", exc)
        return False
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    ok = True
    for a, b in ((got, want), (k1, k2), (v1, v2)):
        ok = ok and relative_error(a, b) < tol
    if not ok:
        logger.warning("fused decode attention disagrees with its reference: unfused step used")
    return ok


def kernel_config(
    *,
    batch: int,
    length: int,
    slot: int,
    splits: int,
    shape: AttentionShape,
    dtype: torch.dtype,
    device: torch.device,
    pdl: bool,
) -> tuple[int, ...]:
    """The kernel's configuration for ``batch`` rows over caches of ``length`` slots, the
    q/k/v product in ``splits`` partials: the fastest of :data:`CONFIGS` with ``slot`` valid
    slots per row (a decode step's typical one), timed once per shape and kept in the decisions
    file (:func:`tracekit.engines.cuda.ops.gemv.deciding`), so the processes of a data-parallel
    run launch the same one and later runs skip the timing.

    Timed as the step launches the kernel: over copies of the cache larger than L2, back to
    back, as dependent launches where ``pdl``. Triton's autotuner, used before, timed one launch
    at a time over the same cache; on an H200 it chose a configuration 10-24% slower than the
    best at batch 128 and at long caches. The chosen
    configuration is checked against :func:`reference` like the default one;
    :data:`DEFAULT_CONFIG` under the CPU interpreter, during a CUDA graph capture or where
    nothing could be timed."""
    key = (batch, length, slot, splits, shape, str(dtype), pdl)
    found = _CONFIGS.get(key)
    if found is not None:
        return found
    import torch

    if (
        os.environ.get("TRITON_INTERPRET") == "1"
        or not available()
        or torch.cuda.is_current_stream_capturing()
    ):
        return DEFAULT_CONFIG
    n_heads, n_kv, head_dim = shape.n_heads, shape.n_kv, shape.head_dim
    dtype_name = str(dtype).removeprefix("torch.")
    disk_key = (
        f"attention-{_CONFIG_TAG}:{batch}x{n_heads}x{n_kv}x{head_dim}x{length}@{slot}"
        f":k{splits}:{dtype_name}" + (":pdl" if pdl else "")
    )  # fmt: skip
    index = fastest_kept(
        disk_key,
        lambda i: i < len(CONFIGS),
        lambda: _time_configs(batch, length, slot, splits, shape, dtype, device, pdl),
    )
    if index is None:
        return DEFAULT_CONFIG
    chosen = CONFIGS[index]
    if chosen != DEFAULT_CONFIG and not works(
        batch=min(batch, 4), length=min(length, 200), shape=shape, splits=splits,
        has_bias=False, dtype=dtype, device=device, pdl=pdl, config=chosen,
    ):  # fmt: skip
        chosen = DEFAULT_CONFIG
    _CONFIGS[key] = chosen
    return chosen


def _time_configs(
    batch: int,
    length: int,
    slot: int,
    splits: int,
    shape: AttentionShape,
    dtype: torch.dtype,
    device: torch.device,
    pdl: bool,
) -> dict[int, float]:
    """Milliseconds per launch of each configuration that ran, by index in :data:`CONFIGS`."""
    import torch

    n_heads, n_kv, head_dim = shape.n_heads, shape.n_kv, shape.head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    width = (n_heads + 2 * n_kv) * head_dim
    qkv_shape = (splits, batch, width) if splits > 1 else (batch, width)
    qkv = torch.randn(*qkv_shape, generator=gen).to(device, torch.float32 if splits > 1 else dtype)
    angles = torch.rand(batch, head_dim, generator=gen).to(device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # keys and values of one block in one tensor, so the copies cycled through are pairs
    cache = torch.randn(2, batch, n_kv, length, head_dim, generator=gen).to(device, dtype)
    at = torch.tensor([min(slot, length - 1)], dtype=torch.long, device=device)
    pad_len = torch.zeros(batch, dtype=torch.long, device=device)
    scale = torch.ones(head_dim, dtype=torch.float32, device=device)
    norms = (None, None) if shape.qk_norm_eps is None else (scale, scale)

    def run(kv: torch.Tensor, config: tuple[int, ...]) -> torch.Tensor:
        return decode_attention(
            qkv, None, cos, sin, kv[0], kv[1], at, pad_len, shape, pdl, config, *norms
        )

    runs = {i: (lambda kv, c=c: run(kv, c)) for i, c in enumerate(CONFIGS)}
    what = f"attention configuration for {batch} rows x {length} slots"
    return time_candidates(cache, runs, what, quiet=True)
