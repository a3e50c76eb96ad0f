"""Gemma-2 and Gemma-3 on the CUDA engine's code, run eagerly on CPU against the reference.

Tiny random-init models (float32, no download; ``tracekit.models.random_gemma``) with a
sliding window of 6 positions, so that prompts of up to 11 tokens and 12 new tokens reach past
it on the local layers; soft-caps low enough to bend the values; random norm weights so that
Gemma's ``1 + w`` matters; an untied output head.
"""

from __future__ import annotations

import pytest
import torch

from attention_stand_in import use_attention_reference
from tolerance import assert_close_to_scale
from tracekit.engines.cuda import gemma
from tracekit.engines.cuda.arch import unsupported_reason
from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.cuda.forward import FastForward
from tracekit.engines.cuda.runner import prefill_mask
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams, left_pad
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.models.random_gemma import random_gemma

SHAPES = ("gemma2-tiny", "gemma3-tiny")
ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
PROMPTS = [
    [5, 17, 99, 3, 250, 7, 8, 9, 10, 11, 12],
    [7, 8],
    [300, 301, 302, 303, 304, 305, 306, 307, 308],
]


@pytest.fixture(scope="module", params=SHAPES)
def tiny(request):
    return random_gemma(request.param, device="cpu", dtype="float32", seed=0)


def test_gemma_is_supported(tiny):
    assert unsupported_reason(tiny.model) is None


def test_greedy_tokens_and_captures_equal_reference(tiny):
    """Token for token the reference engine's, every pooling within float32 tolerance, on
    layers that include local and global blocks and the embedding (layer 0, scaled)."""
    params = GenerationParams(max_new_tokens=12, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 2, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(tiny).generate(PROMPTS, params, capture)
    out = CudaEngine(tiny, use_graphs=False, compile=False).generate(PROMPTS, params, capture)
    assert out.response_ids == ref.response_ids
    assert len(set(map(tuple, out.response_ids))) == len(PROMPTS)  # not a degenerate echo
    assert out.finish_reasons == ref.finish_reasons
    for pooling in ALL_POOLINGS:
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])


def test_prefill_states_and_logits_equal_hf(tiny):
    """The engine's prefill block (left padding, per-layer windows and rotary tables) gives
    HF's hidden states, and its head HF's soft-capped logits (greedy tokens cannot see a
    final soft-cap: it keeps the order of the logits)."""
    model = tiny.model
    spec = gemma.decoder_spec(model)
    tensors = gemma.model_tensors(model)
    weights = gemma.collect_weights(model, tiny.handles, False)
    ids, mask = left_pad(PROMPTS, 0, torch.device("cpu"))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    dims = (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.eps, spec.scaling, spec.extra)
    with torch.no_grad():
        want = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
        )
        cos, sin = gemma.rope_tables(tensors.rotary, 32, torch.float32, ids.device)
        h = gemma.embed(ids, tensors.embed, spec.extra)
        real = mask.bool()
        for i, w in enumerate(weights):
            assert_close_to_scale(h[real], want.hidden_states[i][real])
            h, _, _ = gemma.block_kv(
                h, w, cos[positions], sin[positions], prefill_mask(mask), *dims
            )
        logits = gemma.head(
            h[:, -1], tensors.final_norm, tensors.lm_head, spec.eps, extra=spec.extra
        )
    assert_close_to_scale(logits, want.logits[:, -1])
    cap = spec.extra.final_softcap
    assert cap is not None and float(logits.abs().max()) < cap


def test_windows_and_soft_caps_are_read_from_the_config(tiny):
    spec = gemma.decoder_spec(tiny.model)
    extra = spec.extra
    assert extra.window == 6 and spec.sliding_window is None  # per layer, not model-wide
    assert extra.embed_scale == pytest.approx(128**0.5)
    kinds = gemma.rope_kinds(gemma.model_tensors(tiny.model).rotary)
    if tiny.model.config.model_type == "gemma2":
        assert extra.attn_softcap == 3.0 and kinds == ("",)
        assert spec.scaling == pytest.approx(24**-0.5)  # query_pre_attn_scalar, not head_dim
    else:
        assert extra.attn_softcap is None
        assert kinds == (gemma.GLOBAL, gemma.LOCAL)


def test_teacher_forced_fast_forward_equals_reference(tiny):
    """The fast teacher-forced forward (``extract activations --engine cuda``; right padding,
    Gemma's blocks) pools what the reference path pools."""
    responses = [[9, 10, 11, 12, 13, 14, 15], [1, 2, 3], []]
    capture = CaptureSpec(layers=(0, 1, 3, 4), poolings=ALL_POOLINGS)
    ref = pooled_forward(tiny, PROMPTS, responses, capture, engine="hf")
    fast = FastForward(tiny.model).pooled(PROMPTS, responses, capture.layers, ALL_POOLINGS)
    for pooling in ALL_POOLINGS:
        assert_close_to_scale(fast[pooling], ref[pooling])


@pytest.mark.slow
def test_step_functions_trace_whole_under_dynamo(traced_compile):
    """The compiled path without a GPU: every Gemma step function and the sequence block go
    through dynamo whole (``fullgraph=True``: no graph break from the per-layer constants,
    the soft-caps or the windows) and through AOT autograd, the backend swapped for torch's
    ``aot_eager`` (no inductor, so no GPU); tokens and captures stay the reference's."""
    from torch._dynamo.utils import counters

    loaded = random_gemma("gemma2-tiny")
    params = GenerationParams(max_new_tokens=10, temperature=0)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(loaded).generate(PROMPTS, params, capture)
    engine = CudaEngine(loaded, use_graphs=False, compile=True, fast_prefill=True)
    torch._dynamo.reset()
    counters.clear()
    out = engine.generate(PROMPTS, params, capture)
    # first, middle (local->global, global->local), last, advance, the prefill's block
    assert counters["stats"]["unique_graphs"] >= 6, dict(counters["stats"])
    assert out.response_ids == ref.response_ids
    for pooling in ALL_POOLINGS:
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])
    torch._dynamo.reset()


def test_fused_attention_step_equals_reference(tiny, monkeypatch):
    """The decode step built around the fused attention kernel (Gemma's pieces: scaled
    embedding, per-layer windows and soft-cap, Gemma-3's q/k norms and its two rotary tables
    picked per layer) gives the reference engine's tokens and captures. Triton is not here, so
    the kernel's torch reference (:func:`ops.attention.reference`, against which the kernel is
    checked on a GPU before every use) stands in for it."""
    use_attention_reference(monkeypatch)
    params = GenerationParams(max_new_tokens=12, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 2, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(tiny).generate(PROMPTS, params, capture)
    engine = CudaEngine(
        tiny, use_graphs=False, compile=False, fuse_weights=True, fused_attention="on"
    )
    out = engine.generate(PROMPTS, params, capture)
    runners = engine._decoder(capture)._runners.values()
    assert runners and all(r.dims.fused_attention for r in runners)
    assert out.response_ids == ref.response_ids
    for pooling in ALL_POOLINGS:
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])
