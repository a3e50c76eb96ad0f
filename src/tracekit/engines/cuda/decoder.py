"""Fast generation with capture: static KV cache, CUDA-graph decode steps, sampling on the device.

This module owns the decode loop of tracekit's CUDA engine (docs/engine.md). It works on a raw
Hugging Face causal LM and left-padded token ids, so it can be tested and benchmarked on its own;
the engine interface of :mod:`tracekit.engines.interface` wraps it.

How one batch runs:

1. **Prefill** goes through the HF model itself (one forward over the padded prompts, with
   :class:`~tracekit.models.LayerTaps` pooling ``prompt_last`` / ``prompt_avg``), so prompt
   numerics are exactly the reference path's. Its keys and values are copied into a preallocated
   static cache ``[batch, kv_heads, prompt_len + max_new_tokens, head_dim]`` per layer.
2. **Decode** runs a functional re-implementation of the Llama-family decoder block
   (Llama, Mistral, Qwen2, Qwen3) over the static cache, one token per row per step. Every piece
   of per-step state lives in device tensors owned by the runner (current token, step counter,
   finished flags, pooled sums), so a whole step, sampling and capture included, is recorded once
   as a CUDA graph and replayed ``max_new_tokens`` times with no host work but the replay call.
   The pointwise parts are fused by ``torch.compile`` (default mode, no inductor cudagraphs: the
   graph is captured here, so buffers the step mutates never make inductor skip it), one
   compiled region per block boundary; each linear layer runs the way
   :func:`tracekit.engines.cuda.ops.gemv.choose` timed fastest for the batch size.
3. **Stopping** is per row on the device (``alive`` flags); the host reads one flag every
   ``check_every`` steps and stops early once every row is done.
4. **Capture** adds each chosen layer's state, weighted by 1 for tokens that belong to the
   response and 0 otherwise, into float32 sums in graph-owned buffers.

Definitions shared with the reference engine (``response_avg``): the mean over the response
tokens' residual states, where a token's state is the one computed when the token is fed to the
model, so the last response token is fed once more at the end (its logits are discarded). The
eos token that ends a row is not part of the response unless ``include_eos`` is set.

Sampling uses a counter-based hash of ``(row seed, token index, vocabulary index)`` for its
noise (Gumbel-max through exponential races), so a row's sample depends on its own seed and
logits only, never on which rows share its batch, and is the same on CPU and CUDA for equal
logits.

On CPU (and wherever CUDA graphs are off) the same code runs eagerly; this is how the CPU tests
check it against the HF reference.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from tracekit.engines.cuda.ops.gemv import (
    MODE_NAMES,
    SWIGLU,
    TRITON,
    capture_graph,
    gated_linear,
    linear,
    mode_for_splits,
    on_side_stream,
    swiglu,
)
from tracekit.engines.interface import HostCopy, to_device
from tracekit.engines.pooling import masked_sum
from tracekit.errors import InputError, ModelError
from tracekit.models.capture import LayerTaps
from tracekit.models.compat import output_cache
from tracekit.models.layers import LayerHandles

if TYPE_CHECKING:
    import torch

    from tracekit.engines.interface import (
        CaptureSpec,
        GenerationOutput,
        GenerationParams,
        Prompt,
        Ready,
    )
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
POOLINGS = ("response_avg", "prompt_last", "prompt_avg")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


# --------------------------------------------------------------------------------------------
# What the fast path supports
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderSpec:
    """Shape constants of a Llama-family decoder, read once from the model's config."""

    n_blocks: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    scaling: float
    vocab: int
    sliding_window: int | None


def _text_config(model: Any) -> Any:
    cfg = model.config
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def _rope_type(cfg: Any) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict):
        value = params.get("rope_type", params.get("type", "default"))
        return str(value or "default")
    return "default"


def unsupported_reason(model: Any) -> str | None:
    """Why the fast decode path cannot run ``model``; ``None`` when it can."""
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type '{model_type}' (fast path supports {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}' (fast path supports silu)"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    if _rope_type(cfg) in _LENGTH_DEPENDENT_ROPE:
        return f"rope type '{_rope_type(cfg)}' (its frequencies depend on the sequence length)"
    if hasattr(model, "hf_device_map") and len(set(model.hf_device_map.values())) > 1:
        return "a model split over several devices (device_map)"
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "embed_tokens"):
        return f"{type(model).__name__} has no embed_tokens/rotary_emb where Llama keeps them"
    return None


def decoder_spec(model: Any) -> DecoderSpec:
    """Read the decoder's shape; raise :class:`ModelError` when the fast path cannot run it."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ModelError(
            f"the CUDA engine cannot run this model: {reason}",
            "use --engine hf (the reference engine runs every causal LM)",
        )
    cfg = _text_config(model)
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    if model_type_uses_window_flag(cfg) and not getattr(cfg, "use_sliding_window", False):
        window = None
    return DecoderSpec(
        n_blocks=int(cfg.num_hidden_layers),
        hidden=int(cfg.hidden_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        eps=float(cfg.rms_norm_eps),
        scaling=head_dim**-0.5,
        vocab=int(cfg.vocab_size),
        sliding_window=int(window) if window else None,
    )


def model_type_uses_window_flag(cfg: Any) -> bool:
    """Qwen configs carry a ``sliding_window`` that only counts when ``use_sliding_window``."""
    return getattr(cfg, "model_type", None) in ("qwen2", "qwen3")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
class LayerWeights(NamedTuple):
    """One decoder block's tensors, detached; ``qkv``/``gate_up`` are row-fused when available."""

    ln1: torch.Tensor
    qkv: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    ln2: torch.Tensor
    gate_up: torch.Tensor | None
    gate: torch.Tensor | None
    up: torch.Tensor | None
    down: torch.Tensor


