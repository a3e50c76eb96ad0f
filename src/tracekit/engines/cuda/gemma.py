"""Gemma-2 and Gemma-3 text decoders on the CUDA engine: block math, weights, rotary tables.

:mod:`.llama`'s block with what Gemma changes, each with the arithmetic of transformers'
``modeling_gemma2`` / ``modeling_gemma3``:

- **scaled embeddings**: the embedding times ``sqrt(hidden)`` rounded to the model's dtype
  (55.4256 becomes 55.5 in bfloat16, as in HF);
- **(1 + w) RMSNorm**: normalise and scale in float32, round once (Llama rounds before the
  scale); ``1 + w`` is added once, in float32, when the weights are collected;
- **four norms per block**: before and after attention, before and after the MLP (the norms
  after attention and MLP apply to the branch, before its residual add);
- **GELU-tanh gating** (``gelu(gate, approximate="tanh") * up``);
- **query pre-attention scaling** (``query_pre_attn_scalar ** -0.5``, not ``head_dim``'s);
- **attention logit soft-capping** (Gemma-2: ``tanh(scores / cap) * cap`` before the mask)
  and **final logit soft-capping** (Gemma-2; a Gemma-3 config may set it too), in the model's
  dtype as HF computes them;
- **local and global layers**: ``layer_types`` alternates sliding-window and full attention
  (Gemma-2 every other layer, Gemma-3 five local to one global). Every layer keeps all its keys
  in the engine's static cache; a local layer's mask admits its last ``sliding_window``
  positions only, so no length limit applies;
- **Gemma-3's q/k norms** ((1 + w) RMSNorm over each head) and **two rotary tables**: local
  layers use the local base (10k), global ones the global base with its scaling (1M, linear x8
  for the 4B-27B checkpoints), both computed by the model's own rotary module.

The step functions take :mod:`.llama`'s arguments. Gemma's constants travel in
:attr:`~tracekit.engines.cuda.arch.DecoderSpec.extra` (:class:`GemmaExtra`); each layer's kind
(local or global) and rotary table are constants of its weights (``local``, ``rope``), so one
compiled function serves every layer of a kind. Rotary tables are ``[positions, tables,
head_dim]``, indexed by position like Llama's.

A decode step's attention runs in the fused Triton kernel (:mod:`.ops.attention`: q/k norms,
rotary embedding, KV write, soft-capped scores, the layer's window; :func:`attention_shape`
gives it each layer's constants) where it passed its check on this model's shape, else as
two products and a float32 softmax inside the compiled step (:func:`_attend`); whole sequences
(prefill, teacher-forced) run SDPA, or the two products where scores are soft-capped. The fused
block kernels are not used: they gate with SiLU and have no norms after the branches.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from tracekit.engines.cuda.arch import Architecture, DecoderSpec, ModelTensors, text_config
from tracekit.engines.cuda.llama import (
    LayerWeights,
    project_qkv,
    qkv_parts,
    rope_rows,
    rotate_half,
)
from tracekit.engines.cuda.llama import collect_weights as llama_weights
from tracekit.engines.cuda.ops.gemv import linear
from tracekit.engines.cuda.plan import AttentionShape
from tracekit.engines.cuda.sampling import advance
from tracekit.engines.cuda.state import capture
from tracekit.errors import ModelError

if TYPE_CHECKING:
    import torch

    from tracekit.engines.cuda.plan import Dims
    from tracekit.engines.cuda.state import Caches, Sink, StepState
    from tracekit.models.layers import LayerHandles

MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")
"""Config ``model_type`` values this module runs (``gemma3``: the text stack of the
multimodal checkpoints, e.g. gemma-3-12b)."""

GELU_TANH = ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_tanh")
LOCAL, GLOBAL = "sliding_attention", "full_attention"


class GemmaExtra(NamedTuple):
    """Gemma's constants of the step functions (:attr:`DecoderSpec.extra`)."""

    window: int | None
    """The local layers' window: positions a token sees, itself included."""
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float
    """``sqrt(hidden)`` rounded to the model's dtype, as a Python float (exact)."""


