"""Cold start: the CUDA engine times its kernels only for jobs long enough to repay it.

``tracekit generate`` tells the engine the job's size (``plan_job``) before its first batch.
A 200-row trait run is far too short to repay a minute or two of kernel timing and step
tuning, so its engine runs with the decisions kept on disk, else cuBLAS and the attention
kernel's default configuration; a job whose decode time (every step reading all weights at an
H100's copy rate) reaches ``TIMING_PAYS_AFTER_S`` times them as before.
"""

from __future__ import annotations

import torch

from tolerance import assert_close_to_scale
from tracekit.engines.cuda.engine import STEP_BANDWIDTH, TIMING_PAYS_AFTER_S, CudaEngine
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, FallbackEngine, GenerationParams
from tracekit.engines.pooling import Pooling
from tracekit.models.random_model import random_llama


def test_only_jobs_that_repay_it_time_kernels():
    loaded = random_llama("tiny")
    engine = CudaEngine(loaded, use_graphs=False, compile=False)
    assert engine.plan.time_kernels  # the Python default: as before
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    # the smallest number of 32-row batches of 128 steps that reaches the threshold
    batches = int(TIMING_PAYS_AFTER_S * STEP_BANDWIDTH / (weights * 128)) + 1
    assert FallbackEngine(engine).plan_job(200, 128, 32) is False  # auto's wrapper passes it on
    assert not engine._decoder(None).plan.time_kernels
    assert not engine._decoder(None).plan.tune_steps
    assert engine.plan_job(32 * (batches - 2), 128, 32) is False
    assert engine.plan_job(32 * batches, 128, 32) is True
    assert engine._decoder(None).plan.time_kernels


def test_a_short_job_generates_what_the_reference_does():
    loaded = random_llama("tiny")
    engine = CudaEngine(loaded, use_graphs=False, compile=False)
    engine.plan_job(3, 8, 3)
    prompts = [[5, 17, 99, 3], [7, 8], [300, 301, 302]]
    params = GenerationParams(max_new_tokens=8, temperature=0)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=(Pooling.response_avg,))
    out = engine.generate(prompts, params, capture)
    ref = HFEngine(loaded).generate(prompts, params, capture)
    assert out.response_ids == ref.response_ids
    assert_close_to_scale(out.pooled[Pooling.response_avg], ref.pooled[Pooling.response_avg])
    assert torch.isfinite(out.pooled[Pooling.response_avg]).all()


def test_autos_wrapper_reports_the_fast_engines_setup():
    """``auto`` wraps the fast engine: the job's report of compile and capture time reads
    the wrapper, which must pass the fast engine's numbers on (it reported none)."""
    from tracekit.engines.cuda.engine import SETUP_PARTS

    loaded = random_llama("tiny")
    engine = CudaEngine(loaded, use_graphs=False, compile=False)
    wrapped = FallbackEngine(engine)
    wrapped.generate([[5, 17, 99]], GenerationParams(max_new_tokens=2, temperature=0))
    assert set(wrapped.setup_parts) == set(SETUP_PARTS)
    assert wrapped.setup_parts == engine.setup_parts
