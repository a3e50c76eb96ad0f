"""`tracekit decode` through the CLI: discovery, options, skipping, errors, no partial output."""

import json
import os
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import tracekit
from seed_data import RunsCommand, write_pickled_cache
from tracekit.jobs.decode import DecodeConfig
from tracekit.storage.generation_cache import CacheFiles, save_generations_to_cache

GEMMA = "gemma/generations/benign/all/n3_t1.0_maxtok100"
SMOL = "smol/generations/50/50_filtered/all/n2_t1.0_maxtok10"


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """No rich line wrapping, so messages with long temp paths stay on one line."""
    from tracekit.console import err_console, out_console

    monkeypatch.setattr(err_console, "width", 1000)
    monkeypatch.setattr(out_console, "width", 1000)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """Two models' caches with only npy + metadata (as written before JSON/MD existed)."""
    base = tmp_path / "experiments"
    save_generations_to_cache(
        base / GEMMA,
        ["f1", "f2", "f3"],
        ["c1", "c2", "c3"],
        {"model": "google/gemma", "generated": "2025-11-13 02:52:15"},
        formats=[],
    )
    save_generations_to_cache(
        base / SMOL, ["g1", "g2"], ["d1", "d2"], {"model": "smol"}, formats=[]
    )
    return base


def outputs(base: Path) -> list[str]:
    return sorted(
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.suffix in (".json", ".md") and not p.name.endswith("_metadata.json")
    )


def test_decodes_every_cache_with_limit(cli, tree: Path):
    result = cli("decode", "--base-dir", tree, "--limit", "2")
    assert result.exit_code == 0, result.output
    assert len(outputs(tree)) == 8
    comp = json.loads((tree / f"{GEMMA}_completions.json").read_text())
    assert comp == ["c1", "c2"]
    md = (tree / f"{GEMMA}_full_texts.md").read_text()
    assert md.startswith(
        "# Full Texts\n\n**Model:** google/gemma\n**Generated:** 2025-11-13 02:52:15\n"
        "**Count:** 2 (showing first 2 of 3)\n\n---\n\n## Full Text 1\n\nf1\n"
    )
    text = flat(result.output)
    assert "decoded" in text and "(2 of 3 items)" in text
    # the summary table: decoded / skipped / failed / total processed
    assert "│ 4 │ 0 │ 0 │ 4/4 │" in text.replace("  ", " ")


def test_model_filter_and_format(cli, tree: Path):
    result = cli("decode", "--base-dir", tree, "--model", "smol", "--format", "md")
    assert result.exit_code == 0, result.output
    assert outputs(tree) == [f"{SMOL}_completions.md", f"{SMOL}_full_texts.md"]
    cli("decode", "--base-dir", tree, "--model", "smol", "--format", "json")
    assert f"{SMOL}_completions.json" in outputs(tree)
    assert not any(o.startswith("gemma") for o in outputs(tree))


def test_existing_outputs_are_skipped_unless_force(cli, tree: Path):
    assert cli("decode", "--base-dir", tree).exit_code == 0
    target = tree / f"{GEMMA}_completions.json"
    target.write_text("[]\n")
    result = cli("decode", "--base-dir", tree, "--json")
    summary = json.loads(result.stdout)
    assert (summary["decoded"], summary["skipped"], summary["total"]) == (0, 4, 4)
    assert target.read_text() == "[]\n"
    result = cli("decode", "--base-dir", tree, "--force", "--json")
    assert json.loads(result.stdout)["decoded"] == 4
    assert json.loads(target.read_text()) == ["c1", "c2", "c3"]


def test_dry_run_writes_nothing(cli, tree: Path):
    result = cli("decode", "--base-dir", tree, "--dry-run")
    assert result.exit_code == 0, result.output
    assert outputs(tree) == []
    assert "would-decode" in result.output and "dry run: nothing written" in flat(result.output)


def test_json_output_lists_each_file(cli, tree: Path):
    result = cli("decode", "--base-dir", tree, "--model", "gemma", "--limit", "1", "--json")
    data = json.loads(result.stdout)
    assert [f["status"] for f in data["files"]] == ["decoded", "decoded"]
    assert data["files"][0]["items"] == 1 and data["files"][0]["total"] == 3


def test_a_seed_pickled_cache_decodes_without_allow_pickle(cli, tmp_path: Path):
    """Object-array .npy files of plain texts (the seeds' caches) go through the restricted
    unpickler: no flag needed, same renderings as for tracekit's own caches."""
    base = tmp_path / "experiments"
    write_pickled_cache(base / SMOL, ["g1", "g2"], ["d1", "d2"], model="smol")
    result = cli("decode", "--base-dir", base)
    assert result.exit_code == 0, result.output
    files = CacheFiles.of(base / SMOL)
    assert json.loads(files.rendered("completions", "json").read_text()) == ["d1", "d2"]
    markdown = files.rendered("full_texts", "md").read_text()
    assert "**Generated:** 2025-11-13 02:52:15 UTC" in markdown and "\ng2\n" in markdown