def text_model(model: Any) -> Any:
    """The module holding ``embed_tokens``, ``norm`` and ``rotary_emb``: ``model.model`` of a
    ``Gemma2ForCausalLM``/``Gemma3ForCausalLM``, ``model.model.language_model`` of a
    ``Gemma3ForConditionalGeneration``."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    inner = getattr(base, "language_model", None)
    return inner if inner is not None and hasattr(inner, "embed_tokens") else base


def unsupported_reason(model: Any) -> str | None:
    """Why this module cannot run a Gemma model; ``None`` when it can."""
    cfg = text_config(model)
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act not in GELU_TANH:
        return f"activation '{act}' (the Gemma fast path runs gelu_pytorch_tanh)"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (an encoder-style Gemma)"
    if getattr(cfg, "attention_bias", False):
        return "attention biases"
    types = set(getattr(cfg, "layer_types", None) or ())
    if not types <= {LOCAL, GLOBAL}:
        return f"layer types {sorted(types - {LOCAL, GLOBAL})}"
    base = text_model(model)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "rotary_emb", "norm")):
        return f"{type(model).__name__} has no embed_tokens/rotary_emb/norm where Gemma keeps them"
    return None


def decoder_spec(model: Any) -> DecoderSpec:
    """The decoder's shape and :class:`GemmaExtra`; no model-wide window (each local layer
    applies its own)."""
    import torch

    cfg = text_config(model)
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    scalar = getattr(cfg, "query_pre_attn_scalar", None) or head_dim
    dtype = next(model.parameters()).dtype
    scale = getattr(text_model(model).embed_tokens, "embed_scale", None)
    if scale is None:  # transformers before the scaled embedding module: the same value
        scale = torch.tensor(cfg.hidden_size**0.5)
    window = getattr(cfg, "sliding_window", None)
    extra = GemmaExtra(
        window=int(window) if window and LOCAL in (cfg.layer_types or ()) else None,
        attn_softcap=_cap(getattr(cfg, "attn_logit_softcapping", None)),
        final_softcap=_cap(getattr(cfg, "final_logit_softcapping", None)),
        embed_scale=float(torch.as_tensor(scale).to(dtype)),
    )
    return DecoderSpec(
        n_blocks=int(cfg.num_hidden_layers),
        hidden=int(cfg.hidden_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        eps=float(cfg.rms_norm_eps),
        scaling=float(scalar) ** -0.5,
        vocab=int(cfg.vocab_size),
        sliding_window=None,
        extra=extra,
    )


def _cap(value: Any) -> float | None:
    return float(value) if value else None


def _extra(d: Dims) -> GemmaExtra:
    """The step constants' Gemma part (:attr:`DecoderSpec.extra`, handed on in ``Dims``)."""
    return cast(GemmaExtra, d.extra)


# --------------------------------------------------------------------------------------------
# Weights and tables
# --------------------------------------------------------------------------------------------
def one_plus(weight: Any) -> torch.Tensor:
    """``1 + w`` in float32, the factor a Gemma RMSNorm scales by (the value HF computes)."""
    w: torch.Tensor = weight.detach().float()
    return 1.0 + w


def rope_kinds(rotary: Any) -> tuple[str, ...]:
    """The layer kinds with a rotary table of their own, in table order: Gemma-3's rotary
    module computes one per layer type (global first); Gemma-2's one for all (``("",)``)."""
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return ("",)
    kinds = set(getattr(rotary, "layer_types", (GLOBAL, LOCAL)))
    return tuple(k for k in (GLOBAL, LOCAL) if k in kinds)


def collect_weights(model: Any, handles: LayerHandles, fuse: bool) -> list[LayerWeights]:
    """Per-block weights in :class:`~tracekit.engines.cuda.llama.LayerWeights` (q/k/v and
    gate/up fused as Llama's where ``fuse``): norms as ``1 + w``, ``ln2`` the norm before the
    MLP, the norms after attention and MLP, each layer's kind and rotary table."""
    cfg = text_config(model)
    types = list(getattr(cfg, "layer_types", None) or [GLOBAL] * handles.n_blocks)
    kinds = rope_kinds(text_model(model).rotary_emb)
    blocks: list[Any] = list(handles.blocks)
    layers = []
    for block, w, kind in zip(blocks, llama_weights(model, handles, fuse=fuse), types, strict=True):
        attn = block.self_attn
        layers.append(
            w._replace(
                ln1=one_plus(block.input_layernorm.weight),
                ln2=one_plus(block.pre_feedforward_layernorm.weight),
                q_norm=None if w.q_norm is None else one_plus(attn.q_norm.weight),
                k_norm=None if w.k_norm is None else one_plus(attn.k_norm.weight),
                post_attn=one_plus(block.post_attention_layernorm.weight),
                post_mlp=one_plus(block.post_feedforward_layernorm.weight),
                local=kind == LOCAL,
                rope=kinds.index(kind) if kind in kinds else 0,
            )
        )
    return layers


