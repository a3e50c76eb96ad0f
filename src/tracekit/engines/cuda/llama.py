"""The Llama family on the fast path (Llama, Mistral, Qwen2, Qwen3): block math, weights, rope.

A functional re-implementation of the Llama decoder block, with the same arithmetic as the HF
modules (norms in float32, scaled in the model's dtype), in the pieces the decode step compiles:
one compiled region per block boundary (``first``, ``middle``, ``last``), so the residual add,
the capture and the next norm fuse into one kernel; the pieces around the fused attention
kernel (``first_fused``, ``middle_fused``) and around the fused block kernels (``embed_norm``,
``head_advance``); and a block over whole sequences (``block_kv``) for the engine's own prefill
and the teacher-forced forward. Each linear layer runs the way
:func:`tracekit.engines.cuda.ops.gemv.choose` timed fastest for the batch size.

Residual-stream steering (adding ``coef * v`` where a tracekit layer is read) happens where
:func:`~tracekit.engines.cuda.state.capture` is called, which returns the steered state: the
state of tracekit layer ``i + 1`` is ``h`` at the end of block ``i`` (:func:`out_mlp`), layer
0's the embedding (:func:`embed_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from tracekit.engines.cuda.arch import Architecture, DecoderSpec, ModelTensors, text_config
from tracekit.engines.cuda.ops.gemv import SPLIT_K2, linear, splits_of, swiglu
from tracekit.engines.cuda.plan import NO_GEMV, AttentionShape, Dims, GemvChoice
from tracekit.engines.cuda.sampling import advance
from tracekit.engines.cuda.state import Caches, Sink, StepState, capture

if TYPE_CHECKING:
    import torch

    from tracekit.models.layers import LayerHandles

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
"""Phi-3 is Llama's block with q/k/v and gate/up stored fused (``qkv_proj``, ``gate_up_proj``)."""
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


# --------------------------------------------------------------------------------------------
# What the family supports, and its shape
# --------------------------------------------------------------------------------------------
def _rope_type(cfg: Any) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict):
        value = params.get("rope_type", params.get("type", "default"))
        return str(value or "default")
    return "default"


def unsupported_reason(model: Any) -> str | None:
    """Why this module cannot run ``model`` (a Llama-family model type); ``None`` when it can."""
    cfg = text_config(model)
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}' (fast path supports silu)"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    if _rope_type(cfg) in _LENGTH_DEPENDENT_ROPE:
        return f"rope type '{_rope_type(cfg)}' (its frequencies depend on the sequence length)"
    params = getattr(cfg, "rope_parameters", None) or {}
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if float(partial or 1.0) != 1.0:
        return f"partial rotary embeddings (factor {partial})"
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "embed_tokens"):
        return f"{type(model).__name__} has no embed_tokens/rotary_emb where Llama keeps them"
    return None


def decoder_spec(model: Any) -> DecoderSpec:
    """The decoder's shape, from the model's config."""
    cfg = text_config(model)
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
    # Gemma's (tracekit.engines.cuda.gemma): norms after attention and MLP, the layer's kind
    post_attn: torch.Tensor | None = None
    """Norm of the attention branch, before its residual add."""
    post_mlp: torch.Tensor | None = None
    """Norm of the MLP branch, before its residual add."""
    local: bool = False
    """A sliding-window layer among global ones (its mask is the local one)."""
    rope: int = 0
    """Index of its rotary table where the model has several."""


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
    if hasattr(blocks[0].self_attn, "qkv_proj"):  # Phi-3: q/k/v and gate/up stored fused
        return [_stored_fused(block, text_config(model), fuse) for block in blocks]
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