def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_never_runs(
    cli, tree: Path, tmp_path: Path
):
    marker = tmp_path / "ran"
    write_pickled_cache(tree / SMOL, ["g1"], [RunsCommand(f"touch {marker}")], model="smol")
    files = CacheFiles.of(tree / SMOL)
    result = cli("decode", "--base-dir", tree, "--model", "smol")
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("failed")]
    assert failed == [
        f"failed       {files.npy('completions')} is a pickle that needs "
        f"{os.system.__module__}.system, which tracekit does not load (only containers, "
        "strings, numbers and numpy arrays); nothing from it was run (pass --allow-pickle "
        "(allow_pickle=True) to load it with pickle, which EXECUTES CODE from the file: only "
        "for a file you trust)"
    ]
    assert "error: 1 of 2 cache files could not be decoded" in flat(result.output)
    assert not marker.exists()
    assert not files.rendered("completions", "json").exists()
    assert json.loads(files.rendered("full_texts", "json").read_text()) == ["g1"]


def test_allow_pickle_is_the_opt_in_for_other_classes(cli, tree: Path):
    write_pickled_cache(tree / SMOL, ["g1", "g2"], [Decimal("0.25"), "d2"], model="smol")
    files = CacheFiles.of(tree / SMOL)
    result = cli("decode", "--base-dir", tree, "--model", "smol")
    assert result.exit_code == 1
    assert "needs decimal.Decimal" in flat(result.output) and "--allow-pickle" in result.output
    assert not files.rendered("completions", "json").exists()
    result = cli("decode", "--base-dir", tree, "--model", "smol", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert json.loads(files.rendered("completions", "json").read_text()) == ["0.25", "d2"]


def test_allow_pickle_help_warns_about_code_execution(cli):
    text = flat(cli("decode", "--help").output)
    assert "EXECUTES CODE" in text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "the file is truncated or corrupt"),
        ("bad-metadata", "is not valid JSON"),
    ],
)
def test_bad_inputs_are_one_line_and_leave_nothing(cli, tree: Path, damage: str, message: str):
    files = CacheFiles.of(tree / GEMMA)
    if damage == "truncate":
        data = files.npy("completions").read_bytes()
        files.npy("completions").write_bytes(data[:-4])
    else:
        files.metadata.write_text('{"model": ')
    result = cli("decode", "--base-dir", tree, "--model", "gemma")
    assert result.exit_code == 1
    assert message in flat(result.output)
    assert not files.rendered("completions", "json").exists()
    assert not files.rendered("completions", "md").exists()
    assert not list(tree.rglob(".tmp-*"))


def test_no_caches_and_missing_base_dir(cli, tmp_path: Path):
    (tmp_path / "empty" / "m").mkdir(parents=True)
    result = cli("decode", "--base-dir", tmp_path / "empty")
    assert result.exit_code == 1
    assert "error: no cached generations (*_completions.npy, *_full_texts.npy) under" in flat(
        result.output
    )
    result = cli("decode", "--base-dir", tmp_path / "empty", "--model", "other")
    assert "for model 'other'" in flat(result.output)
    assert "models" not in flat(result.output)  # a folder without caches is no model
    result = cli("decode", "--base-dir", tmp_path / "nope")
    assert result.exit_code == 1 and "base directory not found" in flat(result.output)


EXP_CACHE = "demo/refusal/generations/pos_n3_t1.0_maxtok24"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture()
def generated_tree(tmp_path: Path) -> Path:
    """A cache where ``tracekit generate`` writes it (EXP/TRAIT/generations), with its JSON."""
    base = tmp_path / "demo" / "experiments"
    save_generations_to_cache(
        base / EXP_CACHE, ["p1c1", "p2c2", "p3c3"], ["c1", "c2", "c3"], {"model": HUB_ID},
        formats=["json"],
    )  # fmt: skip
    return base


@pytest.mark.parametrize("model", [HUB_ID, "SmolLM2-135M-Instruct"])
def test_model_matches_generate_caches_by_their_metadata(cli, generated_tree: Path, model):
    result = cli("decode", "--base-dir", generated_tree, "--model", model, "--format", "md")
    assert result.exit_code == 0, result.output
    assert (generated_tree / f"{EXP_CACHE}_completions.md").is_file()


