"""Generate's config and row plan (no model): trait lists, poolings, pairing, per-row seeds."""

import pytest
from pydantic import ValidationError

from tracekit.config.base import resolve_config
from tracekit.config.generate import GenerateConfig
from tracekit.engines.interface import GenerationParams
from tracekit.engines.pooling import Pooling, parse_poolings
from tracekit.errors import ConfigError
from tracekit.jobs.generate import plan_rows, row_seed
from tracekit.traits import load_trait


def test_trait_list_and_pooling_parse_from_text():
    cfg = GenerateConfig(
        experiment="e", traits="refusal, verbosity,refusal", pooling="prompt_last,response_avg"
    )
    assert cfg.traits == ("refusal", "verbosity")
    assert cfg.pooling == (Pooling.prompt_last, Pooling.response_avg)
    assert str(cfg.layers) == "all"


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"traits": "a,,b"}, "--traits: Value error, empty trait name"),
        ({"pooling": ["mean"]}, "unknown pooling 'mean'"),
        ({"experiment": "../x"}, "invalid experiment name '../x'"),
        ({"batch_size": 0}, "--batch-size"),
        ({"layers": "3-1"}, "start is greater than end"),
        ({"top_p": 0}, "--top-p"),
    ],
)
def test_bad_generate_options_name_the_option(values, fragment):
    with pytest.raises(ConfigError) as info:
        resolve_config(GenerateConfig, {"experiment": "e", "traits": "refusal", **values})
    assert fragment.replace("Value error, ", "") in str(info.value)


def test_parse_poolings_rejects_empty():
    with pytest.raises(ValueError, match="no pooling given"):
        parse_poolings([" , "])


def test_greedy_and_sampling_params():
    assert GenerationParams(temperature=0).greedy
    assert GenerationParams(temperature=0.7, do_sample=False).greedy
    assert not GenerationParams(temperature=0.7).greedy
    with pytest.raises(ValidationError, match="do_sample=True needs temperature > 0"):
        GenerationParams(temperature=0, do_sample=True)


def test_rows_pair_by_id_and_cycle_questions_then_instruction_pairs():
    trait = load_trait("refusal")
    n_q = len(trait.questions)
    pos, neg = plan_rows(trait, "pos", n_q + 2), plan_rows(trait, "neg", n_q + 2)
    assert [r.id for r in pos] == [r.id for r in neg] == list(range(n_q + 2))
    for p, n in zip(pos, neg, strict=True):
        assert p.question == n.question
    assert pos[0].instruction == trait.instruction[0].pos
    assert neg[0].instruction == trait.instruction[0].neg
    assert pos[n_q].question == trait.questions[0]
    assert pos[n_q].instruction == trait.instruction[1].pos


def test_row_seeds_are_distinct_per_row_and_polarity_and_stable():
    seeds = {row_seed(0, pol, i) for pol in ("pos", "neg") for i in range(1000)}
    assert len(seeds) == 2000
    assert row_seed(7, "pos", 3) == row_seed(7, "pos", 3)
    assert row_seed(7, "pos", 3) != row_seed(8, "pos", 3)