def _adjacent_rows(tensors: Sequence[torch.Tensor]) -> bool:
    """True when ``tensors`` already sit back to back in one storage (fused earlier)."""
    first = tensors[0]
    if not all(t.is_contiguous() and t.dtype == first.dtype for t in tensors):
        return False
    if len({t.untyped_storage().data_ptr() for t in tensors}) != 1:
        return False
    offset = first.storage_offset()
    for t in tensors:
        if t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _fuse_params(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Re-lay ``params`` (same trailing shape) into one contiguous buffer and return it.

    The parameters are re-pointed at row slices of the new buffer (values unchanged), so the HF
    model keeps working and no weight is held twice: one matrix product then reads q, k and v
    (or gate and up) in a single pass, which matters at small batch where each launch counts.
    """
    import torch

    tensors = [p.detach() for p in params]
    if _adjacent_rows(tensors):
        first = tensors[0]
        rows = sum(t.shape[0] for t in tensors)
        return first.new_empty(0).set_(
            first.untyped_storage(),
            first.storage_offset(),
            (rows, *first.shape[1:]),
            first.stride(),
        )
    fused = torch.cat(tensors, dim=0)
    start = 0
    for param in params:
        rows = param.shape[0]
        param.data = fused[start : start + rows]
        start += rows
    return fused


def _detached(t: Any) -> torch.Tensor | None:
    return None if t is None else t.detach()


def collect_weights(model: Any, handles: LayerHandles, *, fuse: bool) -> list[LayerWeights]:
    """Per-block weights of a Llama-family model; ``fuse`` re-lays q/k/v and gate/up rows."""
    layers = []
    blocks: list[Any] = list(handles.blocks)
    for block in blocks:
        attn, mlp = block.self_attn, block.mlp
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        has_bias = attn.q_proj.bias is not None
        qkv = qkv_bias = gate_up = None
        if fuse:
            qkv = _fuse_params([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            if has_bias:
                qkv_bias = _fuse_params([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up = _fuse_params([mlp.gate_proj.weight, mlp.up_proj.weight])
        layers.append(
            LayerWeights(
                ln1=block.input_layernorm.weight.detach(),
                qkv=qkv,
                qkv_bias=qkv_bias,
                q=None if fuse else attn.q_proj.weight.detach(),
                k=None if fuse else attn.k_proj.weight.detach(),
                v=None if fuse else attn.v_proj.weight.detach(),
                q_bias=None if fuse else _detached(attn.q_proj.bias),
                k_bias=None if fuse else _detached(attn.k_proj.bias),
                v_bias=None if fuse else _detached(attn.v_proj.bias),
                q_norm=None if q_norm is None else q_norm.weight.detach(),
                k_norm=None if k_norm is None else k_norm.weight.detach(),
                o=attn.o_proj.weight.detach(),
                o_bias=_detached(attn.o_proj.bias),
                ln2=block.post_attention_layernorm.weight.detach(),
                gate_up=gate_up,
                gate=None if fuse else mlp.gate_proj.weight.detach(),
                up=None if fuse else mlp.up_proj.weight.detach(),
                down=mlp.down_proj.weight.detach(),
            )
        )
    return layers


# --------------------------------------------------------------------------------------------
# Pure step functions (compiled on CUDA)
# --------------------------------------------------------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as LlamaRMSNorm: normalise in float32, scale in the model dtype.
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_qkv(
    x: torch.Tensor,
    w: LayerWeights,
    q_width: int,
    kv_width: int,
    gemv: int = 0,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of normed states ``x`` (last dimension ``q_width`` / ``kv_width``): one fused
    product where the weights are fused, else three."""
    import torch.nn.functional as F

    if w.qkv is not None:
        qkv = linear(x, w.qkv, gemv, pdl)
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        return q, k, v
    assert w.q is not None and w.k is not None and w.v is not None
    return F.linear(x, w.q, w.q_bias), F.linear(x, w.k, w.k_bias), F.linear(x, w.v, w.v_bias)


def _attn_in(
    h: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    eps: float,
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    gemv_qkv: int = 0,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, q/k/v projections and rotary embedding for one token per row: [B, heads, head_dim].

    ``write`` = ``(k_cache, v_cache, slot)`` also stores k and v at cache slot ``slot``.
    """
    batch = h.shape[0]
    x = _rms_norm(h, w.ln1, eps)
    q, k, v = project_qkv(x, w, n_heads * head_dim, n_kv * head_dim, gemv_qkv, pdl)
    q = q.reshape(batch, n_heads, head_dim)
    k = k.reshape(batch, n_kv, head_dim)
    v = v.reshape(batch, n_kv, head_dim)
    if w.q_norm is not None and w.k_norm is not None:
        q = _rms_norm(q, w.q_norm, eps)
        k = _rms_norm(k, w.k_norm, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    if write is not None:
        # inside the compiled region the write fuses into the rotary kernel
        k_cache, v_cache, slot = write
        k_cache.index_copy_(2, slot, k[:, :, None, :])
        v_cache.index_copy_(2, slot, v[:, :, None, :])
    return q, k, v


class Sink(NamedTuple):
    """Where one captured layer's state goes in a decode step (see :func:`_capture`)."""

    buf: torch.Tensor
    """float32 ``[B, hidden]`` response sums, or a ring ``[K, B, hidden]`` in the model's dtype
    (:attr:`FastDecoder.capture_ring`)."""
    weight: torch.Tensor  # [B] float32 feed weights of this step's tokens (0 or 1)
    slot: torch.Tensor  # [1] long, the step's cache slot
    start: torch.Tensor  # [1] long, the first response slot (slot - start picks the ring slot)


def _capture(sink: Sink | None, h: torch.Tensor) -> None:
    """Add ``h * weight`` into the response sums, or store it in the ring's slot for this step.

    The store is what makes the ring worth having: adding into the float32 sums reads them
    from memory in the middle of the step (the step's weights have evicted them from L2), and
    the kernel that also computes the next norm waits for that read. A store waits for
    nothing; :meth:`tracekit.engines.cuda.ops.ring.CaptureRings.flush` adds the ring into the
    sums every K steps. Weights are 0 or 1, so ``h * weight`` in the model's dtype is exact:
    the sums are those of the states as stored, the values the next block reads. (The add in
    the step sums ``h`` before its rounding to the model's dtype, since inductor keeps a fused
    kernel's intermediates in float32; that is the only difference.)"""
    if sink is None:
        return
    buf, weight, slot, start = sink
    if buf.dim() == 3:
        ring = buf.shape[0]
        buf.index_copy_(0, (slot - start) % ring, (h * weight[:, None].to(h.dtype))[None])
    else:
        buf.add_(h.float() * weight[:, None])


def _attn_out_mlp(
    h: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_bias: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    eps: float,
    scaling: float,
    sdpa: bool = False,
    gemv: GemvChoice | None = None,
) -> torch.Tensor:
    """Attention over the static cache (GQA without repeating K/V), o_proj, MLP, residuals.

    ``cap`` receives the block's output state (:func:`_capture`): the capture hook of the fast
    path, inside the captured step.
    """
    import torch
    import torch.nn.functional as F

    batch, n_kv, _, head_dim = k_cache.shape
    group = q.shape[1] // n_kv
    qg = q.reshape(batch, n_kv, group, head_dim)
    if sdpa:
        # the G query heads of one kv head act as G query positions: plain SDPA, no repeat
        mask = attn_bias[:, None, None, :].to(q.dtype)
        attn = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask, scale=scaling)
    else:
        scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scaling
        scores = scores + attn_bias[:, None, None, :]
        probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
        attn = torch.matmul(probs, v_cache)
    attn = attn.reshape(batch, n_kv * group * head_dim)
    return _out_mlp(h, attn, w, cap, eps, gemv)


def _out_mlp(
    h: torch.Tensor,
    attn: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    eps: float,
    gemv: GemvChoice | None = None,
) -> torch.Tensor:
    """o_proj of the attention output ``[B, heads * head_dim]``, MLP, residuals, capture."""
    import torch.nn.functional as F

    gemv = gemv or NO_GEMV
    out = linear(attn, w.o, gemv.o, gemv.pdl)
    h = h + (out if w.o_bias is None else out + w.o_bias)
    x = _rms_norm(h, w.ln2, eps)
    if w.gate_up is not None and gemv.gated and gemv.down >= TRITON and gemv.gate_up != SWIGLU:
        # SiLU and the product with up inside the down kernel: one kernel less per block
        gate_up = linear(x, w.gate_up, gemv.gate_up, gemv.pdl)
        h = h + gated_linear(gate_up, w.down, gemv.down, gemv.pdl)
    else:
        if w.gate_up is not None:  # SWIGLU: the gating inside the gate/up kernel
            act = swiglu(x, w.gate_up, gemv.gate_up, gemv.pdl)
        else:
            assert w.gate is not None and w.up is not None
            act = F.silu(F.linear(x, w.gate)) * F.linear(x, w.up)
        h = h + linear(act, w.down, gemv.down, gemv.pdl)
    _capture(cap, h)
    return h


def _qkv_product(
    h: torch.Tensor, w: LayerWeights, eps: float, gemv_qkv: int, pdl: bool = False
) -> torch.Tensor:
    """Norm and fused q/k/v product for the fused attention kernel, bias not added: the
    product ``[B, N]``, or for a split-K mode its float32 partials ``[splits, B, N]`` (the
    kernel sums them, so no kernel here does)."""
    import torch

    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    assert w.qkv is not None
    x = _rms_norm(h, w.ln1, eps)
    if gemv_qkv >= cuda_gemv.SPLIT_K2:
        parts: torch.Tensor = torch.ops.tracekit.gemv_splitk(
            x, w.qkv, cuda_gemv.splits_of(gemv_qkv), pdl
        )
        return parts
    return linear(x, w.qkv, gemv_qkv, pdl)


def _prelude(
    cur_tok: torch.Tensor,
    embed: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    slot_range: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embedding, this step's rotary rows and the additive attention mask over cache slots."""
    import torch

    h, cos, sin = _embed_step(cur_tok, embed, slot, pad_len, cos_table, sin_table, cap0)
    valid = (slot_range[None, :] >= pad_len[:, None]) & (slot_range[None, :] <= slot)
    if window is not None:
        valid = valid & (slot_range[None, :] > slot - window)
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=h.device)
    bias = bias.masked_fill(~valid, float("-inf"))
    return h, cos, sin, bias


def _embed_step(
    cur_tok: torch.Tensor,
    embed: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embedding of this step's tokens (captured as layer 0) and its rotary rows."""
    import torch.nn.functional as F

    h = F.embedding(cur_tok, embed)
    pos = (slot - pad_len).clamp(min=0)  # rotary position = index among the row's real tokens
    _capture(cap0, h)
    return h, cos_table[pos], sin_table[pos]


def rope_tables(
    rotary: Any, length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[length, head_dim]`` for positions ``0 .. length - 1``, from the model's
    own rotary module (same arithmetic as its forward, so positions match exactly)."""
    import torch

    positions = torch.arange(length, device=device)[None, :]
    cos, sin = rotary(torch.empty(1, dtype=dtype, device=device), positions)
    return cos[0].contiguous(), sin[0].contiguous()


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32-style integer mixer on int64 holding 32-bit values; the multipliers are below
    # 2**31 so no product overflows int64 on any backend.
    mask = 0xFFFFFFFF
    x = x & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & mask
    x = x ^ (x >> 16)
    return x


def uniform_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) float32 noise [B, vocab] from (row seed, token index, vocab index) only."""
    import torch

    row = _hash32(_hash32(seeds) ^ (index * 0x61C88647))
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row[:, None] ^ ((cols * 0x2C1B3C6D) & 0xFFFFFFFF))
    return ((bits >> 8).float() + 0.5) * (1.0 / 16777216.0)


def argmax_chunk_for(vocab: int) -> int:
    """A divisor of ``vocab`` near 1000 for a two-stage argmax; 0 when there is none."""
    for size in sorted(range(256, 4097), key=lambda d: abs(d - 1000)):
        if vocab % size == 0 and vocab // size >= 8:
            return size
    return 0


def _argmax(values: torch.Tensor, chunk: int) -> torch.Tensor:
    """Row argmax (first maximum) in two stages: a one-pass reduction over a 128k vocabulary
    with only a few rows runs on a few multiprocessors; chunks spread it over all of them."""

    if chunk <= 0:
        return values.argmax(dim=-1)
    rows, vocab = values.shape
    best, where = values.view(rows, vocab // chunk, chunk).max(dim=-1)
    block = best.argmax(dim=-1, keepdim=True)
    return (block * chunk + where.gather(-1, block)).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    index: torch.Tensor,
    do_sample: bool,
    use_top_p: bool,
    argmax_chunk: int = 0,
) -> torch.Tensor:
    """Next token per row: argmax, or a seeded sample with temperature and top-p (nucleus).

    ``temperature``/``top_p`` are per row; a row with temperature 0 is greedy. Top-p keeps the
    smallest set of most likely tokens whose mass reaches ``top_p`` (at least one token).
    """
    import torch

    greedy = _argmax(logits, argmax_chunk)
    if not do_sample:
        return greedy
    temp = temperature.clamp(min=1e-5)
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    if use_top_p:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    race = -torch.log(uniform_noise(seeds, index, logits.shape[-1]))
    sampled = _argmax(probs / race, argmax_chunk)
    return torch.where(temperature > 0, sampled, greedy)


def _advance(
    logits: torch.Tensor,
    st: _State,
    eos_ids: torch.Tensor,
    pad_id: int,
    max_new: int,
    include_eos: bool,
    do_sample: bool,
    use_top_p: bool,
    argmax_chunk: int = 0,
) -> None:
    """Pick each row's next token and update the per-row bookkeeping, all on the device."""
    import torch

    index = st.slot - st.start + 1  # index of the token being emitted (0 = first response token)
    tok = sample_tokens(
        logits, st.temperature, st.top_p, st.seeds, index, do_sample, use_top_p, argmax_chunk
    )
    alive = st.alive
    tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
    st.out_tokens.index_copy_(1, index, tok[:, None])
    is_eos = (tok[:, None] == eos_ids[None, :]).any(dim=-1) & alive
    kept = alive if include_eos else alive & ~is_eos
    st.n_kept.add_(kept.to(st.n_kept.dtype))
    st.eos_hit.logical_or_(is_eos)
    st.feed_weight.copy_(kept.to(st.feed_weight.dtype))
    st.alive.copy_(alive & ~is_eos & (index + 1 < max_new))
    st.cur_tok.copy_(tok)
    st.slot.add_(1)


# --------------------------------------------------------------------------------------------
# Runner: buffers + graph for one shape
# --------------------------------------------------------------------------------------------
class _State(NamedTuple):
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


@dataclass(frozen=True)
class RunKey:
    batch: int
    prompt_len: int
    max_new_tokens: int
    do_sample: bool
    use_top_p: bool


@dataclass
class FastResult:
    """Output of :meth:`FastDecoder.generate` (host tensors)."""

    tokens: list[list[int]]
    """Response token ids per row (eos excluded unless ``include_eos``)."""
    finish_reasons: list[str]
    """``"eos"`` or ``"length"`` per row."""
    pooled: dict[str, torch.Tensor]
    """pooling name -> float32 [B, n_layers, hidden] (layers in the order asked)."""
    decode_steps: int
    """Decode steps run (graph replays, or eager steps)."""


class _Runner:
    """Static buffers (KV cache, state, pooled sums) and the captured step for one RunKey."""

    def __init__(self, dec: FastDecoder, key: RunKey) -> None:
        import torch

        self.dec = dec
        self.key = key
        spec, dev = dec.spec, dec.device
        b, p, t = key.batch, key.prompt_len, key.max_new_tokens
        self.total_len = p + t
        if spec.sliding_window is not None and self.total_len > spec.sliding_window:
            # The prefill cache of HF keeps only the window; re-deriving it is not worth it here.
            raise ModelError(
                f"prompt + new tokens ({self.total_len}) exceed the sliding window "
                f"({spec.sliding_window}) of this model",
                "use --engine hf for sequences longer than the window",
            )
        cache_shape = (b, spec.n_kv_heads, self.total_len, spec.head_dim)
        self.k_cache = [torch.zeros(cache_shape, dtype=dec.dtype, device=dev) for _ in dec.weights]
        self.v_cache = [torch.zeros(cache_shape, dtype=dec.dtype, device=dev) for _ in dec.weights]
        self.slot_range = torch.arange(self.total_len, device=dev)
        self.st = _State(
            cur_tok=torch.zeros(b, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            start=torch.zeros(1, dtype=torch.long, device=dev),
            pad_len=torch.zeros(b, dtype=torch.long, device=dev),
            alive=torch.zeros(b, dtype=torch.bool, device=dev),
            feed_weight=torch.zeros(b, dtype=torch.float32, device=dev),
            n_kept=torch.zeros(b, dtype=torch.long, device=dev),
            eos_hit=torch.zeros(b, dtype=torch.bool, device=dev),
            out_tokens=torch.zeros(b, t + 1, dtype=torch.long, device=dev),
            temperature=torch.ones(b, dtype=torch.float32, device=dev),
            top_p=torch.ones(b, dtype=torch.float32, device=dev),
            seeds=torch.zeros(b, dtype=torch.long, device=dev),
        )
        # response sums per tracekit layer (0 = embedding output, i = after block i-1); separate
        # allocations, not views of one tensor, so compiled code updates each one in place
        cap_layers = dec.layers if "response_avg" in dec.poolings else ()
        self.caps: dict[int, torch.Tensor] = {
            layer: torch.zeros(b, spec.hidden, dtype=torch.float32, device=dev)
            for layer in cap_layers
        }
        gemv = dec.gemv_choice(b)
        block = dec.block_splits_for(b)
        # with fused blocks, the attention kernel sums the norm product's partials
        qkv_mode = gemv.qkv if block is None else mode_for_splits(block.qkv)
        fused = dec.fused_attention_for(b, self.total_len, qkv_mode)
        self.dims = dec.dims._replace(
            gemv=gemv, fused_attention=fused, block=block if fused else None
        )
        # the fused attention kernel's configuration (cuda_attention.kernel_config)
        self.attn_config = dec.attention_config_for(b, self.total_len, p, qkv_mode, fused)
        self.work = None
        if self.dims.block is not None:
            from tracekit.engines.cuda.ops.block import workspace

            self.work = workspace(b, spec.hidden, dev)
        # the step stores captured states in rings, flushed into self.caps by the host
        # (cuda_ring); not with fused blocks, whose kernels add into the sums themselves
        self.rings = None
        if self.caps and dec.capture_ring and self.dims.block is None:
            from tracekit.engines.cuda.ops.ring import CaptureRings

            self.rings = CaptureRings(self.caps, dec.capture_ring, dec.dtype)
        self.graph: Any = None
        # the prefill as a CUDA graph (FastDecoder._prefill_as_graph): captured on first use;
        # False after a failed capture (the prefill then runs eagerly)
        self.prefill_graph: Any = None
        self._prefill_in: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefill_out: dict[str, torch.Tensor] = {}

    def sink(self, layer: int) -> Sink | None:
        """Where the step puts tracekit layer ``layer``'s state: its ring or its sums."""
        buf = (self.rings.rings if self.rings is not None else self.caps).get(layer)
        st = self.st
        return None if buf is None else Sink(buf, st.feed_weight, st.slot, st.start)

    @property
    def ring_size(self) -> int:
        """Steps between flushes of the capture rings (0: no rings)."""
        return 0 if self.rings is None else self.rings.size

    def flush(self, count: int) -> None:
        """Add the last ``count`` steps' captured states into the sums (see ``cuda_ring``)."""
        if self.rings is not None:
            self.rings.flush(count)

    # -- one decode step (eager Python that calls the compiled pieces) ------------------------
    def step(self) -> None:
        dec, st = self.dec, self.st
        d = self.dims
        if d.block is not None:
            self._step_block()
            return
        if d.fused_attention:
            self._step_fused()
            return
        slot = st.slot
        caches = [_Caches(k, v) for k, v in zip(self.k_cache, self.v_cache, strict=True)]
        weights = dec.weights
        last = len(weights) - 1
        h, q, k, v, cos, sin, bias = dec.fn_first(
            st.cur_tok,
            dec.embed,
            slot,
            st.pad_len,
            self.slot_range,
            dec.cos_table,
            dec.sin_table,
            self.sink(0),
            weights[0],
            caches[0],
            d,
        )
        for i in range(last):
            if not d.write_kv:
                self._write_kv(caches[i], k, v, slot)
            h, q, k, v = dec.fn_middle(
                h,
                q,
                caches[i],
                bias,
                weights[i],
                self.sink(i + 1),
                weights[i + 1],
                caches[i + 1],
                slot,
                cos,
                sin,
                d,
            )
        if not d.write_kv:
            self._write_kv(caches[last], k, v, slot)
        self._last(h, q, caches[last], bias)

    def _step_fused(self) -> None:
        """One decode step with the fused attention kernel between the compiled pieces."""
        from tracekit.engines.cuda.ops.attention import AttentionShape, decode_attention

        dec, st, d = self.dec, self.st, self.dims
        shape = AttentionShape(d.n_heads, d.n_kv, d.head_dim, d.scaling, d.window)
        slot = st.slot
        weights = dec.weights
        last = len(weights) - 1
        h, qkv, cos, sin = dec.fn_first_fused(
            st.cur_tok,
            dec.embed,
            slot,
            st.pad_len,
            dec.cos_table,
            dec.sin_table,
            self.sink(0),
            weights[0],
            d,
        )
        for i, w in enumerate(weights):
            attn = decode_attention(
                qkv,
                w.qkv_bias,
                cos,
                sin,
                self.k_cache[i],
                self.v_cache[i],
                slot,
                st.pad_len,
                shape,
                d.gemv.pdl,
                self.attn_config,
            )
            if i < last:
                cap = self.sink(i + 1)
                h, qkv = dec.fn_middle_fused(h, attn, w, cap, weights[i + 1], d)
        self._last(h, attn, None, None)

    def _step_block(self) -> None:
        """One decode step of fused block products (:mod:`tracekit.engines.cuda.ops.block`)
        and the fused attention kernel: five kernels per block."""
        from tracekit.engines.cuda.ops import block as cuda_block
        from tracekit.engines.cuda.ops.attention import AttentionShape, decode_attention

        dec, st, key, d = self.dec, self.st, self.key, self.dims
        splits, pdl, work = d.block, d.gemv.pdl, self.work
        assert splits is not None and work is not None
        shape = AttentionShape(d.n_heads, d.n_kv, d.head_dim, d.scaling, d.window)
        slot = st.slot
        h, ss, cos, sin = dec.fn_embed_norm(
            st.cur_tok,
            dec.embed,
            slot,
            st.pad_len,
            dec.cos_table,
            dec.sin_table,
            self.sink(0),
        )
        for i, w in enumerate(dec.weights):
            assert w.qkv is not None and w.gate_up is not None
            qkv = cuda_block.norm_product(h, ss, w.ln1, w.qkv, d.eps, splits.qkv, pdl)
            attn = decode_attention(
                qkv,
                w.qkv_bias,
                cos,
                sin,
                self.k_cache[i],
                self.v_cache[i],
                slot,
                st.pad_len,
                shape,
                pdl,
                self.attn_config,
            )
            h, ss = cuda_block.residual_product(attn, w.o, h, work, splits.o, None, pdl)
            act = cuda_block.norm_gated_product(h, ss, w.ln2, w.gate_up, d.eps, pdl)
            cap = self.caps.get(i + 1)  # no ring here (FastDecoder.capture_ring)
            capture = None if cap is None else (cap, st.feed_weight)
            h, ss = cuda_block.residual_product(act, w.down, h, work, splits.down, capture, pdl)
        dec.fn_head_advance(
            h,
            dec.final_norm,
            dec.lm_head,
            st,
            dec.eos_ids,
            dec.pad_id,
            key.max_new_tokens,
            dec.include_eos,
            key.do_sample,
            key.use_top_p,
            d,
        )

    def _last(
        self, h: torch.Tensor, q: torch.Tensor, cache: _Caches | None, bias: torch.Tensor | None
    ) -> None:
        dec, st, key = self.dec, self.st, self.key
        dec.fn_last(
            h,
            q,
            cache,
            bias,
            dec.weights[-1],
            self.sink(len(dec.weights)),
            dec.final_norm,
            dec.lm_head,
            st,
            dec.eos_ids,
            dec.pad_id,
            key.max_new_tokens,
            dec.include_eos,
            key.do_sample,
            key.use_top_p,
            self.dims,
        )

    @staticmethod
    def _write_kv(cache: _Caches, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
        cache.k.index_copy_(2, slot, k[:, :, None, :])
        cache.v.index_copy_(2, slot, v[:, :, None, :])

    def reset_dummy(self) -> None:
        """Valid state for warm-up and capture (any token ids, step 0)."""
        st = self.st
        st.cur_tok.zero_()
        st.slot.fill_(self.key.prompt_len)
        st.start.fill_(self.key.prompt_len)
        st.pad_len.zero_()
        st.alive.zero_()
        st.feed_weight.zero_()

    def capture(self, warmup: int = 2) -> tuple[float, float]:
        """Warm up (compile, autotune, allocate) and record the step as a CUDA graph; returns
        the seconds of each part."""
        import torch

        started = time.perf_counter()

        def warm() -> None:
            for _ in range(warmup):
                self.reset_dummy()
                self.step()

        on_side_stream(warm, self.dec.device)
        torch.cuda.synchronize(self.dec.device)
        warmed = time.perf_counter()
        self.reset_dummy()
        graph = torch.cuda.CUDAGraph()
        with capture_graph(graph, self.dec.device):
            self.step()
        self.graph = graph
        self.reset_dummy()
        return warmed - started, time.perf_counter() - warmed

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`FastDecoder._prefill_body` replayed as a CUDA graph over static copies of
        ``ids`` and ``mask``, captured on the first call. The launches of a prefill through
        the compiled blocks cost the host ~15 ms at 16 layers (measured on an H200), more than
        the device's work for short prompts; a replay costs microseconds. The returned
        poolings are the graph's static outputs: the next prefill overwrites them, so they
        are copied out first (the run's results are queued for the host before it)."""
        import torch

        dec = self.dec
        if self.prefill_graph is not None:
            assert self._prefill_in is not None
            self._prefill_in[0].copy_(ids)
            self._prefill_in[1].copy_(mask)
        else:
            started = time.perf_counter()
            try:
                inputs = self._prefill_in = (ids.clone(), mask.clone())
                on_side_stream(lambda: dec._prefill_body(self, *inputs), dec.device)
                # one memory pool for every prefill graph of the decoder, so its runners do
                # not each keep a prefill's activations. Safe because prefills never overlap
                # and a prefill's only outputs read later (its poolings) are copied out before
                # the next prefill is queued (FastDecoder._collect)
                if dec._prefill_pool is None:
                    dec._prefill_pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with capture_graph(graph, dec.device, pool=dec._prefill_pool):
                    self._prefill_out = dec._prefill_body(self, *inputs)
                self.prefill_graph = graph
            except Exception as exc:  # the prefill can always run eagerly instead
                if _is_oom(exc):
                    raise
                logger.warning("CUDA graph capture of the prefill failed (%s); run eagerly", exc)
                self.prefill_graph = False
                return dec._prefill_body(self, ids, mask)
            finally:
                dec.setup_parts["graph_capture"] += time.perf_counter() - started
        self.prefill_graph.replay()
        return self._prefill_out

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def set_gemv(self, gemv: GemvChoice) -> None:
        """Run the step with ``gemv``'s kernels (the attention kernel's use re-decided for its
        q/k/v mode); the caller captures again."""
        key = self.key
        fused = self.dec.fused_attention_for(key.batch, self.total_len, gemv.qkv)
        self.dims = self.dims._replace(gemv=gemv, fused_attention=fused)
        self.attn_config = self.dec.attention_config_for(
            key.batch, self.total_len, key.prompt_len, gemv.qkv, fused
        )

    def time_steps(self, rounds: int = 3) -> float:
        """Seconds per replay of the captured step: the best of ``rounds`` runs of up to 16
        replays from the dummy state (each replay advances the slot: no more replays than the
        cache has slots after the prompt; a real decode step writes its slot before any step
        reads it, so what these replays leave there is never read)."""
        import torch

        replays = max(1, min(16, self.key.max_new_tokens - 1))
        assert self.graph is not None
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(rounds):
            self.reset_dummy()
            start.record()
            for _ in range(replays):
                self.graph.replay()
            end.record()
            torch.cuda.synchronize(self.dec.device)
            best = min(best, start.elapsed_time(end) / 1e3 / replays)
        self.reset_dummy()
        return best


def _head(
    h: torch.Tensor,
    norm: torch.Tensor,
    lm_head: torch.Tensor,
    eps: float,
    gemv: int = 0,
    pdl: bool = False,
) -> torch.Tensor:
    return linear(_rms_norm(h, norm, eps), lm_head, gemv, pdl).float()


class GemvChoice(NamedTuple):
    """Per linear layer, how it runs (:mod:`tracekit.engines.cuda.ops.gemv` modes; 0 = F.linear)."""

    qkv: int = 0
    o: int = 0
    gate_up: int = 0
    down: int = 0
    head: int = 0
    pdl: bool = False
    """The Triton kernels (products and attention) as programmatic dependent launches."""
    gated: bool = False
    """``down`` in a Triton mode computes ``silu(gate) * up`` itself (no SiLU kernel)."""


NO_GEMV = GemvChoice()


class BlockSplits(NamedTuple):
    """K slices of each fused block product (:mod:`tracekit.engines.cuda.ops.block`)."""

    qkv: int
    o: int
    down: int


class Dims(NamedTuple):
    """Python constants the step functions specialise on (one compilation per value set)."""

    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    scaling: float
    window: int | None
    write_kv: bool
    """True: compiled code writes the KV cache; False: the caller writes it eagerly."""
    sdpa_attention: bool
    """True: ``scaled_dot_product_attention``; False: two matmuls and a softmax."""
    gemv: GemvChoice
    """Which linear layers use the Triton matrix-vector kernel (per batch size)."""
    argmax_chunk: int
    """Chunk length of the two-stage argmax over the vocabulary (0: one stage)."""
    fused_attention: bool = False
    """True: rotary, KV write and attention in one Triton kernel per block
    (:mod:`tracekit.engines.cuda.ops.attention`), called between the compiled pieces."""
    block: BlockSplits | None = None
    """Set: every block runs as the fused products of :mod:`tracekit.engines.cuda.ops.block`
    around the fused attention kernel (K slices per product); only the embedding and the
    head are compiled pieces."""


class _Caches(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor


def _first(
    cur_tok: torch.Tensor,
    embed: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    slot_range: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
    w0: LayerWeights,
    cache0: _Caches,
    d: Dims,
) -> tuple[torch.Tensor, ...]:
    """Embedding, rotary rows, mask, and block 0 up to its attention input."""
    h, cos, sin, bias = _prelude(
        cur_tok, embed, slot, pad_len, slot_range, cos_table, sin_table, cap0, d.window
    )
    write = (cache0.k, cache0.v, slot) if d.write_kv else None
    q, k, v = _attn_in(
        h, w0, cos, sin, d.n_heads, d.n_kv, d.head_dim, d.eps, write, d.gemv.qkv, d.gemv.pdl
    )
    return h, q, k, v, cos, sin, bias


def _middle(
    h: torch.Tensor,
    q: torch.Tensor,
    cache: _Caches,
    bias: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    w_next: LayerWeights,
    cache_next: _Caches,
    slot: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rest of block i and block i+1 up to its attention input: one compiled region per
    boundary, so the residual add, the capture and the next norm fuse into one kernel."""
    h = _attn_out_mlp(
        h, q, cache.k, cache.v, bias, w, cap, d.eps, d.scaling, d.sdpa_attention, d.gemv
    )
    write = (cache_next.k, cache_next.v, slot) if d.write_kv else None
    q, k, v = _attn_in(
        h, w_next, cos, sin, d.n_heads, d.n_kv, d.head_dim, d.eps, write, d.gemv.qkv, d.gemv.pdl
    )
    return h, q, k, v


def _last(
    h: torch.Tensor,
    q: torch.Tensor,
    cache: _Caches | None,
    bias: torch.Tensor | None,
    w: LayerWeights,
    cap: Sink | None,
    final_norm: torch.Tensor,
    lm_head: torch.Tensor,
    st: _State,
    eos_ids: torch.Tensor,
    pad_id: int,
    max_new: int,
    include_eos: bool,
    do_sample: bool,
    use_top_p: bool,
    d: Dims,
) -> None:
    """Rest of the last block, final norm, logits, sampling and the per-row bookkeeping.

    With ``d.fused_attention``, ``q`` is the block's attention output (``cache``/``bias``
    unused): the fused kernel ran before this piece."""
    if d.fused_attention:
        h = _out_mlp(h, q, w, cap, d.eps, d.gemv)
    else:
        assert cache is not None and bias is not None
        h = _attn_out_mlp(
            h, q, cache.k, cache.v, bias, w, cap, d.eps, d.scaling, d.sdpa_attention, d.gemv
        )
    _head_advance(
        h, final_norm, lm_head, st, eos_ids, pad_id, max_new, include_eos, do_sample, use_top_p, d
    )


def _first_fused(
    cur_tok: torch.Tensor,
    embed: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
    w0: LayerWeights,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused-attention step: embedding, this step's rotary rows, block 0's q/k/v product."""
    h, cos, sin = _embed_step(cur_tok, embed, slot, pad_len, cos_table, sin_table, cap0)
    return h, _qkv_product(h, w0, d.eps, d.gemv.qkv, d.gemv.pdl), cos, sin


def _middle_fused(
    h: torch.Tensor,
    attn: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    w_next: LayerWeights,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-attention step: rest of block i after its attention, block i+1's q/k/v product."""
    h = _out_mlp(h, attn, w, cap, d.eps, d.gemv)
    return h, _qkv_product(h, w_next, d.eps, d.gemv.qkv, d.gemv.pdl)


def _embed_norm(
    cur_tok: torch.Tensor,
    embed: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused-block step: embedding, its rows' sums of squares (block 0's norm), rotary rows."""
    from tracekit.engines.cuda.ops.block import row_sums

    h, cos, sin = _embed_step(cur_tok, embed, slot, pad_len, cos_table, sin_table, cap0)
    return h, row_sums(h), cos, sin


def _head_advance(
    h: torch.Tensor,
    final_norm: torch.Tensor,
    lm_head: torch.Tensor,
    st: _State,
    eos_ids: torch.Tensor,
    pad_id: int,
    max_new: int,
    include_eos: bool,
    do_sample: bool,
    use_top_p: bool,
    d: Dims,
) -> None:
    """Final norm, logits, sampling and the per-row bookkeeping (the end of every step)."""
    logits = _head(h, final_norm, lm_head, d.eps, d.gemv.head, d.gemv.pdl)
    _advance(
        logits, st, eos_ids, pad_id, max_new, include_eos, do_sample, use_top_p, d.argmax_chunk
    )


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------
_COMPILED: dict[str, Any] = {}

PREFILL_GRAPH_TOKENS = 16384
"""Largest prefill (batch x padded prompt length) replayed as a CUDA graph; longer prompts
keep the eager prefill, whose launch cost is small next to their device time."""

SETUP_PARTS = ("kernel_choice", "compile_warmup", "graph_capture", "step_tuning")

CAPTURE_RING = 8
"""Decode steps per flush of the capture rings (:mod:`tracekit.engines.cuda.ops.ring`), by
default with captured steps."""

FUSED_ATTENTION_MAX_LEN = 1024
"""Longest cache (prompt + new tokens) for which ``fused_attention="auto"`` uses the kernel."""


def step_tuning_default() -> bool:
    """Whether step tuning is on where ``FastDecoder(tune_steps=None)``: yes, unless the
    environment says ``TRACEKIT_STEP_TUNING=0`` (or ``off``/``false``/``no``), for machines that
    live too briefly to repay a minute or two per batch size (the tuning's warning names it)."""
    import os

    value = os.environ.get("TRACEKIT_STEP_TUNING", "1").strip().lower()
    return value not in ("0", "off", "false", "no")


GEMV_ROLES = ("qkv", "o", "gate_up", "down", "head")
"""The linear layers whose kernel ``FastDecoder(gemv_modes=...)`` can pin."""

TUNED_ROLES = ("o", "qkv", "down", "gate_up")
"""The linear layers whose kernel step tuning (``FastDecoder(tune_steps=...)``) re-decides
by timing whole decode steps, in this order: those that follow the step's small kernels, where
a product timed alone (:func:`tracekit.engines.cuda.ops.gemv.choose`) and the same product
inside the step differ most, then ``gate_up`` for its one candidate (:data:`ROLE_CANDIDATES`).
The head is long enough for the timing alone."""

ROLE_CANDIDATES: dict[str, tuple[int, ...]] = {"gate_up": (SWIGLU,)}
"""Step tuning's candidates per layer where not :data:`cuda_gemv.TUNED_MODES`: ``gate_up``
tries only the kernel that computes ``silu(gate) * up`` itself (no SiLU kernel after it);
its plain Triton modes were never faster than cuBLAS in whole steps (benchmarks/RESULTS.md,
tenth run)."""

STEP_TUNING_MARGIN = 0.01
"""A step-tuning candidate must beat the best step so far by this fraction (not by noise)."""


def _modes_label(gemv: GemvChoice) -> str:
    """``qkv=linear o=splitk4 ...``: a step's linear-layer kernels, for logs and benchmarks."""
    return " ".join(f"{r}={MODE_NAMES[getattr(gemv, r)]}" for r in GEMV_ROLES)


def _mode_of(role: str, mode: int) -> bool:
    """Whether ``mode`` can run layer ``role``: :data:`SWIGLU` is the gate/up product's only."""
    return mode != SWIGLU or role == "gate_up"


def _pinned_modes(modes: Mapping[str, str] | None) -> dict[str, int]:
    """``{role: mode name}`` (``FastDecoder(gemv_modes=...)``) as cuda_gemv modes, checked."""
    pinned: dict[str, int] = {}
    for role, name in (modes or {}).items():
        if role not in GEMV_ROLES:
            raise ValueError(
                f"gemv_modes: unknown layer {role!r}; choose from {', '.join(GEMV_ROLES)}"
            )
        if name not in MODE_NAMES:
            raise ValueError(
                f"gemv_modes: unknown mode {name!r} for {role}; choose from {', '.join(MODE_NAMES)}"
            )
        if not _mode_of(role, MODE_NAMES.index(name)):
            raise ValueError(f"gemv_modes: swiglu is a mode of gate_up only, not of {role}")
        pinned[role] = MODE_NAMES.index(name)
    return pinned


@functools.cache
def _persistent_choices() -> Any:
    """The inductor heuristics class of the compiled step (``_inductor_choices.PersistentRows``),
    under which its row reductions are one-pass kernels. A decode step's norms add the residual
    (and the split-K partials of the product before them) to rows of the hidden size (2048 for
    Llama-3.2-1B, past inductor's limit of 1024): on an H200 the one-pass form made the step
    ~3% faster at batch 8 and 32 (benchmarks/RESULTS.md, twelfth run). ``None`` where this
    torch lacks the hook."""
    try:
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "inductor_choices_class"):
            from tracekit.engines.cuda.inductor_choices import PersistentRows

            return PersistentRows
    except ImportError:  # pragma: no cover - an older torch
        pass
    return None


def _compiled(name: str, fn: Any, pdl: bool = False, persistent: bool = True) -> Any:
    """One ``torch.compile`` wrapper per function (and ``pdl`` setting) per process, so runners
    share its cache. ``pdl``: inductor's kernels use programmatic dependent launch too;
    ``persistent``: the step's norms as one-pass kernels (:func:`_persistent_choices`)."""
    import torch

    choices = _persistent_choices() if persistent else None
    key = name + ("/pdl" if pdl else "") + ("/persistent" if choices else "")
    if key not in _COMPILED:
        dyn = torch._dynamo.config
        # one compilation per (batch, cache length, capture on/off): raise the recompile cap
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dyn, attr):
                setattr(dyn, attr, max(getattr(dyn, attr), 256))
        if hasattr(dyn, "accumulated_recompile_limit"):
            dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 4096)
        elif hasattr(dyn, "accumulated_cache_size_limit"):
            dyn.accumulated_cache_size_limit = max(dyn.accumulated_cache_size_limit, 4096)
        # inductor's own kernels too, where this torch has the option (added in 2.10)
        import torch._inductor.config as inductor_config

        options: dict[str, Any] = {}
        if pdl and hasattr(inductor_config.triton, "enable_pdl"):
            options["triton.enable_pdl"] = True
        if choices is not None:  # in the cache key; and in force while compiling (below)
            options["inductor_choices_class"] = choices
        compiled = torch.compile(fn, dynamic=False, fullgraph=True, options=options or None)
        _COMPILED[key] = compiled if choices is None else _under_choices(compiled, choices)
    return _COMPILED[key]


def _under_choices(compiled: Any, choices: Any) -> Any:
    """``compiled`` called with inductor's heuristics set to ``choices()``: inductor reads
    ``inductor_choices_class`` once per thread, so an earlier compilation in this thread
    (tracekit's or the caller's) would otherwise have fixed the default ones. Only
    compilations see the setting; a compiled call is unchanged."""
    from torch._inductor.virtualized import V

    instance = choices()

    def call(*args: Any, **kwargs: Any) -> Any:
        with V.set_choices_handler(instance):
            return compiled(*args, **kwargs)

    return call


class FastDecoder:
    """Generate with capture from a Llama-family HF model; fast on CUDA, eager elsewhere.

    ``layers`` are tracekit layers (0 = embedding output, ``i`` = after block ``i - 1``);
    ``poolings`` a subset of :data:`POOLINGS`. ``use_graphs`` / ``compile`` default to on for
    CUDA and off elsewhere. Building a decoder re-lays the model's q/k/v and gate/up weights
    into fused buffers when ``fuse_weights`` (values unchanged; default on CUDA).

    Tuning knobs (defaults are what the benchmarks chose): ``write_kv_in_graph`` (KV-cache
    writes inside the compiled code; default with ``compile``), ``sdpa_attention`` (decode
    attention through ``scaled_dot_product_attention`` instead of two matmuls), ``gemv``
    (``auto``: per shape the fastest correct of ``F.linear``, the transposed product and the
    Triton kernels; ``on``: the split-N Triton kernel wherever correct; ``splitk``: the split-K
    one in two slices wherever correct; ``off``: ``F.linear``), ``gemv_modes`` (pins the kernel
    of single layers over ``gemv``, e.g. ``{"o": "splitk8"}``: roles :data:`GEMV_ROLES`, modes
    :data:`tracekit.engines.cuda.ops.gemv.MODE_NAMES`; a pinned mode that fails its check runs
    ``F.linear``; only where ``gemv`` is not ``off``), ``tune_steps`` (with ``gemv="auto"``
    and captured steps, the default unless ``TRACEKIT_STEP_TUNING=0``: the first step captured
    at a batch size re-decides the kernels of :data:`TUNED_ROLES` by timing whole steps, see
    :meth:`_tune`; tens of seconds once, then kept in the decisions file),
    ``attention_config`` (pins the fused attention kernel's (slots per block, warps, stages),
    one of :data:`tracekit.engines.cuda.ops.attention.CONFIGS`; ``None``: timed per shape, see
    :meth:`attention_config_for`),
    ``pdl`` (programmatic dependent launch of the step's Triton and inductor kernels; ``None``:
    wherever available), ``time_with_pdl`` (the linear-layer kernel choice times the Triton
    candidates as dependent launches; off: on an H200 at batch 8 it gave 55% of the floor
    against 56%), ``fast_prefill`` (the prompt through the engine's own block functions
    instead of the HF model; ``None``: with ``compile``; +10% tokens/s end to end at batch 32
    on an H200),
    ``gated_down`` (where ``down_proj`` runs a Triton kernel, that kernel computes
    ``silu(gate) * up`` as it loads its input, one kernel less per block; off: on an H200 at
    batch 8 the step took 1.35 ms against 1.07 ms), ``fused_block`` (every block as
    the five fused kernels of :mod:`tracekit.engines.cuda.ops.block`, the norms, residual adds
    and SiLU inside the products; off: on an H200 the step took 1.03-1.16 ms against
    0.98-1.01 ms at batch 8 and 1.35 ms against 1.15-1.17 ms at batch 32),
    ``persistent_norms`` (the compiled step's row reductions, its norms, as one-pass kernels
    up to 4096 elements, see :func:`_persistent_choices`; on: on an
    H200 the step was 2.7-3.0% faster at batch 8 and 32), ``capture_ring`` (the step stores
    captured states in rings of this many steps that the host adds into the response sums,
    see :mod:`tracekit.engines.cuda.ops.ring`; 0: the step adds into the sums; ``None``:
    :data:`CAPTURE_RING` with captured steps, 0 otherwise; not with ``fused_block``),
    ``check_every``
    (decode steps between host checks for "all rows done"), ``prompt_bucket``
    (prompt lengths are padded up to a multiple, so batches share captured graphs) and
    ``max_runners`` (captured shapes kept alive, each with its own KV cache) and
    ``pad_batches`` (a batch smaller than the caller's ``pad_to`` runs padded to it; default
    with compiled or captured steps, see :meth:`CudaEngine.generate`).
    """

    def __init__(
        self,
        model: Any,
        *,
        layers: Sequence[int] = (),
        poolings: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        include_eos: bool = False,
        use_graphs: bool | None = None,
        compile: bool | None = None,
        fuse_weights: bool | None = None,
        write_kv_in_graph: bool | None = None,
        sdpa_attention: bool = False,
        gemv: str = "auto",
        gemv_modes: Mapping[str, str] | None = None,
        tune_steps: bool | None = None,
        fused_attention: str = "auto",
        attention_config: tuple[int, int, int] | None = None,
        pdl: bool | None = None,
        time_with_pdl: bool = False,
        fast_prefill: bool | None = None,
        gated_down: bool = False,
        fused_block: bool = False,
        persistent_norms: bool = True,
        capture_ring: int | None = None,
        check_every: int = 8,
        prompt_bucket: int = 16,
        max_runners: int = 2,
        pad_batches: bool | None = None,
    ) -> None:
        import torch

        self.model = model
        self.spec = decoder_spec(model)
        self.handles = LayerHandles.of(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        self.compile = on_cuda if compile is None else compile
        if self.use_graphs and not on_cuda:
            raise ModelError("CUDA graphs need the model on a CUDA device")
        bad_pool = [p for p in poolings if p not in POOLINGS]
        if bad_pool:
            raise ValueError(f"unknown pooling(s) {bad_pool}: choose from {', '.join(POOLINGS)}")
        bad = [layer for layer in layers if not 0 <= layer < self.handles.n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range 0-{self.handles.n_layers - 1}")
        self.layers = tuple(layers) if poolings else ()
        self.poolings = tuple(poolings) if layers else ()
        self.include_eos = include_eos
        self.check_every = max(1, int(check_every))
        self.prompt_bucket = max(1, int(prompt_bucket))
        self.max_runners = max(1, int(max_runners))
        self.pad_batches = (self.compile or self.use_graphs) if pad_batches is None else pad_batches
        # measured on an H200 (benchmarks/RESULTS.md, fifth run): on with compiled steps
        self.fast_prefill = self.compile if fast_prefill is None else bool(fast_prefill)
        # off: slower on an H200 (see the class docstring and cuda_gemv.gated_linear)
        self.gated_down = bool(gated_down)
        self._last_run: LaunchedRun | None = None
        self._prefill_pool: Any = None  # memory pool of the runners' prefill graphs
        if not eos_token_ids:
            raise ValueError("give at least one eos token id")
        self.eos_ids = torch.tensor(list(eos_token_ids), dtype=torch.long, device=self.device)
        self.pad_id = int(pad_token_id if pad_token_id is not None else eos_token_ids[0])

        base = getattr(model, getattr(model, "base_model_prefix", "model"))
        self.embed = base.embed_tokens.weight.detach()
        self.final_norm = base.norm.weight.detach()
        self.lm_head = model.get_output_embeddings().weight.detach()
        self.rotary = base.rotary_emb
        fuse = on_cuda if fuse_weights is None else fuse_weights
        with torch.no_grad():
            self.weights = collect_weights(model, self.handles, fuse=fuse)
        self.cos_table = self.sin_table = torch.empty(0)
        self._runners: OrderedDict[RunKey, _Runner] = OrderedDict()
        self.setup_parts = dict.fromkeys(SETUP_PARTS, 0.0)
        """Time spent preparing decode steps, by part: kernel choice (timing the linear-layer
        kernels, checking the attention kernel, allocating buffers), compile + warm-up steps,
        graph capture (a failed capture included)."""

        spec = self.spec
        self.dims = Dims(
            n_heads=spec.n_heads,
            n_kv=spec.n_kv_heads,
            head_dim=spec.head_dim,
            eps=spec.eps,
            scaling=spec.scaling,
            window=spec.sliding_window,
            write_kv=self.compile if write_kv_in_graph is None else write_kv_in_graph,
            sdpa_attention=sdpa_attention,
            gemv=NO_GEMV,
            argmax_chunk=argmax_chunk_for(spec.vocab) if on_cuda else 0,
        )
        if gemv not in ("auto", "on", "splitk", "off"):
            raise ValueError(f"gemv must be auto, on, splitk or off, not {gemv!r}")
        # auto: per shape, where a Triton kernel is correct and faster; on: the split-N kernel
        # wherever correct; splitk: the two-slice split-K kernel wherever correct (tests)
        self.gemv_mode = gemv if on_cuda and fuse else "off"
        self.gemv_modes = _pinned_modes(gemv_modes)
        self._step_modes: dict[int, dict[str, int]] = {}
        self.step_timings: dict[int, dict[str, float]] = {}
        """Per batch size tuned here: microseconds per decode step of each candidate timed."""
        if fused_attention not in ("auto", "on", "off"):
            raise ValueError(f"fused_attention must be auto, on or off, not {fused_attention!r}")
        # off: slower on an H200 (see the class docstring and cuda_block); needs fused weights
        self.fused_block = bool(fused_block) and fuse
        if capture_ring is not None and capture_ring < 0:
            raise ValueError(f"capture_ring must be 0 or more, not {capture_ring}")
        ring = (CAPTURE_RING if self.use_graphs else 0) if capture_ring is None else capture_ring
        self.capture_ring = 0 if self.fused_block else int(ring)
        # "on" also off CUDA (the Triton interpreter runs it there, for tests); "auto" on CUDA
        self.fused_attention = fused_attention if fuse else "off"
        if fused_attention == "auto" and not on_cuda:
            self.fused_attention = "off"
        self._fused_ok: dict[int, bool] = {}
        if attention_config is not None:
            block_n, warps, stages = attention_config
            if block_n < 16 or block_n & (block_n - 1) or warps < 1 or stages < 1:
                raise ValueError(
                    "attention_config is (slots per block: a power of 2 from 16, warps, stages),"
                    f" not {attention_config!r}"
                )
            attention_config = (int(block_n), int(warps), int(stages))
        self.attention_config = attention_config
        # programmatic dependent launch: default where it is available, in compiled, captured
        # steps (it saves the ramp and tail of each of the step's ~140 kernels)
        from tracekit.engines.cuda.ops.gemv import pdl_available

        can_pdl = self.compile and self.use_graphs and pdl_available(self.device)
        if pdl and not can_pdl:
            logger.warning(
                "programmatic dependent launch needs compiled CUDA-graph steps on a Hopper or "
                "later GPU with a recent Triton: not used"
            )
        self.pdl = can_pdl if pdl is None else bool(pdl) and can_pdl
        # off by default until measured in a whole step: see cuda_gemv.choose
        self.time_with_pdl = bool(time_with_pdl) and self.pdl
        can_tune = self.use_graphs and self.gemv_mode == "auto" and not self.fused_block
        if tune_steps is None:
            tune_steps = step_tuning_default()
        self.tune_steps = bool(tune_steps) and can_tune
        self.persistent_norms = bool(persistent_norms)
        if self.compile:
            pd, pn = self.pdl, self.persistent_norms
            self.fn_first = _compiled("first", _first, pd, pn)
            self.fn_middle = _compiled("middle", _middle, pd, pn)
            self.fn_last = _compiled("last", _last, pd, pn)
            self.fn_advance = _compiled("advance", _advance, pd, pn)
            self.fn_first_fused = _compiled("first_fused", _first_fused, pd, pn)
            self.fn_middle_fused = _compiled("middle_fused", _middle_fused, pd, pn)
            self.fn_embed_norm = _compiled("embed_norm", _embed_norm, pd, pn)
            self.fn_head_advance = _compiled("head_advance", _head_advance, pd, pn)
        else:
            self.fn_first, self.fn_middle, self.fn_last = _first, _middle, _last
            self.fn_advance = _advance
            self.fn_first_fused, self.fn_middle_fused = _first_fused, _middle_fused
            self.fn_embed_norm, self.fn_head_advance = _embed_norm, _head_advance

    # -- tables and runners ------------------------------------------------------------------
    def gemv_choice(self, batch: int) -> GemvChoice:
        """Which linear layers run the Triton matrix-vector kernel at ``batch`` rows."""
        if self.gemv_mode == "off":
            return NO_GEMV._replace(pdl=self.pdl)
        from tracekit.engines.cuda.ops import gemv as cuda_gemv

        force = {"on": cuda_gemv.TRITON, "splitk": cuda_gemv.SPLIT_K2}.get(self.gemv_mode)
        w = self.weights[0]

        tuned = self.tuned_modes(batch) if self.tune_steps else {}

        def choose(role: str, weight: torch.Tensor | None) -> int:
            if weight is None:
                return 0
            pinned = self.gemv_modes.get(role, tuned.get(role, force))
            return cuda_gemv.choose(batch, weight, pinned, self.time_with_pdl)

        return GemvChoice(
            pdl=self.pdl,
            gated=self.gated_down,
            qkv=choose("qkv", w.qkv),
            o=choose("o", w.o),
            gate_up=choose("gate_up", w.gate_up),
            down=choose("down", w.down),
            head=choose("head", self.lm_head),
        )

    def _tuned_roles(self) -> list[str]:
        w = self.weights[0]
        return [r for r in TUNED_ROLES if r not in self.gemv_modes and getattr(w, r) is not None]

    def _step_key(self, role: str, batch: int) -> str:
        from tracekit.engines.cuda.ops.gemv import CONFIG_TAG, decision_key

        weight = getattr(self.weights[0], role)
        # the kernels' tag: step tuning among another version's kernels is done again
        layers = len(self.weights)
        return decision_key(batch, weight, self.pdl, role=f"step-{role}-{layers}L-{CONFIG_TAG}")

    def tuned_modes(self, batch: int) -> dict[str, int]:
        """The kernels step tuning chose for ``batch`` rows (this process, else the decisions
        file of :func:`tracekit.engines.cuda.ops.gemv.choose`); the layers not tuned yet are
        missing (all of them before the first tuning)."""
        if batch not in self._step_modes:
            from tracekit.engines.cuda.ops.gemv import read_decisions

            self._keep_tuned(batch, read_decisions())
        return self._step_modes.get(batch, {})

    def _keep_tuned(self, batch: int, decisions: dict[str, int]) -> bool:
        """Take ``batch``'s step-tuning decisions from ``decisions``; whether all are there (a
        decisions file from a version that tuned fewer layers has only some)."""
        roles = self._tuned_roles()
        keys = {role: self._step_key(role, batch) for role in roles}
        found = {
            role: int(decisions[key])
            for role, key in keys.items()
            if decisions.get(key, -1) in range(len(MODE_NAMES)) and _mode_of(role, decisions[key])
        }
        self._step_modes[batch] = found
        return len(found) == len(roles)

    def _tune_once(self, runner: _Runner) -> None:
        """Step tuning at ``runner``'s batch size of the layers not decided already (here or on
        disk). One process per host tunes at a time; one that waited takes the decision made."""
        batch = runner.key.batch
        if len(self.tuned_modes(batch)) == len(self._tuned_roles()):
            return
        from tracekit.engines.cuda.ops.gemv import deciding, decisions_file

        started = time.perf_counter()
        keys = [self._step_key(role, batch) for role in self._tuned_roles()]
        try:
            with deciding(keys) as kept:
                # what another process decided meanwhile (all, or some layers): the step runs
                # it before anything is timed, and _tune leaves those layers as they are
                complete = self._keep_tuned(batch, kept)
                decided = runner.dims.gemv
                runner.set_gemv(self.gemv_choice(batch))
                if runner.dims.gemv != decided:
                    runner.capture()
                if complete:
                    return
                logger.warning(
                    "timing the decode step's kernels at batch %d, once for this GPU "
                    "(a minute or two; kept in %s; TRACEKIT_STEP_TUNING=0 skips it)",
                    batch,
                    decisions_file(),
                )
                self._tune(runner)
        finally:
            self.setup_parts["step_tuning"] += time.perf_counter() - started

    def _tune(self, runner: _Runner) -> None:
        """Re-decide the kernels of :data:`TUNED_ROLES` (those not decided before) for
        ``runner``'s batch size by timing whole captured decode steps, one layer at a time (each
        keeps the fastest of its correct modes before the next is tried), and keep the
        decisions on disk.

        The per-shape choice times each product alone, back to back. Inside the step a product
        follows other kernels: with programmatic dependent launch a Triton product loads its
        first weight tiles while the kernel before it finishes, cuBLAS cannot; on an H200 at
        batch 32 the ``o`` product timed alone picked cuBLAS, and four K slices made the whole
        step 5% faster (benchmarks/RESULTS.md, seventh run). Each candidate is compiled and
        captured (seconds each, more where its Triton kernel is autotuned first) and timed over
        replays of the captured step. Leaves ``runner`` with the fastest step captured."""
        from tracekit.engines.cuda.ops import gemv as cuda_gemv

        batch = runner.key.batch
        best, best_graph = runner.dims.gemv, runner.graph
        best_time = runner.time_steps()
        timings = {_modes_label(best): 1e6 * best_time}
        decided = self._step_modes.get(batch, {})
        for role in self._tuned_roles():
            if role in decided:  # kept from an earlier tuning: the step already runs it
                continue
            weight = getattr(self.weights[0], role)
            tried = {getattr(best, role)}
            for mode in ROLE_CANDIDATES.get(role, cuda_gemv.TUNED_MODES):
                if mode in tried:
                    continue
                got = cuda_gemv.choose(batch, weight, mode, self.time_with_pdl)
                if got in tried:  # not correct here, or K does not split: F.linear
                    continue
                tried.add(got)
                fields = best._asdict()
                fields[role] = got
                candidate = GemvChoice(**fields)
                runner.set_gemv(candidate)
                try:
                    runner.capture()
                except Exception as exc:  # a candidate that cannot run is not used
                    if _is_oom(exc):
                        raise
                    logger.info("step tuning: %s not used (%s)", _modes_label(candidate), exc)
                    continue
                seconds = runner.time_steps()
                timings[_modes_label(candidate)] = 1e6 * seconds
                if seconds < best_time * (1 - STEP_TUNING_MARGIN):
                    best, best_graph, best_time = candidate, runner.graph, seconds
        runner.set_gemv(best)
        runner.graph = best_graph
        runner.reset_dummy()
        self._step_modes[batch] = {r: getattr(best, r) for r in self._tuned_roles()}
        self.step_timings[batch] = timings
        cuda_gemv.save_decisions(
            {self._step_key(role, batch): mode for role, mode in self._step_modes[batch].items()}
        )
        logger.info("step tuning at batch %d: %s (%.0f us per step)", batch,
                    _modes_label(best), 1e6 * best_time)  # fmt: skip

    def block_splits_for(self, batch: int) -> BlockSplits | None:
        """K slices of the fused block products at ``batch`` rows, or ``None`` where the step
        keeps its compiled pieces: ``fused_block`` off, no Triton, weights not in half
        precision or not fused, an ``o_proj`` bias, or a product that failed its check."""
        import torch

        w = self.weights[0]
        if (
            not self.fused_block
            or self.dtype not in (torch.bfloat16, torch.float16)
            or w.qkv is None
            or w.gate_up is None
            or w.o_bias is not None
            or w.q_norm is not None
        ):
            return None
        from tracekit.engines.cuda.ops.block import choose_splits

        pdl = self.time_with_pdl
        got = [
            choose_splits(role, batch, weight, pdl)
            for role, weight in (
                ("norm", w.qkv),
                ("residual", w.o),
                ("gated", w.gate_up),
                ("residual", w.down),
            )
        ]
        if any(s is None for s in got):
            return None
        qkv, o, _, down = got
        assert qkv is not None and o is not None and down is not None
        return BlockSplits(qkv=qkv, o=o, down=down)

    def fused_attention_for(self, batch: int, length: int, gemv_qkv: int) -> bool:
        """Whether decode steps of ``batch`` rows over a cache of ``length`` slots use the
        fused attention kernel: ``on``/``auto`` on CUDA with fused q/k/v weights and no q/k
        norm, where the kernel agreed with its reference on this model's shape; ``auto`` only
        up to :data:`FUSED_ATTENTION_MAX_LEN` slots (one program per row and kv head walks the
        whole cache: long caches want a split over the cache, which it does not do)."""
        w = self.weights[0]
        if self.fused_attention == "off" or w.qkv is None or w.q_norm is not None:
            return False
        if self.fused_attention == "auto" and length > FUSED_ATTENTION_MAX_LEN:
            return False
        from tracekit.engines.cuda.ops import attention as cuda_attention
        from tracekit.engines.cuda.ops import gemv as cuda_gemv

        splits = cuda_gemv.splits_of(gemv_qkv) if gemv_qkv >= cuda_gemv.SPLIT_K2 else 1
        if splits not in self._fused_ok:
            spec = self.spec
            self._fused_ok[splits] = cuda_attention.works(
                batch=min(batch, 4),
                length=min(length, 200),
                n_heads=spec.n_heads,
                n_kv=spec.n_kv_heads,
                head_dim=spec.head_dim,
                splits=splits,
                has_bias=w.qkv_bias is not None,
                window=spec.sliding_window,
                dtype=self.dtype,
                device=self.device,
                pdl=self.pdl,
            )
        return self._fused_ok[splits]

    def attention_config_for(
        self, batch: int, length: int, prompt_len: int, gemv_qkv: int, fused: bool
    ) -> tuple[int, int, int] | None:
        """The fused attention kernel's configuration for decode steps of ``batch`` rows over
        a cache of ``length`` slots after a prompt of ``prompt_len``: timed where the steps
        are captured (:func:`tracekit.engines.cuda.ops.attention.kernel_config`, at the middle
        of the generation, both rounded up to 64 slots), the default one otherwise; ``None``
        without the kernel."""
        if not fused:
            return None
        from tracekit.engines.cuda.ops import attention as cuda_attention
        from tracekit.engines.cuda.ops import gemv as cuda_gemv

        if self.attention_config is not None:
            return self.attention_config
        if not self.use_graphs:
            return cuda_attention.DEFAULT_CONFIG
        spec = self.spec
        splits = cuda_gemv.splits_of(gemv_qkv) if gemv_qkv >= cuda_gemv.SPLIT_K2 else 1
        shape = cuda_attention.AttentionShape(
            spec.n_heads, spec.n_kv_heads, spec.head_dim, self.dims.scaling, spec.sliding_window
        )
        # timed at lengths rounded up to 64 slots: nearby shapes share one timing
        rounded = -(-length // 64) * 64
        return cuda_attention.kernel_config(
            batch=batch,
            length=rounded,
            slot=min(-(-(prompt_len + length) // 128) * 64, rounded - 1),
            splits=splits,
            shape=shape,
            dtype=self.dtype,
            device=self.device,
            pdl=self.pdl,
        )

    def _ensure_rope(self, length: int) -> None:

        if self.cos_table.shape[0] >= length:
            return
        size = max(length, 2 * self.cos_table.shape[0])
        self.cos_table, self.sin_table = rope_tables(self.rotary, size, self.dtype, self.device)
        # graphs captured earlier read the old tables: drop them
        _settle(self.device)
        self._runners.clear()

    def _runner(self, key: RunKey) -> _Runner:
        runner = self._runners.get(key)
        if runner is not None:
            self._runners.move_to_end(key)
            return runner
        while len(self._runners) >= self.max_runners:
            _settle(self.device)
            self._runners.popitem(last=False)
        before = self.setup_seconds
        started = time.perf_counter()
        runner = _Runner(self, key)
        self.setup_parts["kernel_choice"] += time.perf_counter() - started
        if self.use_graphs:
            started = time.perf_counter()
            try:
                warm, record = runner.capture()
                self.setup_parts["compile_warmup"] += warm
                self.setup_parts["graph_capture"] += record
            except Exception as exc:  # a capture failure must not lose the user's run
                self.setup_parts["graph_capture"] += time.perf_counter() - started
                if _is_oom(exc):
                    raise  # the caller halves the batch; eager decoding would not fit either
                logger.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
                runner.graph = None
                runner.reset_dummy()
        if self.tune_steps and runner.graph is not None and self._tuned_roles():
            self._tune_once(runner)
        self._runners[key] = runner
        logger.info("decode step for %s ready in %.1f s", key, self.setup_seconds - before)
        return runner

    @property
    def setup_seconds(self) -> float:
        """Time spent preparing decode steps (the sum of :attr:`setup_parts`)."""
        return sum(self.setup_parts.values())

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_p: float | Sequence[float] = 1.0,
        seeds: Sequence[int] | None = None,
    ) -> FastResult:
        """Generate up to ``max_new_tokens`` per row from left-padded ``input_ids``."""
        return self.launch(
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
        ).result()

    def launch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_p: float | Sequence[float] = 1.0,
        seeds: Sequence[int] | None = None,
    ) -> LaunchedRun:
        """:meth:`generate`'s work queued on the device; :meth:`LaunchedRun.result` waits for it.

        Returns once the prefill, every decode step and the copies of the results are queued
        (on CUDA the host runs a few checks behind the device, see :class:`_DoneCheck`). The
        results are copied out of the runner's buffers before anything queued later can touch
        them, so the next batch may be launched before this one's result is taken: the host
        then prepares the next batch and turns this one's tokens into lists while the device
        works. Host tensors (CPU ``input_ids``) keep the host from waiting for the device here;
        device tensors work too, with one blocking read of the mask."""
        import torch

        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise InputError("input_ids and attention_mask must both be [batch, seq]")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        mask_host = attention_mask.detach().to("cpu", torch.long)
        lengths = mask_host.sum(dim=1)
        if bool((lengths == 0).any()):
            raise InputError("a prompt has no tokens (attention mask all zero)")
        seq = input_ids.shape[1]
        expected = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]
        if not torch.equal(mask_host.bool(), expected):
            raise InputError(
                "prompts must be left-padded with a contiguous attention mask",
                "tokenize with padding_side='left' (tracekit's load_model does)",
            )
        batch = input_ids.shape[0]
        bucket = self.prompt_bucket
        prompt_len = ((seq + bucket - 1) // bucket) * bucket
        extra = prompt_len - seq
        # host tensors go over pinned and non-blocking: the previous batch may still run
        ids, mask = to_device(input_ids, self.device), to_device(mask_host, self.device)
        if extra:
            ids = torch.cat([ids.new_full((batch, extra), self.pad_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros((batch, extra)), mask], dim=1)

        sampling = bool(do_sample)
        temps = _per_row(temperature, batch, "temperature")
        tops = _per_row(top_p, batch, "top_p")
        use_top_p = sampling and any(p < 1.0 for p in tops)
        key = RunKey(batch, prompt_len, int(max_new_tokens), sampling, use_top_p)
        try:
            # the decoder's GPU as the current one: CUDA graph capture, the replays' streams
            # and Triton's launches use the current device, which need not be the model's
            # (one process with --device cuda:1)
            with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
                return self._launch(key, ids, mask, temps, tops, seeds)
        except Exception as exc:
            if _is_oom(exc):
                # free every cache and graph now, so a retry at a smaller batch can fit
                _settle(self.device)
                self._runners.clear()
                torch.cuda.empty_cache()
            raise

    def _launch(
        self,
        key: RunKey,
        ids: torch.Tensor,
        mask: torch.Tensor,
        temps: list[float],
        tops: list[float],
        seeds: Sequence[int] | None,
    ) -> LaunchedRun:
        import torch

        prompt_len, max_new_tokens = key.prompt_len, key.max_new_tokens
        with torch.no_grad():
            self._ensure_rope(prompt_len + max_new_tokens)
            runner = self._runner(key)
            prefill_events = _start_span(self.device)  # the prefill's share, read afterwards
            prompt_pooled = self._prefill(runner, ids, mask, temps, tops, seeds)
            _end_span(prefill_events)
            steps = 0
            check = _DoneCheck(runner.st, self.device)
            ring = runner.ring_size
            decode_events = _start_span(self.device)
            for steps in range(1, max_new_tokens + 1):
                runner.replay()
                if ring and steps % ring == 0:
                    runner.flush(ring)
                if steps % self.check_every == 0 and steps < max_new_tokens and check.done():
                    break
            if ring:
                runner.flush(steps % ring)
            _end_span(decode_events)
            run = self._collect(runner, prompt_pooled, steps, prefill_events, decode_events)
            self._last_run = run
            return run

    def _prefill(
        self,
        runner: _Runner,
        ids: torch.Tensor,
        mask: torch.Tensor,
        temps: list[float],
        tops: list[float],
        seeds: Sequence[int] | None,
    ) -> dict[str, torch.Tensor]:
        """The prompt through the model, the runner's state reset and the first token chosen;
        the prompt poolings (device tensors, static ones where the prefill is a graph)."""
        import torch

        st, batch = runner.st, ids.shape[0]
        seed_list = list(seeds) if seeds is not None else [0] * batch
        if len(seed_list) != batch:
            raise InputError(f"{len(seed_list)} seeds given for {batch} rows")
        # pinned, non-blocking: queued behind the previous batch's steps (which read them)
        st.temperature.copy_(to_device(torch.tensor(temps, dtype=torch.float32), self.device))
        st.top_p.copy_(to_device(torch.tensor(tops, dtype=torch.float32), self.device))
        st.seeds.copy_(to_device(torch.tensor(seed_list, dtype=torch.long), self.device))
        if self._prefill_as_graph(runner):
            return runner.prefill(ids, mask)
        return self._prefill_body(runner, ids, mask)

    def _prefill_as_graph(self, runner: _Runner) -> bool:
        """Whether ``runner``'s prefill is replayed as a CUDA graph: with captured steps and
        the engine's own prefill, for prompts up to :data:`PREFILL_GRAPH_TOKENS` tokens in
        all (a graph keeps its activations' memory for as long as the runner lives)."""
        key = runner.key
        return (
            runner.graph is not None
            and self.fast_prefill
            and runner.prefill_graph is not False
            and key.batch * key.prompt_len <= PREFILL_GRAPH_TOKENS
        )

    def _prefill_body(
        self, runner: _Runner, ids: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """:meth:`_prefill`'s device work: only tensor operations on device tensors (no host
        reads), so that it can be recorded as a CUDA graph."""
        import torch

        st = runner.st
        prompt_len = ids.shape[1]
        n_real = mask.sum(dim=1)
        sums: dict[int, torch.Tensor] = {}
        lasts: dict[int, torch.Tensor] = {}

        def pool(layer: int, hidden: torch.Tensor) -> None:
            # left padding: the last column is every row's last prompt token
            lasts[layer] = hidden[:, -1].float()
            if "prompt_avg" in self.poolings:
                sums[layer] = masked_sum(hidden, mask)

        # positions as HF generate builds them from the mask: 0 at each row's first real token
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # later cache slots may hold keys of an earlier batch; the mask never lets them in
        prefill = self._prefill_fast if self.fast_prefill else self._prefill_hf
        logits = prefill(runner, ids, mask, positions, pool)
        st.pad_len.copy_(prompt_len - n_real)
        st.slot.fill_(prompt_len - 1)
        st.start.fill_(prompt_len)
        st.alive.fill_(True)
        st.feed_weight.zero_()
        st.n_kept.zero_()
        st.eos_hit.zero_()
        st.out_tokens.fill_(self.pad_id)
        for buf in runner.caps.values():
            buf.zero_()
        # the first token goes through the same device bookkeeping as every decode step
        self.fn_advance(
            logits,
            st,
            self.eos_ids,
            self.pad_id,
            runner.key.max_new_tokens,
            self.include_eos,
            runner.key.do_sample,
            runner.key.use_top_p,
            runner.dims.argmax_chunk,
        )
        pooled: dict[str, torch.Tensor] = {}
        if "prompt_last" in self.poolings:
            pooled["prompt_last"] = torch.stack([lasts[x] for x in self.layers], dim=1)
        if "prompt_avg" in self.poolings:
            denom = n_real.to(torch.float32)[:, None, None]
            pooled["prompt_avg"] = torch.stack([sums[x] for x in self.layers], dim=1) / denom
        return pooled

    def _prefill_hf(
        self,
        runner: _Runner,
        ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        pool: Any,
    ) -> torch.Tensor:
        """The prompt through the HF model itself (its hooks call ``pool(layer, states)``);
        keys and values copied into the runner's cache; last-column logits (float32)."""
        taps = LayerTaps(self.handles, self.layers, pool) if self.layers else None
        if taps is not None:
            taps.__enter__()
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            if taps is not None:
                taps.__exit__(None, None, None)
        cache = output_cache(out)
        prompt_len = ids.shape[1]
        for i in range(self.spec.n_blocks):
            keys, values = _cache_layer(cache, i)
            runner.k_cache[i][:, :, :prompt_len].copy_(keys)
            runner.v_cache[i][:, :, :prompt_len].copy_(values)
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    @property
    def last_prefill_seconds(self) -> float | None:
        """Device time of the last generate call's prefill, the first token's choice included
        (CUDA events; None off CUDA)."""
        return None if self._last_run is None else self._last_run.prefill_seconds

    @property
    def last_decode_seconds(self) -> float | None:
        """Device time of the last generate call's decode steps, first to last (CUDA events;
        None off CUDA): the steps alone, without the prefill, the host's preparation of the
        batch and the copies of the results."""
        return None if self._last_run is None else self._last_run.decode_seconds

    def _prefill_fast(
        self,
        runner: _Runner,
        ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        pool: Any,
    ) -> torch.Tensor:
        """:meth:`_prefill_hf` through the engine's own block functions (compiled once, batch
        and length dynamic, as the teacher-forced forward's): left-padded rows with a boolean
        mask (:func:`~tracekit.engines.cuda.forward.prefill_mask`), per-row rotary positions,
        each block's keys and values written straight into the cache."""
        import torch
        import torch.nn.functional as F

        from tracekit.engines.cuda.forward import _block_kv, _compiled_block, prefill_mask

        spec = self.spec
        cos, sin = self.cos_table[position_ids], self.sin_table[position_ids]
        attn_mask = prefill_mask(mask)
        block = _compiled_block("block_kv") if self.compile else _block_kv
        wanted = set(self.layers)
        prompt_len = ids.shape[1]
        h = F.embedding(ids, self.embed)
        if 0 in wanted:
            pool(0, h)

        def mark_dynamic(*tensors: torch.Tensor) -> None:
            # one compilation for every batch size and prompt length
            for t in tensors if self.compile else ():
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2)

        mark_dynamic(cos, sin, attn_mask)
        for i, w in enumerate(self.weights):
            mark_dynamic(h)
            h, keys, values = block(
                h,
                w,
                cos,
                sin,
                attn_mask,
                spec.n_heads,
                spec.n_kv_heads,
                spec.head_dim,
                spec.eps,
                spec.scaling,
            )
            runner.k_cache[i][:, :, :prompt_len].copy_(keys)
            runner.v_cache[i][:, :, :prompt_len].copy_(values)
            if i + 1 in wanted:
                pool(i + 1, h)
        return _head(h[:, -1], self.final_norm, self.lm_head, spec.eps)

    def _collect(
        self,
        runner: _Runner,
        pooled: dict[str, torch.Tensor],
        steps: int,
        prefill_events: tuple[Any, Any] | None,
        decode_events: tuple[Any, Any] | None,
    ) -> LaunchedRun:
        """Queue the copies of a run's results (tokens, lengths, captures) behind its steps."""
        import torch

        st = runner.st
        device_out: dict[tuple[str, str], torch.Tensor] = {
            ("state", "n_kept"): st.n_kept,
            ("state", "tokens"): st.out_tokens[:, : runner.key.max_new_tokens],
            ("state", "eos_hit"): st.eos_hit,
        }
        for name, value in pooled.items():
            device_out[("pooled", name)] = value
        if "response_avg" in self.poolings:
            denom = st.n_kept.to(torch.float32).clamp(min=1)[:, None, None]
            sums = torch.stack([runner.caps[layer] for layer in self.layers], dim=1)
            device_out[("pooled", "response_avg")] = sums / denom
        return LaunchedRun(
            HostCopy(device_out), self.poolings, steps, prefill_events, decode_events
        )


class LaunchedRun:
    """A :meth:`FastDecoder.launch` in flight: its results are being copied to the host."""

    def __init__(
        self,
        copy: HostCopy,
        poolings: Sequence[str],
        steps: int,
        prefill_events: tuple[Any, Any] | None,
        decode_events: tuple[Any, Any] | None,
    ) -> None:
        self._copy = copy
        self._poolings = tuple(poolings)
        self._steps = steps
        self._prefill_events = prefill_events
        self._decode_events = decode_events

    @property
    def prefill_seconds(self) -> float | None:
        """Device time of this run's prefill (CUDA events; waits for it; None off CUDA)."""
        return _span_seconds(self._prefill_events)

    @property
    def decode_seconds(self) -> float | None:
        """Device time of this run's decode steps (CUDA events; waits for them)."""
        return _span_seconds(self._decode_events)

    def result(self) -> FastResult:
        """Wait for the copies and build the token lists."""
        out = self._copy.wait()
        n_kept = out[("state", "n_kept")].tolist()
        tokens_all = out[("state", "tokens")]
        tokens = [tokens_all[r, :n].tolist() for r, n in enumerate(n_kept)]
        reasons = ["eos" if hit else "length" for hit in out[("state", "eos_hit")].tolist()]
        pooled = {name: out[("pooled", name)] for name in self._poolings}
        return FastResult(tokens, reasons, pooled, self._steps)


def _start_span(device: torch.device) -> tuple[Any, Any] | None:
    """Two timing events, the first recorded now (``None`` off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    events[0].record()
    return events


def _end_span(events: tuple[Any, Any] | None) -> tuple[Any, Any] | None:
    """Record the second event of a :func:`_start_span` pair; returns the pair."""
    if events is not None:
        events[1].record()
    return events


def _span_seconds(events: tuple[Any, Any] | None) -> float | None:
    """Seconds between a recorded pair of events (waits for the second), or ``None``."""
    if events is None:
        return None
    events[1].synchronize()
    return float(events[0].elapsed_time(events[1])) / 1e3


class _DoneCheck:
    """Whether every row is done (none still emitting, none with its last response token still
    to be fed for capture), asked every ``check_every`` decode steps.

    On CUDA the answer is copied to pinned memory without blocking, and :meth:`done` returns
    the answer queued at the *previous* check: by then it has long landed, so the host never
    waits for the GPU and the GPU never waits for the host between steps. The loop stops one
    check later than a blocking check would; the extra steps change nothing (finished rows are
    frozen on the device). Elsewhere the check is a plain blocking read.
    """

    def __init__(self, st: _State, device: torch.device) -> None:
        self.st = st
        self.cuda = device.type == "cuda"
        self._pending: tuple[Any, torch.Tensor] | None = None

    def done(self) -> bool:
        import torch

        st = self.st
        busy = (st.alive | (st.feed_weight > 0)).any()
        if not self.cuda:
            return not bool(busy)
        previous = self._pending
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(busy.reshape(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, flag)
        if previous is None:
            return False
        previous[0].synchronize()
        return not bool(previous[1][0])


def _settle(device: torch.device) -> None:
    """Wait for the device before runners (graphs, caches) are dropped: a batch started
    earlier (:meth:`CudaEngine.start`) may still be replaying a graph that is dropped."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _per_row(value: float | Sequence[float], batch: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * batch
    else:
        values = [float(v) for v in value]
    if len(values) != batch:
        raise InputError(f"{len(values)} values of {name} given for {batch} rows")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise InputError(f"{name} must be finite and non-negative")
    return values


def _cache_layer(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer of an HF cache (transformers >= 4.56 and 5.x layouts)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layer = layers[index]
        return layer.keys, layer.values
    return cache.key_cache[index], cache.value_cache[index]


# --------------------------------------------------------------------------------------------
# The engine behind tracekit's interface
# --------------------------------------------------------------------------------------------
class CudaEngine:
    """:class:`~tracekit.engines.interface.GenerationEngine` on :class:`FastDecoder`.

    Registered as ``"cuda"``; ``"auto"`` picks it when the model sits on a CUDA device and
    :func:`unsupported_reason` has no objection
    (:func:`tracekit.engines.interface.resolve_engine_name`). It keeps the reference engine's
    contract (stop ids, eos excluded, pooling definitions, per-row seeds) except how a sampled
    row draws its randomness: a counter-based hash of its seed instead of a ``torch.Generator``,
    so sampled text differs from the reference engine's for the same seed (greedy is identical).
    """

    name = "cuda"

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        use_graphs: bool | None = None,
        compile: bool | None = None,
        **decoder_options: Any,
    ) -> None:
        from tracekit.engines.interface import stop_token_ids

        self.loaded = loaded
        reason = unsupported_reason(loaded.model)
        if reason is not None:
            raise ModelError(
                f"the CUDA engine cannot run {loaded.name}: {reason}",
                "use --engine hf (the reference engine runs every causal LM)",
            )
        self.stop_ids = stop_token_ids(loaded) or [-1]  # -1 never matches: run to the limit
        self.use_graphs = use_graphs
        self.compile = compile
        self.decoder_options = decoder_options  # further FastDecoder keywords (benchmarks)
        self._decoders: OrderedDict[Any, FastDecoder] = OrderedDict()
        self._retired_setup_parts = dict.fromkeys(SETUP_PARTS, 0.0)

    @property
    def setup_seconds(self) -> float:
        """One-time work so far: kernel choice, compilation and CUDA graph capture of the
        decode steps (the rest of the time is generation proper)."""
        return sum(self.setup_parts.values())

    @property
    def setup_parts(self) -> dict[str, float]:
        """:attr:`setup_seconds` by part (see :attr:`FastDecoder.setup_parts`)."""
        parts = dict(self._retired_setup_parts)
        for dec in self._decoders.values():
            for name, seconds in dec.setup_parts.items():
                parts[name] += seconds
        return parts

    def _decoder(self, capture: CaptureSpec | None) -> FastDecoder:
        key = None if capture is None else (capture.layers, tuple(capture.poolings))
        dec = self._decoders.get(key)
        if dec is None:
            if len(self._decoders) >= 2:  # each decoder holds KV caches: keep few alive
                _, retired = self._decoders.popitem(last=False)
                _settle(retired.device)
                for name, seconds in retired.setup_parts.items():
                    self._retired_setup_parts[name] += seconds
            dec = FastDecoder(
                self.loaded.model,
                layers=capture.layers if capture is not None else (),
                poolings=[str(p) for p in capture.poolings] if capture is not None else (),
                eos_token_ids=self.stop_ids,
                pad_token_id=int(self.loaded.tokenizer.pad_token_id),
                use_graphs=self.use_graphs,
                compile=self.compile,
                **self.decoder_options,
            )
            self._decoders[key] = dec
        return dec

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        capture: CaptureSpec | None = None,
        row_seeds: Sequence[int] | None = None,
        *,
        pad_to: int | None = None,
    ) -> GenerationOutput:
        return self.start(prompts, params, capture, row_seeds, pad_to=pad_to).result()

    def start(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        capture: CaptureSpec | None = None,
        row_seeds: Sequence[int] | None = None,
        *,
        pad_to: int | None = None,
    ) -> CudaPending | Ready:
        """:meth:`generate` without waiting for the device (see
        :func:`tracekit.engines.interface.start_generation`): the batch is launched, and
        :meth:`CudaPending.result` detokenizes it once its results are copied. Starting the
        next batch first is safe: a batch's results are copied out of the decoder's buffers
        before the next batch's prefill is queued."""
        import torch

        from tracekit.engines.hf import check_capture_layers
        from tracekit.engines.interface import GenerationOutput, Ready, encode_prompts, left_pad

        tokenizer = self.loaded.tokenizer
        rows = encode_prompts(tokenizer, prompts)
        batch = len(rows)
        if batch == 0:
            return Ready(GenerationOutput([], [], [], []))
        if capture is not None:
            check_capture_layers(self.loaded, capture)
        dec = self._decoder(capture)
        seeds: list[int] = [0] * batch
        if not params.greedy:
            if row_seeds is not None and len(row_seeds) != batch:
                raise ValueError("row_seeds must have one seed per prompt")
            base = params.seed if params.seed is not None else int(torch.seed() % (2**31))
            seeds = list(row_seeds) if row_seeds is not None else [base + i for i in range(batch)]
        # a short batch (a run's last one, a resumed remainder) runs at the caller's batch size,
        # so it reuses the decode step prepared for it instead of compiling, timing kernels and
        # capturing a new one; the extra rows copy row 0 (prompt and seed), so they finish with
        # it and never keep the loop running, and they are dropped below
        fill = max(0, pad_to - batch) if dec.pad_batches and pad_to is not None else 0
        # host tensors: the decoder checks them and copies them over without waiting
        cpu = torch.device("cpu")
        ids, mask = left_pad(rows + rows[:1] * fill, int(tokenizer.pad_token_id), cpu)
        seeds += seeds[:1] * fill
        try:
            launched = dec.launch(
                ids,
                mask,
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                temperature=params.temperature,
                top_p=params.top_p,
                seeds=seeds,
            )
        except Exception as exc:
            if _is_oom(exc):  # the caller retries smaller: drop every decoder's caches too
                _settle(dec.device)
                for other in self._decoders.values():
                    other._runners.clear()
                torch.cuda.empty_cache()
            raise
        return CudaPending(launched, tokenizer, rows, capture)


class CudaPending:
    """A batch started by :meth:`CudaEngine.start`; :meth:`result` builds its output once."""

    def __init__(
        self,
        launched: LaunchedRun,
        tokenizer: Any,
        rows: Sequence[Sequence[int]],
        capture: CaptureSpec | None,
    ) -> None:
        self.launched = launched
        """The decoder's run (device times of its prefill and steps)."""
        self._output: GenerationOutput | None = None
        self._tokenizer = tokenizer
        self._rows = rows
        self._capture = capture

    def result(self) -> GenerationOutput:
        from tracekit.engines.interface import GenerationOutput
        from tracekit.engines.pooling import Pooling

        if self._output is None:
            res = self.launched.result()
            batch = len(self._rows)
            tokens = res.tokens[:batch]  # rows beyond the batch were padding
            capture = self._capture
            self._output = GenerationOutput(
                response_ids=tokens,
                texts=self._tokenizer.batch_decode(tokens, skip_special_tokens=True),
                finish_reasons=res.finish_reasons[:batch],  # type: ignore[arg-type]
                prompt_lengths=[len(r) for r in self._rows],
                pooled={Pooling(name): value[:batch] for name, value in res.pooled.items()},
                layers=capture.layers if capture is not None else (),
            )
        return self._output
