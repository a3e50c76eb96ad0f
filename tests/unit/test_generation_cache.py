"""The generation cache format: npy (no pickle) + JSON + Markdown + metadata, read back."""

import json
import os
import pickle
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from seed_data import RunsCommand, write_pickled_cache
from tracekit.errors import InputError, UnsafeInputError
from tracekit.storage.generation_cache import (
    CacheFiles,
    load_generations_from_cache,
    read_text_array,
    render_markdown,
    save_generations_to_cache,
)

FULL = ["user: hi\nassistant: héllo", "user: 2+2?\nassistant: 4", "user: x\nassistant: y"]
COMP = ["héllo", "4", "y"]


def test_save_writes_every_file_and_loads_back(tmp_path: Path):
    stem = tmp_path / "m" / "generations" / "all" / "n3_t1.0_maxtok100"
    files = save_generations_to_cache(stem, FULL, COMP, {"model": "org/m", "generated": "T"})
    names = sorted(p.name for p in stem.parent.iterdir())
    assert names == [
        f"n3_t1.0_maxtok100_{suffix}"
        for suffix in (
            "completions.json",
            "completions.md",
            "completions.npy",
            "full_texts.json",
            "full_texts.md",
            "full_texts.npy",
            "metadata.json",
        )
    ]
    array = np.load(files.npy("completions"), allow_pickle=False)
    assert array.dtype.kind == "U" and array.tolist() == COMP
    assert json.loads(files.rendered("full_texts", "json").read_text()) == FULL
    meta = json.loads(files.metadata.read_text())
    assert meta == {"model": "org/m", "generated": "T", "count": 3}
    full, comp, loaded_meta = load_generations_from_cache(stem)
    assert (full, comp, loaded_meta) == (FULL, COMP, meta)
    # any file of the cache names the same cache
    assert load_generations_from_cache(files.npy("full_texts"))[0] == FULL


def test_markdown_has_the_seed_shape():
    text = render_markdown("completions", ["a", "b"], {"model": "org/m", "generated": "T"}, 5)
    assert text == (
        "# Completions Only\n\n**Model:** org/m\n**Generated:** T\n"
        "**Count:** 2 (showing first 2 of 5)\n\n---\n\n"
        "## Completion 1\n\na\n\n---\n\n## Completion 2\n\nb\n\n---\n"
    )
    full = render_markdown("full_texts", ["x"], {"model_name": "old/m", "timestamp": "D"})
    assert full.startswith("# Full Texts\n\n**Model:** old/m\n**Generated:** D\n**Count:** 1 ")
    assert "## Full Text 1\n\nx\n" in full


def test_limit_and_formats_and_generated_default(tmp_path: Path):
    files = save_generations_to_cache(
        tmp_path / "s", FULL, COMP, {"model": "m"}, formats=["md"], limit=1
    )
    assert not files.rendered("completions", "json").exists()
    md = files.rendered("completions", "md").read_text()
    assert "**Count:** 1 (showing first 1 of 3)" in md and "## Completion 2" not in md
    generated = json.loads(files.metadata.read_text())["generated"]
    assert len(generated) == 19 and generated[4] == "-" and generated[13] == ":"


def test_empty_cache_round_trips(tmp_path: Path):
    save_generations_to_cache(tmp_path / "e", [], [], {"model": "m"})
    assert load_generations_from_cache(tmp_path / "e")[:2] == ([], [])