def model_tensors(model: Any) -> ModelTensors:
    """Embedding (unscaled: :func:`embed` scales), final norm as ``1 + w``, output head and
    the rotary module."""
    base = text_model(model)
    return ModelTensors(
        embed=base.embed_tokens.weight.detach(),
        final_norm=one_plus(base.norm.weight),
        lm_head=model.get_output_embeddings().weight.detach(),
        rotary=base.rotary_emb,
    )


def rope_tables(
    rotary: Any, length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[length, tables, head_dim]`` for positions ``0 .. length - 1``, from
    the model's own rotary module (:func:`rope_kinds`)."""
    import torch

    positions = torch.arange(length, device=device)[None, :]
    x = torch.empty(1, dtype=dtype, device=device)
    pairs = [rotary(x, positions, k) if k else rotary(x, positions) for k in rope_kinds(rotary)]
    cos = torch.stack([c[0] for c, _ in pairs], dim=1)
    sin = torch.stack([s[0] for _, s in pairs], dim=1)
    return cos.contiguous(), sin.contiguous()


# --------------------------------------------------------------------------------------------
# Block math
# --------------------------------------------------------------------------------------------
def norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with ``scale = 1 + w`` (float32): normalise and scale in float32, one
    rounding to the input's dtype."""
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * scale).to(x.dtype)


def embed(ids: torch.Tensor, table: torch.Tensor, extra: GemmaExtra) -> torch.Tensor:
    """Scaled embedding: ``table[ids] * sqrt(hidden)`` (layer 0)."""
    import torch.nn.functional as F

    return F.embedding(ids, table) * extra.embed_scale


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    import torch

    return x if cap is None else torch.tanh(x / cap) * cap


def head(
    h: torch.Tensor,
    final: torch.Tensor,
    lm_head: torch.Tensor,
    eps: float,
    gemv: int = 0,
    pdl: bool = False,
    extra: Any = None,
) -> torch.Tensor:
    """Final norm, logits and their soft-cap (in the model's dtype, as HF), as float32."""
    logits = linear(norm(h, final, eps), lm_head, gemv, pdl)
    return softcap(logits, None if extra is None else extra.final_softcap).float()


def _mlp(x: torch.Tensor, w: LayerWeights, gemv: Any = None) -> torch.Tensor:
    """``down(gelu_tanh(gate(x)) * up(x))``; the gate/up product fused where the weights are."""
    import torch.nn.functional as F

    mode_gu, mode_down, pdl = (0, 0, False) if gemv is None else (gemv.gate_up, gemv.down, gemv.pdl)
    if w.gate_up is not None:
        gate, up = linear(x, w.gate_up, mode_gu, pdl).chunk(2, dim=-1)
    else:
        assert w.gate is not None and w.up is not None
        gate, up = F.linear(x, w.gate), F.linear(x, w.up)
    return linear(F.gelu(gate, approximate="tanh") * up, w.down, mode_down, pdl)


def _branch_out(
    h: torch.Tensor, attn: torch.Tensor, w: LayerWeights, eps: float, gemv: Any = None
) -> torch.Tensor:
    """The rest of a block after attention: o_proj, its norm and residual, the MLP between its
    two norms and its residual."""
    assert w.post_attn is not None and w.post_mlp is not None
    mode_o, pdl = (0, False) if gemv is None else (gemv.o, gemv.pdl)
    out = linear(attn, w.o, mode_o, pdl)
    if w.o_bias is not None:
        out = out + w.o_bias
    h = h + norm(out, w.post_attn, eps)
    return h + norm(_mlp(norm(h, w.ln2, eps), w, gemv), w.post_mlp, eps)


