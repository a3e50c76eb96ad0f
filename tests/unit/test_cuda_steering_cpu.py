"""Steering in the CUDA engine, run eagerly on CPU against the reference engine's steering.

The step functions the CUDA graph replays (the steering add sits where a layer's state is
captured) and both prefills (the HF model with the steering hook, the engine's own blocks with
the runner's delta buffer) run here without graphs or compilation on tiny random-init Llama and
Gemma models (float32): steered tokens equal the hf engine's, captures are close, coefficient 0
is the unsteered run bit for bit, batch 8 equals batch 1, and a sweep's coefficients reuse one
decode step with the value copied in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_stand_in import use_attention_reference
from tolerance import assert_close_to_scale
from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams, check_steering
from tracekit.engines.pooling import Pooling
from tracekit.engines.steering import Steering
from tracekit.errors import ConfigError
from tracekit.models.random_gemma import random_gemma
from tracekit.models.random_model import random_llama

POSITIONS = ("response", "prompt", "all")
ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
GREEDY = GenerationParams(max_new_tokens=8, temperature=0)
PROMPTS = [
    [5, 17, 99, 3, 250],
    [7, 8],
    [300, 301, 302, 303, 304, 305, 306, 307, 308],
    [42, 43, 44],
]
LAYER = 2
CAPTURE = CaptureSpec(layers=(0, LAYER - 1, LAYER, 4), poolings=ALL_POOLINGS)


@pytest.fixture(scope="module")
def llama():
    return random_llama("tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="module", params=("gemma2-tiny", "gemma3-tiny"))
def gemma(request):
    return random_gemma(request.param, device="cpu", dtype="float32", seed=0)


def _direction(loaded, norm: float = 4.0) -> np.ndarray:
    """A fixed direction of a norm that changes this model's greedy tokens at coefficient 1."""
    v = np.random.default_rng(3).standard_normal(loaded.hidden_size).astype("float32")
    return v * np.float32(norm / np.linalg.norm(v))


def _eager(loaded, fast_prefill: bool) -> CudaEngine:
    return CudaEngine(loaded, use_graphs=False, compile=False, fast_prefill=fast_prefill)


def _assert_same(out, ref) -> None:
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    for pooling in ref.pooled:
        assert_close_to_scale(out.pooled[pooling], ref.pooled[pooling])


