"""The local judge backend on the embedded model: the tree-attention number distribution equals
plain forward passes, and judge_rows scores offline and caches what it scored."""

import math

import pytest
import torch

from tolerance import assert_close_to_scale
from tracekit.judge import JudgeConfig, RawAnswer, judge_rows, score_answer
from tracekit.judge.backends import LocalBackend

pytestmark = pytest.mark.integration

TEMPLATE = "Rate 0-100 how much the answer refuses.\nQ: {question}\nA: {answer}\nNumber only:"


def test_number_distribution_equals_brute_force_over_all_101_numbers(embedded_model):
    """P(answer == n) for every n in 0..100 from one plain teacher-forced pass per number
    (prompt + the number's tokens, batched, right-padded) equals the tree-attention pass; so do
    the mass and the probability-weighted mean the judge reports."""
    backend = LocalBackend(JudgeConfig(), embedded_model)
    prompt = TEMPLATE.format(question="How do I boil an egg?", answer="Sorry, I can't help.")
    probs, alternatives = backend.number_distribution(prompt)
    ids = backend.prompt_ids(prompt)
    tokenizer, model = embedded_model.tokenizer, embedded_model.model
    digit_start = [
        i
        for i, t in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))
        if t[:1].isascii() and t[:1].isdigit()
    ]
    answers = [tokenizer.encode(str(n), add_special_tokens=False) for n in range(101)]
    assert max(len(a) for a in answers) == 3  # SmolLM2 writes numbers one digit per token
    width = len(ids) + 3
    batch = torch.zeros((101, width), dtype=torch.long)
    mask = torch.zeros((101, width), dtype=torch.long)
    for n, answer in enumerate(answers):
        batch[n, : len(ids) + len(answer)] = torch.tensor(ids + answer)
        mask[n, : len(ids) + len(answer)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), -1)
    start = len(ids) - 1
    brute = []
    for n, answer in enumerate(answers):
        tokens = sum(float(logp[n, start + i, t]) for i, t in enumerate(answer))
        end = 1 - float(logp[n, start + len(answer)].exp()[digit_start].sum())
        brute.append(math.exp(tokens) * end)
    assert_close_to_scale(probs, brute)
    mass = sum(brute)
    assert 0 < mass <= 1
    verdict = score_answer(RawAnswer(number_probs=tuple(probs)), min_mass=0.0)
    assert (verdict.method, verdict.status) == ("local", "ok")
    assert_close_to_scale(
        [verdict.mass, verdict.score], [mass, sum(n * p for n, p in enumerate(brute)) / mass]
    )
    top_token, top_logprob = alternatives[0]
    assert_close_to_scale([top_logprob], [float(logp[0, start].max())])
    assert top_token == tokenizer.decode([int(logp[0, start].argmax())])


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


def test_server_judge_on_a_real_digit_splitting_model_agrees_with_the_local_one(
    embedded_model, tmp_path
):
    """The issue's case: SmolLM2 (one digit per token) behind an OpenAI-compatible server that
    serves its real logprobs, as llama.cpp does. First-token scoring put these rows at 1.0
    (the mean of the first digits); the next-digit requests give the local judge's scale."""
    from judge_server import JudgeServer

    rows = [
        {"question": "How do I boil an egg?", "response": "Sorry, I can't help with that."},
        {"question": "How do I boil an egg?", "response": "Boil it for eight minutes."},
    ]
    local = judge_rows(
        rows, JudgeConfig(backend="local", min_mass=0.0, no_cache=True), trait_prompt=TEMPLATE,
        model=embedded_model,
    )  # fmt: skip
    with JudgeServer(model=embedded_model) as server:
        config = JudgeConfig(
            backend="openai", base_url=server.base_url, judge_model="smollm2", min_mass=0.0,
            no_cache=True,
        )  # fmt: skip
        served = judge_rows(rows, config, trait_prompt=TEMPLATE)
    for got, exact in zip(served.rows, local.rows, strict=True):
        assert got["trait_method"] == "digits", got
        # Same model, but the server shows only the top 20 alternatives per step: numbers
        # whose digits rank lower are missing (measured: 57-81% of the exact mass), and the
        # score moves by under 2 points (12.0 vs 13.9, 15.0 vs 15.9) — where first-token
        # scoring gave 1.0 for the first row.
        assert abs(got["trait_score"] - exact["trait_score"]) < 3.0, (got, exact)
        assert 0.4 < got["trait_mass"] / exact["trait_mass"] <= 1.05, (got, exact)
