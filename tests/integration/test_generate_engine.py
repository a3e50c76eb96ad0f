"""The reference engine's contract on the embedded model: padding-correct batching, per-row
stopping, capture pooled during generation == a teacher-forced forward.

Tolerance (stated once): pooled activations agree to within 1e-5 of the largest magnitude in
the tensor (float32 on CPU; the observed difference is ~1e-6 relative, from different matmul
shapes between batch sizes and between incremental and full-sequence attention).
"""

import pytest
import torch

from tolerance import close_to_scale
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams, encode_prompts
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.models.templates import build_prompt

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Say only the word yes.",
    "Tell me a long story about a dragon who loves tea.",
    "Hi",
    "Why is the sky blue? Explain in detail with physics.",
    "What is 2+2?",
    "Name a fruit.",
    "Write a poem about the sea, please.",
    "Ok?",
]
LAYERS = (0, 15, 30)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return close_to_scale(a, b)


@pytest.fixture(scope="module")
def prompts(embedded_model):
    return [build_prompt(embedded_model.tokenizer, q).ids for q in QUESTIONS]


@pytest.fixture(scope="module")
def greedy_batch(embedded_model, prompts):
    engine = HFEngine(embedded_model)
    params = GenerationParams(max_new_tokens=5, temperature=0)
    capture = CaptureSpec(LAYERS, tuple(Pooling))
    return engine, params, capture, engine.generate(prompts, params, capture)


def test_rows_stop_at_their_own_eos_and_responses_exclude_it(embedded_model, greedy_batch, prompts):
    _, params, _, out = greedy_batch
    assert set(out.finish_reasons) == {"eos", "length"}  # both paths are exercised
    eos = embedded_model.tokenizer.eos_token_id
    for ids, reason, text in zip(out.response_ids, out.finish_reasons, out.texts, strict=True):
        assert eos not in ids
        assert len(ids) == params.max_new_tokens if reason == "length" else len(ids) < 5
        assert text == embedded_model.tokenizer.decode(ids, skip_special_tokens=True)
    assert out.prompt_lengths == [len(p) for p in prompts]
    assert len(set(out.prompt_lengths)) > 1  # prompts of different lengths: padding matters


def test_batch_1_equals_batch_8_greedy(greedy_batch, prompts):
    engine, params, capture, batched = greedy_batch
    singles = [engine.generate([p], params, capture) for p in prompts]
    assert [s.response_ids[0] for s in singles] == batched.response_ids
    assert [s.finish_reasons[0] for s in singles] == batched.finish_reasons
    for pooling in Pooling:
        stacked = torch.cat([s.pooled[pooling] for s in singles])
        assert stacked.shape == (len(prompts), len(LAYERS), 576)
        assert _close(stacked, batched.pooled[pooling]), pooling


def test_generation_capture_equals_teacher_forced_forward(embedded_model, greedy_batch, prompts):
    _, _, capture, out = greedy_batch
    forced = pooled_forward(embedded_model, prompts, out.response_ids, capture)
    for pooling in Pooling:
        assert _close(out.pooled[pooling], forced[pooling]), pooling
    # response_avg really is a mean over response positions only: it differs from prompt_avg
    assert not _close(out.pooled[Pooling.response_avg], out.pooled[Pooling.prompt_avg])


def test_sampling_is_per_row_seeded_independent_of_batch(embedded_model, prompts):
    engine = HFEngine(embedded_model)
    params = GenerationParams(max_new_tokens=4, temperature=1.0, top_p=0.9)
    seeds = [100 + i for i in range(3)]
    together = engine.generate(prompts[1:4], params, row_seeds=seeds)
    reversed_batch = engine.generate(prompts[1:4][::-1], params, row_seeds=seeds[::-1])
    assert reversed_batch.response_ids[::-1] == together.response_ids
    other_seeds = engine.generate(prompts[1:4], params, row_seeds=[7, 8, 9])
    assert other_seeds.response_ids != together.response_ids


def test_hooks_are_removed_after_generation(embedded_model, prompts):
    # transformers itself may keep output-recording hooks on the blocks (installed on the first
    # output_hidden_states call), so compare against the hooks present before generating
    blocks = embedded_model.handles.blocks

    def snapshot():
        return [(dict(b._forward_pre_hooks), dict(b._forward_hooks)) for b in blocks]

    before = snapshot()
    engine = HFEngine(embedded_model)
    engine.generate(
        prompts[:2],
        GenerationParams(max_new_tokens=2, temperature=0),
        CaptureSpec(LAYERS, tuple(Pooling)),
    )
    assert snapshot() == before


def test_layer_outside_model_is_a_clear_error(embedded_model, prompts):
    from tracekit.errors import ConfigError

    engine = HFEngine(embedded_model)
    message = r"--layers: layer\(s\) 31 out of range: .* has layers 0-30"
    with pytest.raises(ConfigError, match=message):
        engine.generate(prompts[:1], GenerationParams(max_new_tokens=2), CaptureSpec((31,)))


def test_string_prompts_are_tokenized_without_extra_special_tokens(embedded_model):
    tok = embedded_model.tokenizer
    text = build_prompt(tok, "Hi").text
    assert encode_prompts(tok, [text]) == [build_prompt(tok, "Hi").ids]
