"""Judge scoring math, refusal detection, text fallback, cache round trip and config resolution."""

import math

import pytest

from tracekit.errors import InputError
from tracekit.judge import JudgeConfig, RawAnswer, logprob_score, resolve_backend, score_answer
from tracekit.judge.cache import JudgeCache, cache_key
from tracekit.judge.prompts import resolve_templates


def lp(*pairs):
    return tuple((token, math.log(prob)) for token, prob in pairs)


def test_logprob_score_is_the_weighted_mean_of_integer_tokens_0_to_100():
    top = lp(("85", 0.5), ("90", 0.25), ("Hello", 0.1), ("101", 0.05), ("-3", 0.04), (" 7", 0.06))
    score, mass = logprob_score(top)
    assert mass == pytest.approx(0.81)
    assert score == pytest.approx((85 * 0.5 + 90 * 0.25 + 7 * 0.06) / 0.81)


def test_repeated_tokens_count_once_and_odd_digits_are_not_numbers():
    score, mass = logprob_score(lp(("40", 0.3), ("40", 0.3), ("1_0", 0.2), ("٣", 0.1)))
    assert (score, mass) == (pytest.approx(40.0), pytest.approx(0.3))


def test_verdicts_ok_low_mass_and_refused():
    ok = score_answer(RawAnswer(text="85", top_logprobs=lp(("85", 0.2), ("90", 0.2))))
    assert (ok.status, ok.method, ok.score, ok.mass) == ("ok", "logprobs", 87.5, pytest.approx(0.4))
    low = score_answer(RawAnswer(text="The", top_logprobs=lp(("The", 0.8), ("50", 0.2))))
    assert (low.status, low.score, low.mass) == ("low_mass", None, pytest.approx(0.2))
    # the same answer passes with a lower threshold (the threshold is configurable)
    assert score_answer(RawAnswer(top_logprobs=lp(("50", 0.2))), min_mass=0.1).score == 50
    refused = score_answer(RawAnswer(text="REF", top_logprobs=lp(("REF", 0.9), ("0", 0.1))))
    assert (refused.status, refused.score) == ("refused", None)


def test_text_fallback_records_the_method():
    verdict = score_answer(RawAnswer(text="Score: 72/100"))
    assert (verdict.status, verdict.method, verdict.score, verdict.mass) == ("ok", "text", 72, None)
    assert score_answer(RawAnswer(text="REFUSAL")).status == "refused"
    assert score_answer(RawAnswer(text="I'm sorry, I can't rate that")).status == "refused"
    assert score_answer(RawAnswer(text="lots", refused=True)).status == "refused"
    failed = score_answer(RawAnswer(text="banana"))
    assert failed.status == "failed: no number 0-100 in the judge's answer 'banana'"
    assert score_answer(RawAnswer(text="250")).kind == "failed"


def test_a_number_split_over_tokens_is_read_from_the_text():
    raw = RawAnswer(text="85", top_logprobs=lp(("8", 0.9), ("9", 0.1)), split_number=True)
    verdict = score_answer(raw)
    assert (verdict.method, verdict.score) == ("text", 85)


def test_local_distribution_score():
    probs = [0.0] * 101
    probs[20], probs[100] = 0.1, 0.3
    verdict = score_answer(RawAnswer(text="1", number_probs=tuple(probs)))
    assert (verdict.method, verdict.score, verdict.mass) == ("local", 80.0, pytest.approx(0.4))


def test_cache_round_trip_and_key_covers_every_part(tmp_path):
    parts = ["openai", "m", "trait", "tmpl {question} {answer}", "q", "r"]
    keys = {cache_key(*parts)}
    for i in range(len(parts)):
        changed = list(parts)
        changed[i] += "x"
        keys.add(cache_key(*changed))
    assert len(keys) == len(parts) + 1
    raw = RawAnswer(text="8", top_logprobs=lp(("8", 0.5)), split_number=True)
    cache = JudgeCache(tmp_path / "c.sqlite")
    cache.put("k", "openai", "m", "trait", raw)
    cache.close()
    again = JudgeCache(tmp_path / "c.sqlite")
    assert again.get_many(["k", "missing"]) == {"k": raw} and len(again) == 1


def test_backend_resolution_order():
    cfg = JudgeConfig(trait="refusal")
    assert resolve_backend(cfg, env={}) == "local"
    assert resolve_backend(cfg, env={"OPENAI_API_KEY": "x"}) == "openai"
    assert resolve_backend(cfg, env={"OPENAI_BASE_URL": "http://h/v1"}) == "openai"
    assert resolve_backend(JudgeConfig(backend="local"), env={"OPENAI_API_KEY": "x"}) == "local"
    assert resolve_backend(JudgeConfig(base_url="http://h"), env={}) == "openai"
    other = JudgeConfig(api_key_env="MY_KEY")
    assert resolve_backend(other, env={"OPENAI_API_KEY": "x"}) == "local"
    assert resolve_backend(other, env={"MY_KEY": "x"}) == "openai"


def test_config_validation_messages():
    assert JudgeConfig(metrics="trait, coherence").metrics == ("trait", "coherence")
    with pytest.raises(ValueError, match="unknown metric 'style'"):
        JudgeConfig(metrics="trait,style")
    with pytest.raises(ValueError, match="expects the NAME of an environment variable") as err:
        JudgeConfig(api_key_env="sk-abc123")
    assert "sk-abc123" not in str(err.value)  # no echo, even in pydantic's own text
    with pytest.raises(ValueError, match="either --trait or --eval-prompt"):
        JudgeConfig(trait="refusal", eval_prompt="p.txt")


def test_templates_trait_prompt_file_and_errors(tmp_path):
    templates = resolve_templates(JudgeConfig(trait="refusal", metrics="trait,coherence"))
    assert "{answer}" in templates["trait"] and "coherence" in templates["coherence"]
    prompt = tmp_path / "p.txt"
    prompt.write_text("Q {question} A {answer} {{literal}}")
    assert resolve_templates(JudgeConfig(eval_prompt=prompt))["trait"].startswith("Q {question}")
    prompt.write_text("no placeholders here")
    with pytest.raises(InputError, match="must contain the placeholder"):
        resolve_templates(JudgeConfig(eval_prompt=prompt))
    with pytest.raises(InputError, match="unknown trait 'nope'"):
        resolve_templates(JudgeConfig(trait="nope"))
    with pytest.raises(InputError, match="needs a judge prompt"):
        resolve_templates(JudgeConfig())
    assert resolve_templates(JudgeConfig(metrics="coherence")).keys() == {"coherence"}
