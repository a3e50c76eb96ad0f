"""Two model shapes in one process: the compiled block keeps each model's head counts static.

The blocks over whole sequences (the fast forward's, the prefill's) are compiled once per
process, their batch and sequence dimensions dynamic (``tracekit.engines.cuda.compiled``).
Under ``dynamic=None`` a second model with other head counts made dynamo recompile with the
counts symbolic, and on CUDA ``scaled_dot_product_attention`` rejected ``enable_gqa`` as a
symbolic bool (a Mistral-7B-shaped model, then a Qwen2.5-7B-shaped one). Here dynamo compiles
through a backend that records each graph's symbolic inputs (torch's own eager execution of
the graph, no inductor), for two shapes and two batch shapes each: every graph has the same
symbols (batch and length), never the counts, and the results equal the reference.
"""

from __future__ import annotations

import torch

from tolerance import assert_close_to_scale
from tracekit.engines.cuda import compiled
from tracekit.engines.cuda.forward import FastForward
from tracekit.engines.interface import CaptureSpec
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.models.random_model import random_llama

POOLINGS = (Pooling.response_avg, Pooling.prompt_last)


def test_two_head_shapes_compile_with_static_counts(monkeypatch):
    symbols: list[int] = []

    def recording(gm, example_inputs):
        symbols.append(sum(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": recording})
    )
    monkeypatch.setattr(compiled, "_COMPILED_DYNAMIC", {})
    torch._dynamo.reset()
    capture = CaptureSpec(layers=(0, 2, 4), poolings=POOLINGS)
    for heads, kv_heads in ((8, 2), (4, 1)):  # other counts, other group size
        loaded = random_llama(
            "tiny", overrides={"num_attention_heads": heads, "num_key_value_heads": kv_heads}
        )
        forward = FastForward(loaded.model, compile=True)
        for rows in (2, 3):  # another batch and length: the same graph
            prompts = [[5 + i, 6, 7, 8 + i] * (rows - i) for i in range(rows)]
            responses = [[9, 10 + i] for i in range(rows)]
            got = forward.pooled(prompts, responses, capture.layers, POOLINGS)
            want = pooled_forward(loaded, prompts, responses, capture, engine="hf")
            for pooling in POOLINGS:
                assert_close_to_scale(got[pooling], want[pooling])
    torch._dynamo.reset()
    assert len(symbols) == 2, symbols  # one graph per model shape
    assert symbols[0] == symbols[1] > 0, symbols  # batch and length only, in both


def test_auto_falls_back_to_hf_when_the_fast_engine_fails(caplog):
    """Under ``auto`` the fast engine is wrapped: a batch it cannot run (here a Mistral whose
    sliding window is shorter than prompt + new tokens, which the CUDA engine refuses) runs on
    the reference engine instead, with one warning, and so does every later batch."""
    import logging

    from tracekit.engines.cuda.engine import CudaEngine
    from tracekit.engines.hf import HFEngine
    from tracekit.engines.interface import FallbackEngine, GenerationParams

    loaded = random_llama("tiny", overrides={"sliding_window": 4}, model_type="mistral")
    engine = FallbackEngine(CudaEngine(loaded, use_graphs=False, compile=False))
    assert engine.name == "cuda"
    params = GenerationParams(max_new_tokens=6, temperature=0)
    prompts = [[5, 17, 99, 3, 250], [7, 8]]
    capture = CaptureSpec(layers=(1, 3), poolings=POOLINGS)
    with caplog.at_level(logging.WARNING):
        first = engine.generate(prompts, params, capture)
        second = engine.generate(prompts[:1], params, capture)
    want = HFEngine(loaded).generate(prompts, params, capture)
    assert engine.name == "hf"
    assert first.response_ids == want.response_ids
    assert second.response_ids == want.response_ids[:1]
    for pooling in POOLINGS:
        assert_close_to_scale(first.pooled[pooling], want.pooled[pooling])
    warnings = [r for r in caplog.records if "falls back to the hf engine" in r.getMessage()]
    assert len(warnings) == 1 and "sliding window" in warnings[0].getMessage()
