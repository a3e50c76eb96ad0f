"""The per-architecture seam of the fast path: which model families it runs, and how.

An architecture module (:mod:`.llama`; a new family sits beside it, e.g. ``gemma.py``) builds
one :class:`Architecture`: the checks that say whether a model of its family can run, its
shape (:class:`DecoderSpec`), its weights' layout, and its block math as the step functions
the decoder compiles and the runner calls (the signatures are :mod:`.llama`'s). The decoder,
the runner and the engine never name a family: they ask :func:`architecture_for`.

To add a family: write its module with an ``ARCHITECTURE`` and list the module in
:data:`MODULES`; set ``fused_attention`` (with ``attention_shape``) and ``fused_block`` only
where the Triton kernels of :mod:`.ops` compute exactly its attention (Llama's and Gemma's) and
block (Llama's).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracekit.errors import ModelError

if TYPE_CHECKING:
    import torch

    from tracekit.models.layers import LayerHandles

MODULES = ("tracekit.engines.cuda.llama", "tracekit.engines.cuda.gemma")
"""The architecture modules, each with an ``ARCHITECTURE``; the first that claims a model's
``model_type`` runs it."""


@dataclass(frozen=True)
class DecoderSpec:
    """Shape constants of a decoder, read once from the model's config."""

    n_blocks: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    scaling: float
    vocab: int
    sliding_window: int | None
    extra: tuple[Any, ...] = ()
    """Constants of the architecture's own (hashable; e.g. soft-caps), handed to its step
    functions in :attr:`tracekit.engines.cuda.plan.Dims.extra`."""

    @property
    def block_constants(self) -> tuple[Any, ...]:
        """The constants :attr:`Architecture.block_kv` takes after ``(h, w, cos, sin, mask)``:
        ``(n_heads, n_kv_heads, head_dim, eps, scaling, extra)``."""
        return (self.n_heads, self.n_kv_heads, self.head_dim, self.eps, self.scaling, self.extra)


@dataclass(frozen=True)
class ModelTensors:
    """The tensors around the blocks: embedding, final norm, output head, rotary module."""

    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    rotary: Any


@dataclass(frozen=True)
class Architecture:
    """One model family's part of the fast path (see the module docstring).

    The step functions: ``first``/``middle``/``last`` (a step as compiled pieces around
    attention over the cache), ``first_fused``/``middle_fused`` (pieces around the fused
    attention kernel), ``embed_norm``/``head_advance`` (around the fused block kernels),
    ``block_kv`` (a block over whole sequences, returning its keys and values: the engine's
    own prefill and the teacher-forced forward), ``embed`` (the embedding of token ids) and
    ``head`` (final norm and logits). ``embed``, ``block_kv`` and ``head`` also take the
    spec's :attr:`DecoderSpec.extra` (last).
    """

    name: str
    model_types: tuple[str, ...]
    unsupported_reason: Callable[[Any], str | None]
    """Why this family's fast path cannot run the model (its text config checked), or None."""
    decoder_spec: Callable[[Any], DecoderSpec]
    collect_weights: Callable[[Any, LayerHandles, bool], list[Any]]
    """``(model, handles, fuse)``: per-block weights, in the layout its step functions read."""
    model_tensors: Callable[[Any], ModelTensors]
    rope_tables: Callable[[Any, int, Any, Any], tuple[torch.Tensor, torch.Tensor]]
    """``(rotary, length, dtype, device)``: the cos/sin tables its step functions index."""
    first: Callable[..., Any]
    middle: Callable[..., Any]
    last: Callable[..., Any]
    first_fused: Callable[..., Any]
    middle_fused: Callable[..., Any]
    embed_norm: Callable[..., Any]
    head_advance: Callable[..., Any]
    block_kv: Callable[..., Any]
    head: Callable[..., Any]
    embed: Callable[..., Any]
    attention_shape: Callable[[Any, Any], Any] | None = None
    """``(dims, layer weights)``: the :class:`~.ops.attention.AttentionShape` of the block's
    attention, the fused kernel's constants (``None`` without ``fused_attention``)."""
    fused_attention: bool = False
    """Whether :mod:`.ops.attention` computes this family's attention (rotary, GQA, window,
    and where ``attention_shape`` sets them Gemma's soft-cap and q/k norms)."""
    fused_block: bool = False
    """Whether :mod:`.ops.block`'s fused products compute this family's blocks."""
    swiglu: bool = False
    """Whether its MLP gates with SiLU (``silu(gate) * up``), which the ``swiglu`` product of
    :mod:`.ops.gemv` computes in its epilogue (step tuning tries it then)."""
    hf_prefill: bool = True
    """Whether the HF model's own prefill can fill the engine's cache (``fast_prefill=False``):
    not where HF's cache keeps only a sliding window of some layers' keys."""


def text_config(model: Any) -> Any:
    """The model's text config (the language model's, for multimodal configs)."""
    cfg = model.config
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def model_types() -> tuple[str, ...]:
    """Every ``model_type`` the fast path runs."""
    return tuple(t for module in MODULES for t in _load(module).model_types)


def _load(module: str) -> Architecture:
    arch: Architecture = importlib.import_module(module).ARCHITECTURE
    return arch


def _claim(model: Any) -> Architecture | None:
    model_type = getattr(text_config(model), "model_type", None)
    for module in MODULES:
        arch = _load(module)
        if model_type in arch.model_types:
            return arch
    return None


def unsupported_reason(model: Any) -> str | None:
    """Why the fast decode path cannot run ``model``; ``None`` when it can."""
    arch = _claim(model)
    if arch is None:
        model_type = getattr(text_config(model), "model_type", None)
        return f"model type '{model_type}' (fast path supports {', '.join(model_types())})"
    if hasattr(model, "hf_device_map") and len(set(model.hf_device_map.values())) > 1:
        return "a model split over several devices (device_map)"
    return arch.unsupported_reason(model)


def architecture_for(model: Any) -> Architecture:
    """The architecture that runs ``model``; :class:`ModelError` when none can."""
    reason = unsupported_reason(model)
    arch = _claim(model)
    if reason is not None or arch is None:
        raise ModelError(
            f"the CUDA engine cannot run this model: {reason}",
            "use --engine hf (the reference engine runs every causal LM)",
        )
    return arch
