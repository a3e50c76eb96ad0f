"""Trait definitions: schema validation with errors that name the field, and name resolution."""

import json
from pathlib import Path

import pytest

from tracekit.errors import InputError
from tracekit.traits import (
    TraitDefinition,
    load_trait,
    resolve_trait_path,
    shipped_trait_names,
    shipped_traits_dir,
)

VALID = {
    "name": "demo",
    "description": "a demo trait",
    "instruction": [{"pos": "be it", "neg": "do not be it"}],
    "questions": ["q1?", "q2?"],
    "eval_prompt": "Q: {question}\nA: {answer}\nScore 0-100.",
}


def _write(tmp_path: Path, data: dict, name: str = "t.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_shipped_traits_are_valid_and_big_enough_for_a_demo():
    names = shipped_trait_names()
    assert {"refusal", "uncertainty", "verbosity"} <= set(names)
    for name in names:
        trait = load_trait(name)
        assert trait.name == name
        assert len(trait.questions) >= 10
        assert len(trait.instruction) >= 3


def test_examples_folder_points_at_the_shipped_files():
    examples = Path(__file__).resolve().parents[2] / "examples" / "traits"
    for path in examples.glob("*.json"):
        assert path.resolve().parent == shipped_traits_dir()


def test_eval_prompt_formats_both_placeholders():
    trait = TraitDefinition.model_validate(VALID)
    assert trait.format_eval_prompt("why?", "because") == "Q: why?\nA: because\nScore 0-100."


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            {"eval_prompt": "Q: {question} only"},
            "field 'eval_prompt': must contain the placeholder(s) {answer}",
        ),
        ({"eval_prompt": "{question} {answer} {score}"}, "unknown placeholder(s) {score}"),
        ({"eval_prompt": "{question} {answer} {"}, "field 'eval_prompt': cannot be formatted"),
        ({"questions": []}, "field 'questions': List should have at least 1 item"),
        ({"instruction": [{"pos": "x"}]}, "field 'instruction[0].neg': missing required field"),
        ({"instruction": [{"pos": "x", "neg": "  "}]}, "field 'instruction[0].neg'"),
        ({"name": "a/b"}, "field 'name': 'a/b' is not a valid trait name"),
        ({"colour": "red"}, "field 'colour': unknown field"),
    ],
)
def test_invalid_trait_file_names_the_field(tmp_path, change, fragment):
    path = _write(tmp_path, {**VALID, **change})
    with pytest.raises(InputError) as info:
        load_trait(path)
    assert fragment in info.value.message
    assert str(path) in info.value.message


def test_missing_field_is_named(tmp_path):
    data = dict(VALID)
    del data["questions"]
    with pytest.raises(InputError, match="field 'questions': missing required field"):
        load_trait(_write(tmp_path, data))


def test_bad_json_says_where(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x",\n', encoding="utf-8")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_trait(path)


def test_resolution_order_path_then_experiment_then_shipped(tmp_path):
    base = tmp_path / "experiments"
    saved = base / "exp1" / "refusal" / "trait_definition.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({**VALID, "name": "refusal"}), encoding="utf-8")
    # the experiment's saved copy wins over the shipped trait of the same name
    assert resolve_trait_path("refusal", "exp1", base) == saved
    assert load_trait("refusal", "exp1", base).description == "a demo trait"
    # another experiment has no copy: the shipped trait is used
    assert resolve_trait_path("refusal", "exp2", base).parent == shipped_traits_dir()
    # an explicit file path wins over everything
    explicit = _write(tmp_path, VALID, "refusal")
    assert resolve_trait_path(str(explicit), "exp1", base) == explicit


def test_unknown_trait_and_missing_path_are_clear():
    with pytest.raises(InputError) as info:
        load_trait("no_such_trait")
    assert info.value.message == "unknown trait 'no_such_trait'"
    assert "refusal" in (info.value.hint or "")
    with pytest.raises(InputError, match="trait file not found: nowhere/x.json"):
        load_trait("nowhere/x.json")