def test_bad_arguments_write_nothing(tmp_path: Path):
    with pytest.raises(InputError, match="full_texts has 3 items but completions has 2"):
        save_generations_to_cache(tmp_path / "a", FULL, COMP[:2], {})
    with pytest.raises(InputError, match=r"completions\[1\] is int, not str"):
        save_generations_to_cache(tmp_path / "a", FULL, ["x", 3, "y"], {})  # type: ignore[list-item]
    with pytest.raises(InputError, match="cannot be written as JSON"):
        save_generations_to_cache(tmp_path / "a", FULL, COMP, {"when": object()})
    with pytest.raises(ValueError, match="unknown render format 'html'"):
        save_generations_to_cache(tmp_path / "a", FULL, COMP, {}, formats=["html"])
    with pytest.raises(ValueError, match="limit must be a positive"):
        save_generations_to_cache(tmp_path / "a", FULL, COMP, {}, limit=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickled_caches_are_read_without_allow_pickle(tmp_path: Path, protocol: int):
    """The seeds' caches hold pickles (object arrays, or a bare pickled list, both of which
    np.load(allow_pickle=True) reads): texts and numbers come through the restricted unpickler."""
    stem = tmp_path / "old" / "n3_t1.0_maxtok100"
    write_pickled_cache(stem, FULL, COMP)
    assert load_generations_from_cache(stem) == (
        FULL,
        COMP,
        {"model": "org/m", "timestamp": 1763002335.0},
    )
    files = CacheFiles.of(stem)
    assert read_text_array(files.npy("completions"), limit=2) == (COMP[:2], 3)
    with files.npy("completions").open("wb") as handle:
        pickle.dump(["a", b"b", 3, np.float32(0.5)], handle, protocol=protocol)
    assert read_text_array(files.npy("completions")) == (["a", "b", "3", "0.5"], 4)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"
    stem = tmp_path / "old" / "n1_t1.0_maxtok100"
    write_pickled_cache(stem, ["f"], [RunsCommand(f"touch {marker}")])
    path = CacheFiles.of(stem).npy("completions")
    with pytest.raises(UnsafeInputError) as info:
        read_text_array(path)
    assert info.value.message == (
        f"{path} is a pickle that needs {os.system.__module__}.system, which tracekit does not "
        "load (only containers, strings, numbers and numpy arrays); nothing from it was run"
    )
    assert "--allow-pickle" in (info.value.hint or "") and "EXECUTES CODE" in info.value.hint
    assert not marker.exists()


def test_allow_pickle_opts_in_to_every_class(tmp_path: Path):
    stem = tmp_path / "old" / "n2_t1.0_maxtok100"
    write_pickled_cache(stem, ["f1", "f2"], [Decimal("1.5"), "two"])
    path = CacheFiles.of(stem).npy("completions")
    with pytest.raises(UnsafeInputError, match="needs decimal.Decimal"):
        read_text_array(path)
    assert read_text_array(path, allow_pickle=True) == (["1.5", "two"], 2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"completions": ["a"]}, "holds a pickled dict, not a list of texts"),
        (np.array([["a"], ["b"]], dtype=object), "holds an array of shape (2, 1), not a list"),
    ],
)
def test_a_pickle_that_is_no_list_of_texts_is_refused(tmp_path: Path, value, message):
    path = tmp_path / "c_completions.npy"
    path.write_bytes(pickle.dumps(value, protocol=4))
    with pytest.raises(InputError) as info:
        read_text_array(path)
    assert message in info.value.message


def test_a_truncated_pickled_cache_is_one_clear_error(tmp_path: Path):
    stem = tmp_path / "old" / "n3_t1.0_maxtok100"
    write_pickled_cache(stem, FULL, COMP)
    path = CacheFiles.of(stem).npy("completions")
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(InputError, match="the file is truncated or corrupt"):
        read_text_array(path)


def test_limit_reads_a_prefix_and_reports_the_total(tmp_path: Path):
    files = save_generations_to_cache(tmp_path / "s", FULL, COMP, {"model": "m"}, formats=[])
    assert read_text_array(files.npy("completions"), limit=2) == (COMP[:2], 3)


@pytest.mark.parametrize(
    ("cut", "message"),
    [(20, "not a valid .npy file"), (-2, "the file is truncated or corrupt")],
)
def test_truncated_npy_is_one_clear_error(tmp_path: Path, cut: int, message: str):
    files = save_generations_to_cache(tmp_path / "s", FULL, COMP, {"model": "m"}, formats=[])
    data = files.npy("completions").read_bytes()
    files.npy("completions").write_bytes(data[:cut])
    with pytest.raises(InputError, match=message):
        load_generations_from_cache(tmp_path / "s")


def test_non_text_npy_and_bad_metadata(tmp_path: Path):
    files = save_generations_to_cache(tmp_path / "s", FULL, COMP, {"model": "m"}, formats=[])
    np.save(files.npy("completions"), np.arange(3))
    with pytest.raises(InputError, match="holds int64 values, not texts"):
        load_generations_from_cache(tmp_path / "s")
    files.metadata.write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_generations_from_cache(tmp_path / "s")
    files.metadata.write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a JSON object, not list"):
        load_generations_from_cache(tmp_path / "s")
    files.metadata.unlink()
    with pytest.raises(InputError, match="metadata file missing"):
        load_generations_from_cache(tmp_path / "s")
