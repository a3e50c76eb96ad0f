"""Phi-3 on the CUDA engine's code, run eagerly on CPU against the reference engine.

Phi-3 is the Llama block with q/k/v and gate/up stored fused (``qkv_proj``, ``gate_up_proj``);
the fast path reads those matrices as its fused weights (or row slices of them). A tiny
random-init Phi-3 (float32), with the weights as stored and as slices.
"""

from __future__ import annotations

import pytest

from tolerance import assert_close_to_scale
from tracekit.engines.cuda.arch import unsupported_reason
from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.cuda.forward import FastForward
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.models.random_model import random_llama

POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
PROMPTS = [[5, 17, 99, 3, 250], [7, 8], [300, 301, 302, 303, 304, 305, 306, 307, 308]]


@pytest.fixture(scope="module")
def phi3():
    return random_llama("tiny", model_type="phi3")


@pytest.mark.parametrize("fuse", [False, True])
def test_greedy_tokens_and_captures_equal_reference(phi3, fuse):
    assert unsupported_reason(phi3.model) is None
    params = GenerationParams(max_new_tokens=10, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 4), poolings=POOLINGS)
    ref = HFEngine(phi3).generate(PROMPTS, params, capture)
    engine = CudaEngine(phi3, use_graphs=False, compile=False, fuse_weights=fuse)
    out = engine.generate(PROMPTS, params, capture)
    assert out.response_ids == ref.response_ids
    for pooling in POOLINGS:
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])


def test_teacher_forced_fast_forward_equals_reference(phi3):
    responses = [[9, 10, 11], [1, 2], [4]]
    capture = CaptureSpec(layers=(0, 2, 4), poolings=POOLINGS)
    ref = pooled_forward(phi3, PROMPTS, responses, capture, engine="hf")
    fast = FastForward(phi3.model).pooled(PROMPTS, responses, capture.layers, POOLINGS)
    for pooling in POOLINGS:
        assert_close_to_scale(fast[pooling], ref[pooling])


def test_partial_rotary_is_refused():
    loaded = random_llama("tiny", model_type="phi3")
    loaded.model.config.rope_parameters["partial_rotary_factor"] = 0.75
    reason = unsupported_reason(loaded.model)
    assert reason is not None and "partial rotary" in reason