def test_unknown_model_hint_lists_the_caches_models(cli, generated_tree: Path):
    result = cli("decode", "--base-dir", generated_tree, "--model", "demo-model")
    assert result.exit_code == 1
    assert f"hint: models of the caches there: {HUB_ID}" in flat(result.output)


def test_limit_after_generate_renders_markdown_and_says_why_json_is_kept(cli, generated_tree: Path):
    md = cli("decode", "--base-dir", generated_tree, "--format", "md", "--limit", "2")
    assert md.exit_code == 0, md.output
    text = (generated_tree / f"{EXP_CACHE}_completions.md").read_text()
    assert "c1" in text and "c2" in text and "c3" not in text
    kept = cli("decode", "--base-dir", generated_tree, "--format", "json", "--limit", "2")
    assert kept.exit_code == 0
    assert "outputs exist; --force to rewrite them with the first 2 items" in flat(kept.output)
    assert json.loads((generated_tree / f"{EXP_CACHE}_completions.json").read_text()) == [
        "c1", "c2", "c3",
    ]  # fmt: skip


def test_missing_base_dir_points_at_an_experiments_folder_nearby(
    cli, generated_tree: Path, monkeypatch
):
    monkeypatch.chdir(generated_tree.parents[1])  # the repo root after `make demo`
    result = cli("decode")
    assert result.exit_code == 1
    assert "hint: pass --base-dir demo/experiments (found here)" in flat(result.output)


def test_config_file_supplies_options(cli, tree: Path, tmp_path: Path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[decode]\nbase_dir = "{tree}"\nlimit = 1\nformat = "json"\n')
    result = cli("decode", "--config", cfg, "--model", "gemma")
    assert result.exit_code == 0, result.output
    assert json.loads((tree / f"{GEMMA}_completions.json").read_text()) == ["c1"]
    assert not (tree / f"{GEMMA}_completions.md").exists()


def test_bad_limit_and_format_are_usage_errors(cli, tree: Path):
    assert cli("decode", "--base-dir", tree, "--limit", "0").exit_code == 2
    result = cli("decode", "--base-dir", tree, "--format", "html")
    assert result.exit_code == 2 and "html" in result.output
    assert outputs(tree) == []


def test_python_api_matches_cli(tree: Path):
    result = tracekit.decode(DecodeConfig(base_dir=tree, model="smol", format="md"))
    assert result.summary() == {"decoded": 2, "skipped": 0, "failed": 0, "total": 2}
    assert (tree / f"{SMOL}_completions.md").exists()


def _seed_cache(base: Path, metadata: dict | None) -> CacheFiles:
    """A cache as the seeds' ``save_generations_to_cache`` wrote it before JSON/Markdown: two
    ``np.save``d string arrays and, for newer ones only, ``<stem>_metadata.json``."""
    stem = base / "gemma-3-12b/generations/50-50_filtered/all/n3_t1.0_maxtok100"
    stem.parent.mkdir(parents=True)
    np.save(f"{stem}_completions.npy", np.array(["c1", "c2", "c3"]))
    np.save(f"{stem}_full_texts.npy", np.array(["Q1 c1", "Q2 c2", "Q3 c3"]))
    if metadata is not None:
        Path(f"{stem}_metadata.json").write_text(json.dumps(metadata))
    return CacheFiles.of(stem)


def test_a_cache_without_metadata_is_rendered_saying_what_is_unknown(cli, tmp_path: Path):
    files = _seed_cache(tmp_path, None)
    result = cli("decode", "--base-dir", tmp_path, "--limit", "2")
    assert result.exit_code == 0, result.output
    assert "no n3_t1.0_maxtok100_metadata.json: model and time unknown" in flat(result.output)
    markdown = files.rendered("completions", "md").read_text()
    assert "**Model:** unknown (no metadata file)" in markdown
    assert "**Generated:** unknown (no metadata file)" in markdown
    assert "**Count:** 2 (showing first 2 of 3)" in markdown
    assert json.loads(files.rendered("full_texts", "json").read_text()) == ["Q1 c1", "Q2 c2"]
    assert not files.metadata.exists()  # decode does not invent one


def test_a_unix_timestamp_is_shown_as_a_date(cli, tmp_path: Path):
    files = _seed_cache(tmp_path, {"model": "google/gemma-2-27b-it", "timestamp": 1703123456.789})
    result = cli("decode", "--base-dir", tmp_path)
    assert result.exit_code == 0, result.output
    markdown = files.rendered("completions", "md").read_text()
    assert "**Generated:** 2023-12-21 01:50:56 UTC" in markdown
    assert "1703123456" not in markdown