def _stored_fused(block: Any, cfg: Any, fuse: bool) -> LayerWeights:
    """The weights of a block that stores q/k/v and gate/up fused (Phi-3), in the same layout:
    the stored matrices as they are, or (``fuse`` off) row slices of them."""
    attn, mlp = block.self_attn, block.mlp
    qkv, gate_up = attn.qkv_proj.weight.detach(), mlp.gate_up_proj.weight.detach()
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
    gate, up = gate_up.chunk(2)  # gate first, as Phi3MLP chunks it
    return LayerWeights(
        ln1=block.input_layernorm.weight.detach(),
        qkv=qkv if fuse else None,
        qkv_bias=None,
        q=None if fuse else q,
        k=None if fuse else k,
        v=None if fuse else v,
        q_bias=None,
        k_bias=None,
        v_bias=None,
        q_norm=None,
        k_norm=None,
        o=attn.o_proj.weight.detach(),
        o_bias=_detached(attn.o_proj.bias),
        ln2=block.post_attention_layernorm.weight.detach(),
        gate_up=gate_up if fuse else None,
        gate=None if fuse else gate,
        up=None if fuse else up,
        down=mlp.down_proj.weight.detach(),
    )


def model_tensors(model: Any) -> ModelTensors:
    """Embedding, final norm and output head (detached) and the rotary module of ``model``."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"))
    return ModelTensors(
        embed=base.embed_tokens.weight.detach(),
        final_norm=base.norm.weight.detach(),
        lm_head=model.get_output_embeddings().weight.detach(),
        rotary=base.rotary_emb,
    )


# --------------------------------------------------------------------------------------------
# Block math: pure functions over device tensors (compiled on CUDA)
# --------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as LlamaRMSNorm: normalise in float32, scale in the model dtype.
    import torch

    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
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


def attn_in(
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
    x = rms_norm(h, w.ln1, eps)
    q, k, v = project_qkv(x, w, n_heads * head_dim, n_kv * head_dim, gemv_qkv, pdl)
    q = q.reshape(batch, n_heads, head_dim)
    k = k.reshape(batch, n_kv, head_dim)
    v = v.reshape(batch, n_kv, head_dim)
    if w.q_norm is not None and w.k_norm is not None:
        q = rms_norm(q, w.q_norm, eps)
        k = rms_norm(k, w.k_norm, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    if write is not None:
        # inside the compiled region the write fuses into the rotary kernel
        k_cache, v_cache, slot = write
        k_cache.index_copy_(2, slot, k[:, :, None, :])
        v_cache.index_copy_(2, slot, v[:, :, None, :])
    return q, k, v


def attn_out_mlp(
    h: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_bias: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    eps: float,
    scaling: float,
    gemv: GemvChoice | None = None,
) -> torch.Tensor:
    """Attention over the static cache (GQA without repeating K/V), o_proj, MLP, residuals.
    Two matmuls and a softmax: ``scaled_dot_product_attention`` was slower here (docs/engine.md).

    ``cap`` steers and receives the block's output state (:func:`capture`): the steering and
    capture hook of the fast path, inside the captured step.
    """
    import torch

    batch, n_kv, _, head_dim = k_cache.shape
    group = q.shape[1] // n_kv
    qg = q.reshape(batch, n_kv, group, head_dim)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scaling
    scores = scores + attn_bias[:, None, None, :]
    probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
    attn = torch.matmul(probs, v_cache)
    attn = attn.reshape(batch, n_kv * group * head_dim)
    return out_mlp(h, attn, w, cap, eps, gemv)


def out_mlp(
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
    x = rms_norm(h, w.ln2, eps)
    if w.gate_up is not None:  # SWIGLU: the gating inside the gate/up kernel
        act = swiglu(x, w.gate_up, gemv.gate_up, gemv.pdl)
    else:
        assert w.gate is not None and w.up is not None
        act = F.silu(F.linear(x, w.gate)) * F.linear(x, w.up)
    h = h + linear(act, w.down, gemv.down, gemv.pdl)
    return capture(cap, h)


def qkv_product(
    h: torch.Tensor, w: LayerWeights, eps: float, gemv_qkv: int, pdl: bool = False
) -> torch.Tensor:
    """Norm and fused q/k/v product for the fused attention kernel, bias not added: the
    product ``[B, N]``, or for a split-K mode its float32 partials ``[splits, B, N]`` (the
    kernel sums them, so no kernel here does)."""
    return qkv_parts(rms_norm(h, w.ln1, eps), w, gemv_qkv, pdl)


def qkv_parts(x: torch.Tensor, w: LayerWeights, gemv_qkv: int, pdl: bool) -> torch.Tensor:
    """The fused q/k/v product of the normed ``x`` as the fused attention kernel reads it:
    ``[B, N]``, or for a split-K mode the float32 partials ``[splits, B, N]``."""
    import torch

    assert w.qkv is not None
    if gemv_qkv >= SPLIT_K2:
        parts: torch.Tensor = torch.ops.tracekit.gemv_splitk(x, w.qkv, splits_of(gemv_qkv), pdl)
        return parts
    return linear(x, w.qkv, gemv_qkv, pdl)


def attention_shape(d: Dims, w: LayerWeights) -> AttentionShape:
    """The fused attention kernel's constants for block ``w``: the same for every block."""
    return AttentionShape(d.n_heads, d.n_kv, d.head_dim, d.scaling, d.window)


