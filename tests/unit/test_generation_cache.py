"""The generation cache format: npy (no pickle) + JSON + Markdown + metadata, read back."""

import json
from pathlib import Path

import numpy as np
import pytest

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


def test_pickled_object_cache_is_refused_unless_allowed(tmp_path: Path):
    files = CacheFiles.of(tmp_path / "old")
    np.save(files.npy("completions"), np.array(COMP, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeInputError, match="pickled object array; loading it would execute"):
        read_text_array(files.npy("completions"))
    assert read_text_array(files.npy("completions"), allow_pickle=True) == (COMP, 3)


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
