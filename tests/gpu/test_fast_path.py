"""The CUDA engine's fast path on a GPU: Gemma-2/3, two models in one process, bf16 exactness.

Random-init models, nothing downloaded:

- Gemma-2 and Gemma-3 (tiny, float32, TF32 off) with CUDA graphs and ``torch.compile``: tokens
  identical to the reference engine, captures within 1e-3 (relative, by norm);
- two model shapes in one process (a Mistral-7B-shaped block, then a Qwen2.5-7B-shaped one:
  other head counts), both through ``auto``, which must stay on the CUDA engine;
- bf16 exactness against float32: the engine's bf16 captures and HF's bf16 teacher-forced
  states, each against a float32 teacher-forced forward of the same weights over the same
  tokens. The engine's error may not exceed HF's own by more than :data:`BF16_MARGIN`.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tracekit.engines.exactness import bf16_errors, relative_error
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams, create_engine
from tracekit.engines.pooling import Pooling
from tracekit.models.random_gemma import random_gemma
from tracekit.models.random_model import random_llama

pytestmark = pytest.mark.gpu

ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
BF16_MARGIN = 1.25
"""The engine's bf16 error against float32 may be this many times HF's own bf16 error (both are
bf16 roundings of other kernel sequences: equal in expectation, a few percent apart per run)."""


def _prompts(n: int, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=gen).tolist()
    return [torch.randint(2, vocab, (k,), generator=gen).tolist() for k in lengths]


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("shape", ["gemma2-tiny", "gemma3-tiny", "phi3-tiny"])
@pytest.mark.parametrize("batch", [1, 8])
def test_gemma_greedy_equals_reference_with_graphs(shape, batch):
    if shape == "phi3-tiny":  # Phi-3: q/k/v and gate/up stored fused
        loaded = random_llama("tiny", device="cuda", dtype="float32", model_type="phi3")
    else:
        loaded = random_gemma(shape, device="cuda", dtype="float32", seed=0)
    prompts = _prompts(batch, seed=batch)
    params = GenerationParams(max_new_tokens=24, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 2, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(loaded).generate(prompts, params, capture)
    engine = create_engine("auto", loaded)
    assert engine.name == "cuda"
    out = engine.generate(prompts, params, capture)
    fast = getattr(engine, "fast", engine)  # auto wraps the fast engine in its fallback
    runners = list(fast._decoder(capture)._runners.values())
    assert runners and all(r.graph is not None for r in runners)  # replayed, not eager
    assert all(r.dims.fused_attention for r in runners)  # Gemma's attention in the kernel too
    assert out.response_ids == ref.response_ids
    for pooling in ALL_POOLINGS:
        assert relative_error(out.pooled[pooling], ref.pooled[pooling]) < 1e-3, pooling


def _llama_like(heads: int, kv_heads: int, hidden: int, model_type: str) -> object:
    """A two-block random model with a 7B model's attention shape (vocab cut to 512)."""
    return random_llama(
        "tiny",
        device="cuda",
        dtype="bfloat16",
        seed=0,
        overrides={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "initializer_range": 0.02,
        },
        model_type=model_type,
    )


def test_two_model_shapes_in_one_process(caplog):
    """A Mistral-7B-shaped model, then a Qwen2.5-7B-shaped one (other head counts) in the
    same process: both run on the CUDA engine with compiled, captured steps and prefill."""
    params = GenerationParams(max_new_tokens=16, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 2), poolings=ALL_POOLINGS)
    for heads, kv_heads, hidden, kind in ((32, 8, 4096, "mistral"), (28, 4, 3584, "qwen2")):
        loaded = _llama_like(heads, kv_heads, hidden, kind)
        with caplog.at_level(logging.WARNING):
            engine = create_engine("auto", loaded)
            engine.plan_job(4, 16, 4)  # as generate does: too short to time kernels
            out = engine.generate(_prompts(4), params, capture)
        assert engine.name == "cuda", kind
        assert not [r for r in caplog.records if "falls back" in r.getMessage()], kind
        assert all(len(r) == 16 for r in out.response_ids)
        del engine, loaded
        torch.cuda.empty_cache()


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "gemma-2-2b"])
def test_bf16_error_against_float32_is_hfs_own(shape):
    if shape.startswith("gemma"):
        loaded = random_gemma(shape, device="cuda", dtype="float32", seed=0)
    else:
        loaded = random_llama(shape, device="cuda", dtype="float32", seed=0)
    vocab = loaded.model.config.get_text_config().vocab_size
    errors = bf16_errors(loaded, _prompts(8, vocab=vocab, seed=1), new_tokens=32)
    for pooling, err in errors.items():
        engine, hf = max(err["engine"]), max(err["hf"])
        assert engine <= BF16_MARGIN * hf, (pooling, engine, hf)


def test_a_short_job_times_nothing_and_runs_cublas(tmp_path, monkeypatch):
    """Without a decisions file, a job too short to repay kernel timing (``plan_job``, as
    ``tracekit generate`` calls it) times nothing: no decision is written, no step tuned, and
    its tokens are those of the engine with every product on cuBLAS."""
    from tracekit.engines.cuda.engine import CudaEngine
    from tracekit.engines.cuda.ops import gemv as ops_gemv

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path))  # a fresh decisions file
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=3)
    prompts = _prompts(8, seed=3)
    params = GenerationParams(max_new_tokens=16, temperature=0)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    cold = CudaEngine(loaded)
    assert cold.plan_job(200, 128, 8) is False
    out = cold.generate(prompts, params, capture)
    dec = cold._decoder(capture)
    assert dec.setup_parts["step_tuning"] == 0 and not dec.plan.tune_steps
    assert ops_gemv.read_decisions() == {}
    runner = next(iter(dec._runners.values()))
    assert runner.graph is not None and not any(runner.dims.gemv[:5])  # cuBLAS everywhere
    plain = CudaEngine(loaded, gemv="off").generate(prompts, params, capture)
    assert out.response_ids == plain.response_ids