def _qkv(
    h: torch.Tensor,
    w: LayerWeights,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    eps: float,
    gemv_qkv: int = 0,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, q/k/v products and (Gemma-3) the per-head q/k norms: ``[..., heads, head_dim]``."""
    x = norm(h, w.ln1, eps)
    q, k, v = project_qkv(x, w, n_heads * head_dim, n_kv * head_dim, gemv_qkv, pdl)
    lead = h.shape[:-1]
    q = q.reshape(*lead, n_heads, head_dim)
    k = k.reshape(*lead, n_kv, head_dim)
    v = v.reshape(*lead, n_kv, head_dim)
    if w.q_norm is not None and w.k_norm is not None:
        q, k = norm(q, w.q_norm, eps), norm(k, w.k_norm, eps)
    return q, k, v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def block_kv(
    h: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    eps: float,
    scaling: float,
    extra: GemmaExtra,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Gemma block over ``h`` ``[batch, seq, hidden]``, also returning its keys and values
    ``[batch, n_kv, seq, head_dim]`` (rotated, as the cache holds them). ``cos``/``sin``:
    ``[seq, tables, head_dim]`` shared by the rows or ``[batch, seq, tables, head_dim]`` per
    row; ``mask``: ``None`` (causal) or a boolean mask broadcastable to ``[batch, 1, seq,
    seq]``. A local layer also masks what lies past its window."""
    import torch
    import torch.nn.functional as F

    batch, seq, _ = h.shape
    q, k, v = _qkv(h, w, n_heads, n_kv, head_dim, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c, s = cos[..., w.rope, :], sin[..., w.rope, :]
    c, s = (c[:, None], s[:, None]) if c.dim() == 3 else (c[None, None], s[None, None])
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    if w.local and extra.window is not None:
        pos = torch.arange(seq, device=h.device)
        near = (pos[None, :] > pos[:, None] - extra.window) & (pos[None, :] <= pos[:, None])
        mask = near if mask is None else mask & near
    if extra.attn_softcap is None:
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=n_kv != n_heads,
        )
    else:  # soft-capped scores: no fused kernel takes them
        if mask is None:
            mask = torch.ones(seq, seq, dtype=torch.bool, device=h.device).tril()
        group = n_heads // n_kv
        kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, kr.transpose(-1, -2)).float() * scaling
        scores = softcap(scores, extra.attn_softcap).masked_fill(~mask, float("-inf"))
        attn = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), vr)
    attn = attn.transpose(1, 2).reshape(batch, seq, n_heads * head_dim)
    return _branch_out(h, attn, w, eps), k, v


