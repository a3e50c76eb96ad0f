import json

import pytest
from pydantic import ValidationError

from tracekit.config import LayerSpec, TracekitConfig, parse_layers_arg


@pytest.mark.parametrize(
    ("text", "layers", "canonical"),
    [
        ("0-5", (0, 1, 2, 3, 4, 5), "0-5"),
        ("2,5,10", (2, 5, 10), "2,5,10"),
        ("0-2,10,15-17", (0, 1, 2, 10, 15, 16, 17), "0-2,10,15-17"),
        ("10, 2, 2, 3", (2, 3, 10), "2-3,10"),
        ("7", (7,), "7"),
        ("3-3", (3,), "3"),
        ("0-2,3-4", (0, 1, 2, 3, 4), "0-4"),
    ],
)
def test_parses_sorted_unique_and_prints_canonically(text, layers, canonical):
    spec = LayerSpec.parse(text)
    assert spec.layers == layers
    assert str(spec) == canonical
    assert LayerSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("5-2", "'5-2'"),
        ("-1", "'-1'"),
        ("1,,2", "'1,,2'"),
        ("a-b", "'a-b'"),
        ("", "empty layer spec"),
        ("   ", "empty layer spec"),
        ("1,2,", "trailing"),
        ("1.5", "'1.5'"),
    ],
)
def test_rejects_bad_specs_naming_the_bad_part(text, fragment):
    with pytest.raises(ValueError) as err:
        LayerSpec.parse(text)
    assert fragment in str(err.value)


def test_all_resolves_against_a_model_and_range_is_checked():
    assert LayerSpec.parse("all").is_all
    assert LayerSpec.parse("all").resolve(4) == (0, 1, 2, 3)
    assert str(LayerSpec.parse("ALL")) == "all"
    with pytest.raises(ValueError, match="layer\\(s\\) 31, 40 out of range: valid layers are 0-30"):
        LayerSpec.parse("0,31,40").resolve(31)


class _Cfg(TracekitConfig):
    layers: LayerSpec = LayerSpec.parse("0-2")


def test_round_trips_through_pydantic_and_json():
    cfg = _Cfg(layers="0-2,10,15-17")
    assert cfg.layers.layers == (0, 1, 2, 10, 15, 16, 17)
    dumped = cfg.model_dump_json()
    assert json.loads(dumped) == {"layers": "0-2,10,15-17"}
    assert _Cfg.model_validate_json(dumped) == cfg
    assert _Cfg(layers=[3, 1, 1]).layers.layers == (1, 3)
    with pytest.raises(ValidationError, match="start is greater than end"):
        _Cfg(layers="5-2")
    with pytest.raises(ValidationError):
        _Cfg(layers=[1, "x"])


def test_seed_helper_parse_layers_arg():
    assert parse_layers_arg("0-2,10,15-17") == [0, 1, 2, 10, 15, 16, 17]
