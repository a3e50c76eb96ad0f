"""Steering in the CUDA engine on a GPU: captured graphs and compiled steps against the hf engine.

Random-init tiny Llama (nothing downloaded). float32 with TF32 off: steered greedy tokens equal
the reference engine's steered tokens, captures within 1e-3 (relative, by norm), for every
positions mode, with the decode step and the prefill replayed as CUDA graphs; a sweep's
coefficients replay one captured step (also when started back to back); coefficient 0 is the
unsteered run bit for bit (float32 and bfloat16). bfloat16 against the reference: the prompt
poolings, and the first token (the prefill's) where the reference's choice is clear of bf16
near-ties (later tokens may part at them, as the other bf16 GPU tests allow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.exactness import relative_error
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import (
    CaptureSpec,
    GenerationParams,
    GenerationRequest,
    resolve_engine_name,
)
from tracekit.engines.pooling import Pooling
from tracekit.engines.steering import Steering
from tracekit.models.random_model import random_llama

pytestmark = pytest.mark.gpu

ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
LAYER = 2
CAPTURE = CaptureSpec(layers=(0, LAYER, 4), poolings=ALL_POOLINGS)
PARAMS = GenerationParams(max_new_tokens=24, temperature=0)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=gen).tolist()
    return [torch.randint(2, 512, (k,), generator=gen).tolist() for k in lengths]


def _direction(loaded, norm: float) -> np.ndarray:
    v = np.random.default_rng(3).standard_normal(loaded.hidden_size).astype("float32")
    return v * np.float32(norm / np.linalg.norm(v))


@pytest.fixture(scope="module")
def fp32_model():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return random_llama("tiny", device="cuda", dtype="float32", seed=0)


def _assert_reference(out, ref) -> None:
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    for pooling in ALL_POOLINGS:
        assert relative_error(out.pooled[pooling], ref.pooled[pooling]) < 1e-3, pooling


def test_steered_graphs_equal_reference_for_every_positions_mode(fp32_model):
    assert resolve_engine_name("auto", fp32_model, steering=True) == "cuda"
    prompts = _prompts(8, seed=1)
    vector = _direction(fp32_model, 4.0)
    reference = HFEngine(fp32_model)
    plain = reference.generate(prompts, PARAMS, CAPTURE)
    engine = CudaEngine(fp32_model)
    for positions in ("response", "prompt", "all"):
        steering = Steering(LAYER, vector, 1.0, positions)
        ref = reference.generate(prompts, PARAMS, CAPTURE, steering=steering)
        assert ref.response_ids != plain.response_ids, positions  # else this proves nothing
        out = engine.generate(prompts, PARAMS, CAPTURE, steering=steering)
        runners = engine._decoder(CAPTURE)._runners
        runner = next(r for key, r in runners.items() if key.steer == (LAYER, positions))
        assert runner.graph is not None  # the decode step replayed, not eager
        assert isinstance(runner.prefill_graph, torch.cuda.CUDAGraph)
        _assert_reference(out, ref)


def test_sweep_replays_one_captured_step_with_each_coefficient(fp32_model):
    prompts = _prompts(8, seed=2)
    vector = _direction(fp32_model, 4.0)
    reference = HFEngine(fp32_model)
    engine = CudaEngine(fp32_model)
    graphs, outs = [], []
    for coef in (1.0, -1.0, 0.5):
        steering = Steering(LAYER, vector, coef, "response")
        out = engine.generate(prompts, PARAMS, CAPTURE, steering=steering)
        _assert_reference(out, reference.generate(prompts, PARAMS, CAPTURE, steering=steering))
        (runner,) = engine._decoder(CAPTURE)._runners.values()
        graphs.append(runner.graph)
        outs.append(out.response_ids)
    assert graphs[0] is not None and all(g is graphs[0] for g in graphs)
    assert outs[0] != outs[1]
    # batches started back to back: each value is copied in behind the previous batch's steps
    pending = [
        engine.start(
            GenerationRequest(prompts, PARAMS, CAPTURE, steering=Steering(LAYER, vector, coef))
        )
        for coef in (1.0, -1.0, 0.5)
    ]
    assert [one.result().response_ids for one in pending] == outs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_coefficient_zero_is_the_unsteered_run(fp32_model, dtype):
    loaded = fp32_model if dtype == "float32" else random_llama("tiny", device="cuda", dtype=dtype)
    prompts = _prompts(8, seed=3)
    engine = CudaEngine(loaded)
    plain = engine.generate(prompts, PARAMS, CAPTURE)
    for positions in ("response", "all"):
        steering = Steering(LAYER, _direction(loaded, 4.0), 0.0, positions)
        zero = engine.generate(prompts, PARAMS, CAPTURE, steering=steering)
        assert zero.response_ids == plain.response_ids, positions
        for pooling in ALL_POOLINGS:
            assert torch.equal(zero.pooled[pooling], plain.pooled[pooling]), (positions, pooling)


def _clear_first_tokens(loaded, prompts, steering: Steering) -> torch.Tensor:
    """Rows whose first token the reference picks by a margin that bf16 rounding cannot
    cross: its steered logits' top two at least 2% of their range apart (random-init bf16
    models have exact ties)."""
    from tracekit.engines.interface import left_pad, position_ids_from_mask
    from tracekit.engines.steering import SteeringHook

    ids, mask = left_pad(prompts, 0, loaded.device)
    with torch.no_grad(), SteeringHook(loaded.handles, steering):  # its prefill positions
        logits = (
            loaded.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
            )
            .logits[:, -1]
            .float()
        )
    top = logits.topk(2, dim=-1).values
    spread = logits.max(dim=-1).values - logits.min(dim=-1).values
    return (top[:, 0] - top[:, 1] >= 0.02 * spread).cpu()


def test_bf16_steered_first_token_and_prompt_poolings_equal_reference():
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=4)
    prompts = _prompts(8, seed=4)
    steering = Steering(LAYER, _direction(loaded, 4.0), 1.0, "all")
    ref = HFEngine(loaded).generate(prompts, PARAMS, CAPTURE, steering=steering)
    plain = HFEngine(loaded).generate(prompts, PARAMS, CAPTURE)
    moved = relative_error(ref.pooled[Pooling.prompt_last], plain.pooled[Pooling.prompt_last])
    assert moved > 0.1, "the steering barely moved the prompt states: this proves nothing"
    out = CudaEngine(loaded).generate(prompts, PARAMS, CAPTURE, steering=steering)
    for pooling in (Pooling.prompt_last, Pooling.prompt_avg):
        assert relative_error(out.pooled[pooling], ref.pooled[pooling]) < 2e-2, pooling
    clear = _clear_first_tokens(loaded, prompts, steering).tolist()
    assert sum(clear) >= 2, clear
    for row, (got, want) in enumerate(zip(out.response_ids, ref.response_ids, strict=True)):
        if clear[row]:
            assert got[:1] == want[:1], row
