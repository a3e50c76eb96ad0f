"""Trait definitions: schema validation with errors that name the field, and name resolution."""

import json
import logging
from pathlib import Path

import pytest

from seed_data import PERSONA_VECTORS_TRAIT, write_persona_vectors_trait
from tracekit.errors import InputError, OutputExistsError
from tracekit.storage.experiment import TraitPaths, ensure_trait_definition
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


def test_persona_vectors_file_gets_its_stem_as_name_and_says_so_once(tmp_path, caplog):
    path = write_persona_vectors_trait(tmp_path / "contempt.json")
    with caplog.at_level(logging.WARNING, logger="tracekit.traits"):
        trait = load_trait(path)
        again = load_trait(str(path))
    assert trait == again
    assert trait.name == "contempt" and trait.description == ""
    assert [p.model_dump() for p in trait.instruction] == PERSONA_VECTORS_TRAIT["instruction"]
    assert trait.questions == PERSONA_VECTORS_TRAIT["questions"]
    assert "{answer}" in trait.eval_prompt
    notices = [r.getMessage() for r in caplog.records if r.name == "tracekit.traits"]
    assert notices == [
        f'trait file {path} has no "name" or "description" (persona_vectors\' format): using '
        "the name 'contempt' (from the file name) and an empty description"
    ]


def test_persona_vectors_notice_comes_from_the_main_process_only(tmp_path, caplog, monkeypatch):
    """In a data-parallel run (torchrun's WORLD_SIZE and RANK) rank 1 reads the file quietly;
    rank 0 says it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = {"1": tmp_path / "one" / "contempt.json", "0": tmp_path / "zero" / "contempt.json"}
    with caplog.at_level(logging.WARNING, logger="tracekit.traits"):
        for rank, file in ranks.items():
            monkeypatch.setenv("RANK", rank)
            assert load_trait(write_persona_vectors_trait(file)).name == "contempt"
    notices = [r.getMessage() for r in caplog.records if r.name == "tracekit.traits"]
    assert [n.split(" has no ")[0] for n in notices] == [f"trait file {ranks['0']}"]


def test_persona_vectors_trait_definition_is_named_after_its_folder(tmp_path):
    base = tmp_path / "experiments"
    write_persona_vectors_trait(base / "my_exp" / "my_trait" / "trait_definition.json")
    assert load_trait("my_trait", "my_exp", base).name == "my_trait"


def test_a_given_name_or_description_is_kept(tmp_path):
    named = _write(tmp_path, {**PERSONA_VECTORS_TRAIT, "name": "evil"}, "contempt.json")
    assert (load_trait(named).name, load_trait(named).description) == ("evil", "")
    described = _write(tmp_path, {**PERSONA_VECTORS_TRAIT, "description": "d"}, "c2.json")
    assert (load_trait(described).name, load_trait(described).description) == ("c2", "d")


def test_persona_vectors_file_is_still_validated(tmp_path):
    bad = {**PERSONA_VECTORS_TRAIT, "eval_prompt": "Rate {answer} from 0 to 100."}
    with pytest.raises(InputError) as info:
        load_trait(_write(tmp_path, bad, "contempt.json"))
    assert "field 'eval_prompt': must contain the placeholder(s) {question}" in info.value.message


def test_a_file_name_that_is_no_trait_name_is_refused_clearly(tmp_path):
    path = _write(tmp_path, PERSONA_VECTORS_TRAIT, "my trait.json")
    with pytest.raises(InputError) as info:
        load_trait(path)
    assert info.value.message == (
        f"trait file {path} has no \"name\" and its default, 'my trait' (from the file name), "
        "is not a valid trait name"
    )
    assert 'add "name"' in (info.value.hint or "")


def test_a_saved_definition_is_compared_as_a_trait(tmp_path):
    """generate keeps a persona_vectors-style trait_definition.json that defines the same
    trait, and still refuses (without --force) one that defines another."""
    paths = TraitPaths.of(tmp_path, "my_exp", "my_trait")
    write_persona_vectors_trait(paths.trait_definition)
    before = paths.trait_definition.read_bytes()
    trait = load_trait("my_trait", "my_exp", tmp_path)
    ensure_trait_definition(paths, trait, force=False)
    assert paths.trait_definition.read_bytes() == before
    other = trait.model_copy(update={"questions": ["Another question?"]})
    with pytest.raises(OutputExistsError, match="differs from the trait definition given"):
        ensure_trait_definition(paths, other, force=False)
    assert paths.trait_definition.read_bytes() == before
    ensure_trait_definition(paths, other, force=True)
    assert load_trait(paths.trait_definition) == other