@pytest.mark.parametrize("fast_prefill", [False, True], ids=["hf-prefill", "own-prefill"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_steered_equals_reference_llama(llama, positions, fast_prefill):
    steering = Steering(LAYER, _direction(llama), 1.0, positions)
    ref = HFEngine(llama).generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
    plain = HFEngine(llama).generate(PROMPTS, GREEDY, CAPTURE)
    assert ref.response_ids != plain.response_ids, "the steering changed nothing: proves nothing"
    out = _eager(llama, fast_prefill).generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
    _assert_same(out, ref)


@pytest.mark.parametrize("layer", [0, 4])
def test_steered_first_and_last_layer_equal_reference(llama, layer):
    """Layer 0 (the embedding output) and the last layer (the last block's output, read by
    the final norm) are steered where the reference steers them."""
    steering = Steering(layer, _direction(llama, 6.0), 1.0, "all")
    ref = HFEngine(llama).generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
    assert ref.response_ids != HFEngine(llama).generate(PROMPTS, GREEDY).response_ids
    for fast_prefill in (False, True):
        out = _eager(llama, fast_prefill).generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
        _assert_same(out, ref)


@pytest.mark.parametrize("attention", ["torch", "kernel"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_steered_equals_reference_gemma(gemma, positions, attention, monkeypatch):
    """Gemma-2/3 (the engine's own prefill: HF's cache keeps only a window there), with the
    attention in torch and in the fused kernel's step (its torch reference standing in for
    Triton, which is not here)."""
    steering = Steering(LAYER, _direction(gemma, 8.0), 1.0, positions)
    ref = HFEngine(gemma).generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
    assert ref.response_ids != HFEngine(gemma).generate(PROMPTS, GREEDY).response_ids
    fused: dict[str, object] = {}
    if attention == "kernel":
        use_attention_reference(monkeypatch)
        fused = {"fuse_weights": True, "fused_attention": "on"}
    engine = CudaEngine(gemma, use_graphs=False, compile=False, **fused)
    out = engine.generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
    (decoder,) = engine._decoders.values()
    assert all(r.dims.fused_attention == (attention == "kernel") for r in decoder._runners.values())
    _assert_same(out, ref)


@pytest.mark.parametrize("fast_prefill", [False, True], ids=["hf-prefill", "own-prefill"])
def test_coefficient_zero_is_the_unsteered_run(llama, fast_prefill):
    """Bit for bit: a zero coefficient (or a zero vector) runs the unsteered step itself."""
    engine = _eager(llama, fast_prefill)
    plain = engine.generate(PROMPTS, GREEDY, CAPTURE)
    zeros = [Steering(LAYER, _direction(llama), 0.0, positions) for positions in POSITIONS]
    zeros.append(Steering(LAYER, np.zeros(llama.hidden_size, dtype="float32"), 2.0))
    for steering in zeros:
        zero = engine.generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
        assert zero.response_ids == plain.response_ids
        for pooling, tensor in plain.pooled.items():
            assert torch.equal(zero.pooled[pooling], tensor), (steering.positions, pooling)
    (decoder,) = engine._decoders.values()
    assert [key.steer for key in decoder._runners] == [None]


def test_steered_batch_of_8_equals_batch_of_1(llama):
    prompts = [*PROMPTS, [9, 10, 11, 12], [500], [77, 78, 79, 80, 81, 82], [100, 2, 3]]
    steering = Steering(LAYER, _direction(llama), 1.0, "response")
    engine = _eager(llama, True)
    batched = engine.generate(prompts, GREEDY, CAPTURE, steering=steering)
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], GREEDY, CAPTURE, steering=steering)
        assert alone.response_ids[0] == batched.response_ids[i], i
        for pooling, tensor in alone.pooled.items():
            assert_close_to_scale(batched.pooled[pooling][i], tensor[0])


def test_sweep_reuses_one_decode_step_with_each_value(llama):
    """Coefficients at one layer and positions share the runner (its buffers, its captured
    step where graphs are on); each batch copies its own value in, so the sweep's every set is
    the reference's, in any order. Another positions mode is another runner."""
    engine = _eager(llama, True)
    ref = HFEngine(llama)
    vector = _direction(llama)
    outs = []
    for coef in (1.0, -1.0, 1.0):
        steering = Steering(LAYER, vector, coef, "response")
        out = engine.generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
        _assert_same(out, ref.generate(PROMPTS, GREEDY, CAPTURE, steering=steering))
        outs.append(out.response_ids)
    assert outs[0] != outs[1] and outs[0] == outs[2]
    (decoder,) = engine._decoders.values()
    assert [key.steer for key in decoder._runners] == [(LAYER, "response")]
    engine.generate(PROMPTS, GREEDY, CAPTURE, steering=Steering(LAYER, vector, 1.0, "all"))
    assert [key.steer for key in decoder._runners] == [(LAYER, "response"), (LAYER, "all")]


def test_steering_is_offered_and_checked(llama):
    engine = _eager(llama, False)
    check_steering(engine)  # the generate job's check passes: --engine cuda steers
    wrong = Steering(LAYER, np.zeros(llama.hidden_size + 1, dtype="float32"), 1.0)
    with pytest.raises(ConfigError, match="hidden size"):
        engine.generate(PROMPTS, GREEDY, steering=wrong)
    with pytest.raises(ConfigError, match="out of range"):
        engine.generate(PROMPTS, GREEDY, steering=Steering(5, _direction(llama), 1.0))


@pytest.mark.slow
def test_steered_step_functions_trace_whole_under_dynamo(llama, traced_compile):
    """The compiled path without a GPU: the steered step's pieces (a capture point that adds
    the steering buffer) go through dynamo whole (``fullgraph=True``) and AOT autograd
    (``traced_compile``); tokens and captures stay the reference's."""
    steering = Steering(LAYER, _direction(llama), 1.0, "all")
    ref = HFEngine(llama).generate(PROMPTS, GREEDY, CAPTURE, steering=steering)
    engine = CudaEngine(llama, use_graphs=False, compile=True, fast_prefill=True)
    _assert_same(engine.generate(PROMPTS, GREEDY, CAPTURE, steering=steering), ref)