def prelude(
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

    h, cos, sin = embed_step(cur_tok, embed, slot, pad_len, cos_table, sin_table, cap0)
    valid = (slot_range[None, :] >= pad_len[:, None]) & (slot_range[None, :] <= slot)
    if window is not None:
        valid = valid & (slot_range[None, :] > slot - window)
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=h.device)
    bias = bias.masked_fill(~valid, float("-inf"))
    return h, cos, sin, bias


def embed_step(
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

    h = capture(cap0, F.embedding(cur_tok, embed))
    return h, *rope_rows(slot, pad_len, cos_table, sin_table)


def rope_rows(
    slot: torch.Tensor, pad_len: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's rows of the rotary tables: each row's position is its index among its real
    tokens (the cache slot less its left padding)."""
    pos = (slot - pad_len).clamp(min=0)
    return cos_table[pos], sin_table[pos]


def rope_tables(
    rotary: Any, length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[length, head_dim]`` for positions ``0 .. length - 1``, from the model's
    own rotary module (same arithmetic as its forward, so positions match exactly)."""
    import torch

    positions = torch.arange(length, device=device)[None, :]
    cos, sin = rotary(torch.empty(1, dtype=dtype, device=device), positions)
    return cos[0].contiguous(), sin[0].contiguous()


def head(
    h: torch.Tensor,
    norm: torch.Tensor,
    lm_head: torch.Tensor,
    eps: float,
    gemv: int = 0,
    pdl: bool = False,
    extra: tuple[Any, ...] = (),
) -> torch.Tensor:
    return linear(rms_norm(h, norm, eps), lm_head, gemv, pdl).float()


def embed(ids: torch.Tensor, table: torch.Tensor, extra: tuple[Any, ...] = ()) -> torch.Tensor:
    """The embedding of ``ids`` (layer 0)."""
    import torch.nn.functional as F

    return F.embedding(ids, table)


def first(
    cur_tok: torch.Tensor,
    embed: torch.Tensor,
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
    """Embedding, rotary rows, mask, and block 0 up to its attention input."""
    h, cos, sin, bias = prelude(
        cur_tok, embed, slot, pad_len, slot_range, cos_table, sin_table, cap0, d.window
    )
    write = (cache0.k, cache0.v, slot) if d.write_kv else None
    q, k, v = attn_in(
        h, w0, cos, sin, d.n_heads, d.n_kv, d.head_dim, d.eps, write, d.gemv.qkv, d.gemv.pdl
    )
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
    """Rest of block i and block i+1 up to its attention input: one compiled region per
    boundary, so the residual add, the capture and the next norm fuse into one kernel."""
    h = attn_out_mlp(h, q, cache.k, cache.v, bias, w, cap, d.eps, d.scaling, d.gemv)
    write = (cache_next.k, cache_next.v, slot) if d.write_kv else None
    q, k, v = attn_in(
        h, w_next, cos, sin, d.n_heads, d.n_kv, d.head_dim, d.eps, write, d.gemv.qkv, d.gemv.pdl
    )
    return h, q, k, v


def last(
    h: torch.Tensor,
    q: torch.Tensor,
    cache: Caches | None,
    bias: torch.Tensor | None,
    w: LayerWeights,
    cap: Sink | None,
    final_norm: torch.Tensor,
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
    """Rest of the last block, final norm, logits, sampling and the per-row bookkeeping.

    With ``d.fused_attention``, ``q`` is the block's attention output (``cache``/``bias``
    unused): the fused kernel ran before this piece."""
    if d.fused_attention:
        h = out_mlp(h, q, w, cap, d.eps, d.gemv)
    else:
        assert cache is not None and bias is not None
        h = attn_out_mlp(h, q, cache.k, cache.v, bias, w, cap, d.eps, d.scaling, d.gemv)
    head_advance(
        h, final_norm, lm_head, st, eos_ids, pad_id, max_new, include_eos, do_sample, use_top_p, d
    )


def first_fused(
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
    h, cos, sin = embed_step(cur_tok, embed, slot, pad_len, cos_table, sin_table, cap0)
    return h, qkv_product(h, w0, d.eps, d.gemv.qkv, d.gemv.pdl), cos, sin


def middle_fused(
    h: torch.Tensor,
    attn: torch.Tensor,
    w: LayerWeights,
    cap: Sink | None,
    w_next: LayerWeights,
    d: Dims,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-attention step: rest of block i after its attention, block i+1's q/k/v product."""
    h = out_mlp(h, attn, w, cap, d.eps, d.gemv)
    return h, qkv_product(h, w_next, d.eps, d.gemv.qkv, d.gemv.pdl)


def embed_norm(
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

    h, cos, sin = embed_step(cur_tok, embed, slot, pad_len, cos_table, sin_table, cap0)
    return h, row_sums(h), cos, sin


def head_advance(
    h: torch.Tensor,
    final_norm: torch.Tensor,
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
    """Final norm, logits, sampling and the per-row bookkeeping (the end of every step)."""
    logits = head(h, final_norm, lm_head, d.eps, d.gemv.head, d.gemv.pdl)
    advance(logits, st, eos_ids, pad_id, max_new, include_eos, do_sample, use_top_p, d.argmax_chunk)


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
    extra: tuple[Any, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder block over ``h`` ``[batch, seq, hidden]`` (the HF Llama block's arithmetic,
    q/k/v and gate/up products fused where the weights are), also returning its keys and
    values ``[batch, n_kv, seq, head_dim]`` (rotated, as a KV cache holds them).
    ``cos``/``sin``: ``[seq, head_dim]`` shared by the rows, or ``[batch, seq, head_dim]`` per
    row; ``mask``: ``None`` (causal) or a boolean attention mask broadcastable to
    ``[batch, 1, seq, seq]``."""
    import torch.nn.functional as F

    batch, seq, _ = h.shape
    x = rms_norm(h, w.ln1, eps)
    q, k, v = project_qkv(x, w, n_heads * head_dim, n_kv * head_dim)
    q = q.reshape(batch, seq, n_heads, head_dim)
    k = k.reshape(batch, seq, n_kv, head_dim)
    v = v.reshape(batch, seq, n_kv, head_dim)
    if w.q_norm is not None and w.k_norm is not None:
        q = rms_norm(q, w.q_norm, eps)
        k = rms_norm(k, w.k_norm, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    c, s = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos[None, None], sin[None, None])
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    attn = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=n_kv != n_heads,
    )
    attn = attn.transpose(1, 2).reshape(batch, seq, n_heads * head_dim)
    out = F.linear(attn, w.o, w.o_bias)
    h = h + out
    x = rms_norm(h, w.ln2, eps)
    if w.gate_up is not None:
        gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
    else:
        assert w.gate is not None and w.up is not None
        gate, up = F.linear(x, w.gate), F.linear(x, w.up)
    return h + F.linear(F.silu(gate) * up, w.down), k, v


ARCHITECTURE = Architecture(
    name="llama",
    model_types=MODEL_TYPES,
    unsupported_reason=unsupported_reason,
    decoder_spec=decoder_spec,
    collect_weights=lambda model, handles, fuse: collect_weights(model, handles, fuse=fuse),
    model_tensors=model_tensors,
    rope_tables=rope_tables,
    first=first,
    middle=middle,
    last=last,
    first_fused=first_fused,
    middle_fused=middle_fused,
    embed_norm=embed_norm,
    head_advance=head_advance,
    block_kv=block_kv,
    head=head,
    embed=embed,
    attention_shape=attention_shape,
    fused_attention=True,
    fused_block=True,
    swiglu=True,
)
