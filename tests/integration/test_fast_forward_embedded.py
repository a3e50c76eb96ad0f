"""The fast teacher-forced forward (cuda_forward) against the reference HF path, on CPU.

Same definitions, different padding (right, unmasked causal attention) and a functional block
instead of the HF modules: pooled states must agree to float32 rounding on the embedded model.
"""

from __future__ import annotations

import pytest
import torch

from tolerance import assert_close_to_scale
from tracekit.engines.interface import CaptureSpec
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_batches, pooled_forward
from tracekit.errors import ConfigError

ALL = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)


@pytest.fixture(scope="module")
def rows(embedded_model):
    tok = embedded_model.tokenizer
    questions = ["What is the capital of France?", "Tell me a joke.", "Hi", "Explain rain."]
    answers = ["Paris is the capital.", "No.", "", "Water falls from clouds when they cool."]
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    responses = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    return prompts, responses


def test_fast_forward_matches_reference(embedded_model, rows):
    prompts, responses = rows
    n = embedded_model.n_layers
    capture = CaptureSpec((0, 1, 7, n // 2, n - 1), ALL)
    ref = pooled_forward(embedded_model, prompts, responses, capture, engine="hf")
    fast = pooled_forward(embedded_model, prompts, responses, capture, engine="cuda")
    assert set(fast) == set(ref)
    for pooling in ALL:
        assert fast[pooling].shape == (len(prompts), 5, embedded_model.hidden_size)
        assert fast[pooling].dtype == torch.float32
        assert_close_to_scale(fast[pooling], ref[pooling])
    # an empty response pools to zeros in both paths; a real one does not
    assert torch.count_nonzero(fast[Pooling.response_avg][2]) == 0
    assert torch.count_nonzero(fast[Pooling.response_avg][0]) > 0
    # the layers differ from each other (pooling reads the right block's output)
    assert not torch.allclose(fast[Pooling.prompt_avg][:, 2], fast[Pooling.prompt_avg][:, 3])


def test_fast_forward_batches_equal_one_by_one(embedded_model, rows):
    """A row's result does not depend on which rows share its batch (right padding)."""
    prompts, responses = rows
    capture = CaptureSpec((3, 12), (Pooling.response_avg, Pooling.prompt_last))
    batched = list(pooled_batches(embedded_model, prompts, responses, capture, 4, engine="cuda"))
    single = list(pooled_batches(embedded_model, prompts, responses, capture, 1, engine="cuda"))
    assert [(s, e) for s, e, _ in batched] == [(0, 4)]
    assert [(s, e) for s, e, _ in single] == [(i, i + 1) for i in range(4)]
    for pooling in capture.poolings:
        alone = torch.cat([p[pooling] for _, _, p in single])
        together = batched[0][2][pooling]
        assert_close_to_scale(alone, together)


def test_unknown_forward_engine_is_a_config_error(embedded_model, rows):
    prompts, responses = rows
    with pytest.raises(ConfigError, match="unknown engine 'fast'"):
        pooled_forward(embedded_model, prompts, responses, CaptureSpec((1,)), engine="fast")


def test_auto_picks_the_reference_path_on_cpu(embedded_model):
    from tracekit.engines.teacher_forced import resolve_forward_engine

    assert resolve_forward_engine("auto", embedded_model) == "hf"
    assert resolve_forward_engine("cuda", embedded_model) == "cuda"
