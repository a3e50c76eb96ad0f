"""The CUDA engine's decode path on the embedded SmolLM2 (a Llama), run eagerly on CPU.

Without a GPU the engine runs the same step functions without CUDA graphs or compilation; this
checks them on a real trained model (chat prompts of different lengths, rows stopping at eos)
against the reference engine. Tolerance: pooled activations within 1e-4 of the largest
magnitude (float32; the fast path computes attention and RMSNorm with its own kernels).
"""

import pytest

from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams
from tracekit.engines.pooling import Pooling
from tracekit.models.templates import build_prompt

pytestmark = pytest.mark.integration

QUESTIONS = ["Say only the word yes.", "Why is the sky blue? Explain.", "Hi", "Name a fruit."]
LAYERS = (0, 15, 30)


def test_embedded_model_greedy_and_captures_equal_reference(embedded_model):
    prompts = [build_prompt(embedded_model.tokenizer, q).ids for q in QUESTIONS]
    params = GenerationParams(max_new_tokens=10, temperature=0)
    capture = CaptureSpec(LAYERS, tuple(Pooling))
    ptr = embedded_model.model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    ref = HFEngine(embedded_model).generate(prompts, params, capture)
    out = CudaEngine(embedded_model, use_graphs=False, compile=False).generate(
        prompts, params, capture
    )
    assert "eos" in ref.finish_reasons  # the short answers stop by themselves
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    assert out.texts == ref.texts
    for pooling in Pooling:
        got, want = out.pooled[pooling], ref.pooled[pooling]
        assert got.shape == (len(QUESTIONS), len(LAYERS), 576)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), pooling
    # on CPU the shared model's weights are left where they were (no fusing)
    assert embedded_model.model.model.layers[0].self_attn.q_proj.weight.data_ptr() == ptr
