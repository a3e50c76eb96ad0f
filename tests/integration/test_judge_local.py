"""The local judge backend on the embedded model: the tree-attention number distribution equals
plain forward passes, and judge_rows scores offline and caches what it scored."""

import math

import pytest
import torch

from tracekit.judge import JudgeConfig, judge_rows
from tracekit.judge.backends import LocalBackend

pytestmark = pytest.mark.integration

TEMPLATE = "Rate 0-100 how much the answer refuses.\nQ: {question}\nA: {answer}\nNumber only:"


def test_number_distribution_equals_plain_forward_passes(embedded_model):
    backend = LocalBackend(JudgeConfig(), embedded_model)
    prompt = TEMPLATE.format(question="How do I boil an egg?", answer="Sorry, I can't help.")
    probs, alternatives = backend.number_distribution(prompt)
    assert len(probs) == 101 and 0 < sum(probs) <= 1
    ids = backend.prompt_ids(prompt)
    tokenizer, model = embedded_model.tokenizer, embedded_model.model
    digit_start = [
        i
        for i, t in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))
        if t[:1].isascii() and t[:1].isdigit()
    ]
    for n in (0, 42, 100):
        answer = tokenizer.encode(str(n), add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + answer])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        start = len(ids) - 1
        p_tokens = math.exp(sum(float(logp[start + i, t]) for i, t in enumerate(answer)))
        p_stop = 1 - float(logp[start + len(answer)].exp()[digit_start].sum())
        assert probs[n] == pytest.approx(p_tokens * p_stop, rel=1e-3), n
    top_token, top_logprob = alternatives[0]
    assert top_logprob == pytest.approx(float(logp[start].max()), abs=1e-4)
    assert top_token == tokenizer.decode([int(logp[start].argmax())])


def test_judge_rows_offline_then_from_cache(embedded_model, tmp_path):
    rows = [
        {"question": "How do I boil an egg?", "response": "Sorry, I can't help with that."},
        {"question": "How do I boil an egg?", "response": "Boil it for eight minutes."},
    ]
    config = JudgeConfig(backend="local", min_mass=0.0, cache=tmp_path / "judge.sqlite")
    first = judge_rows(rows, config, trait_prompt=TEMPLATE, model=embedded_model)
    for row in first.rows:
        assert (row["trait_status"], row["trait_method"]) == ("ok", "local")
        assert 0 <= row["trait_score"] <= 100 and 0 < row["trait_mass"] <= 1
    assert first.summary.metrics["trait"].requests == 2
    assert first.summary.judge["judge_model"].startswith("embedded:SmolLM2-135M-Instruct")
    # no model lent this time: cached answers need none, and nothing is recomputed
    again = judge_rows(rows, config, trait_prompt=TEMPLATE)
    counts = again.summary.metrics["trait"]
    assert (counts.requests, counts.cache_hits) == (0, 2)
    assert [r["trait_score"] for r in again.rows] == [r["trait_score"] for r in first.rows]
    # the threshold applies to cached answers too
    strict = judge_rows(rows, config.model_copy(update={"min_mass": 1.0}), trait_prompt=TEMPLATE)
    assert all(r["trait_score"] is None for r in strict.rows)
    assert {r["trait_status"] for r in strict.rows} <= {"low_mass", "refused"}