# --------------------------------------------------------------------------------------------
# Decode step pieces (the arguments of .llama's)
# --------------------------------------------------------------------------------------------
def _attn_in(
    h: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    d: Dims,
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of one token per row ``[B, heads, head_dim]``, rotated by the layer's table
    (``cos``/``sin`` ``[B, tables, head_dim]``); k and v stored at the step's slot where
    ``write`` = ``(k_cache, v_cache, slot)``."""
    q, k, v = _qkv(h, w, d.n_heads, d.n_kv, d.head_dim, d.eps, d.gemv.qkv, d.gemv.pdl)
    c, s = cos[:, w.rope, None, :], sin[:, w.rope, None, :]
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    if write is not None:
        k_cache, v_cache, slot = write
        k_cache.index_copy_(2, slot, k[:, :, None, :])
        v_cache.index_copy_(2, slot, v[:, :, None, :])
    return q, k, v


def _attend(
    q: torch.Tensor, cache: Caches, bias: torch.Tensor, w: LayerWeights, d: Dims
) -> torch.Tensor:
    """Attention of one query per row over the cache (GQA without repeating K/V), the scores
    soft-capped before the layer's mask (``bias`` ``[2, B, slots]``: global, local):
    ``[B, heads * head_dim]``."""
    import torch

    k_cache, v_cache = cache
    batch, n_kv, _, head_dim = k_cache.shape
    qg = q.reshape(batch, n_kv, q.shape[1] // n_kv, head_dim)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * d.scaling
    scores = softcap(scores, _extra(d).attn_softcap) + bias[1 if w.local else 0, :, None, None, :]
    probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
    return torch.matmul(probs, v_cache).reshape(batch, -1)


def first(
    cur_tok: torch.Tensor,
    table: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    slot_range: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
    w0: LayerWeights,
    cache0: Caches,
    d: Dims,
) -> tuple[torch.Tensor, ...]:
    """Scaled embedding (captured as layer 0), this step's rotary rows ``[B, tables, D]``, the
    additive masks ``[2, B, slots]`` (global, local) and block 0 up to its attention input."""
    import torch

    h = capture(cap0, embed(cur_tok, table, _extra(d)))
    cos, sin = rope_rows(slot, pad_len, cos_table, sin_table)
    valid = (slot_range[None, :] >= pad_len[:, None]) & (slot_range[None, :] <= slot)
    window = _extra(d).window
    near = valid if window is None else valid & (slot_range[None, :] > slot - window)
    bias = torch.zeros((2, *valid.shape), dtype=torch.float32, device=h.device)
    bias = bias.masked_fill(~torch.stack([valid, near]), float("-inf"))
    write = (cache0.k, cache0.v, slot) if d.write_kv else None
    q, k, v = _attn_in(h, w0, cos, sin, d, write)
    return h, q, k, v, cos, sin, bias


def middle(
    h: torch.Tensor,
    q: torch.Tensor,
    cache: Caches,
    bias: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    w_next: LayerWeights,
    cache_next: Caches,
    slot: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rest of block i and block i+1 up to its attention input (one compiled region)."""
    h = _branch_out(h, _attend(q, cache, bias, w, d), w, d.eps, d.gemv)
    h = capture(cap, h)
    write = (cache_next.k, cache_next.v, slot) if d.write_kv else None
    q, k, v = _attn_in(h, w_next, cos, sin, d, write)
    return h, q, k, v


def last(
    h: torch.Tensor,
    q: torch.Tensor,
    cache: Caches | None,
    bias: torch.Tensor | None,
    w: LayerWeights,
    cap: Sink | None,
    final: torch.Tensor,
    lm_head: torch.Tensor,
    st: StepState,
    eos_ids: torch.Tensor,
    pad_id: int,
    max_new: int,
    include_eos: bool,
    do_sample: bool,
    use_top_p: bool,
    d: Dims,
) -> None:
    """Rest of the last block, final norm, soft-capped logits, sampling and bookkeeping.

    With ``d.fused_attention``, ``q`` is the block's attention output (``cache``/``bias``
    unused): the fused kernel ran before this piece."""
    if not d.fused_attention:
        assert cache is not None and bias is not None
        q = _attend(q, cache, bias, w, d)
    h = _branch_out(h, q, w, d.eps, d.gemv)
    h = capture(cap, h)
    logits = head(h, final, lm_head, d.eps, d.gemv.head, d.gemv.pdl, _extra(d))
    advance(logits, st, eos_ids, pad_id, max_new, include_eos, do_sample, use_top_p, d.argmax_chunk)


# --------------------------------------------------------------------------------------------
# Pieces around the fused attention kernel (:mod:`.ops.attention`)
# --------------------------------------------------------------------------------------------
def attention_shape(d: Dims, w: LayerWeights) -> AttentionShape:
    """The fused attention kernel's constants for block ``w``: Gemma's scaling and soft-cap,
    the window on local layers only, the q/k norms where the block has them (Gemma-3)."""
    extra = _extra(d)
    return AttentionShape(
        d.n_heads,
        d.n_kv,
        d.head_dim,
        d.scaling,
        extra.window if w.local else None,
        extra.attn_softcap,
        None if w.q_norm is None else d.eps,
    )


def _qkv_product(h: torch.Tensor, w: LayerWeights, d: Dims) -> torch.Tensor:
    """Norm and fused q/k/v product for the fused attention kernel (which applies the q/k
    norms and the rotary embedding)."""
    return qkv_parts(norm(h, w.ln1, d.eps), w, d.gemv.qkv, d.gemv.pdl)


def first_fused(
    cur_tok: torch.Tensor,
    table: torch.Tensor,
    slot: torch.Tensor,
    pad_len: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    cap0: Sink | None,
    w0: LayerWeights,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused-attention step: scaled embedding (captured as layer 0), this step's rotary rows
    as ``[tables, B, head_dim]`` (one contiguous ``[B, head_dim]`` per table, as the kernel
    reads them), block 0's q/k/v product."""
    h = capture(cap0, embed(cur_tok, table, _extra(d)))
    cos, sin = rope_rows(slot, pad_len, cos_table, sin_table)
    cos, sin = cos.transpose(0, 1).contiguous(), sin.transpose(0, 1).contiguous()
    return h, _qkv_product(h, w0, d), cos, sin


def middle_fused(
    h: torch.Tensor,
    attn: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    w_next: LayerWeights,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-attention step: rest of block i after its attention, block i+1's q/k/v product."""
    h = capture(cap, _branch_out(h, attn, w, d.eps, d.gemv))
    return h, _qkv_product(h, w_next, d)


def _no_fused_kernels(*args: Any) -> Any:
    """The fused-block step pieces: Gemma runs none (:attr:`Architecture.fused_block` is off:
    the block kernels gate with SiLU and have no norms after the branches), so the decoder
    never calls these."""
    raise ModelError("the fused block kernels do not compute Gemma's blocks")


ARCHITECTURE = Architecture(
    name="gemma",
    model_types=MODEL_TYPES,
    unsupported_reason=unsupported_reason,
    decoder_spec=decoder_spec,
    collect_weights=collect_weights,
    model_tensors=model_tensors,
    rope_tables=rope_tables,
    first=first,
    middle=middle,
    last=last,
    first_fused=first_fused,
    middle_fused=middle_fused,
    embed_norm=_no_fused_kernels,
    head_advance=_no_fused_kernels,
    block_kv=block_kv,
    head=head,
    embed=embed,
    attention_shape=attention_shape,
    fused_attention=True,
    hf_prefill=False,  # HF's cache keeps only the window of a local layer's keys
)
