"""Seed 002's commands and data through `generate` on the embedded model (tiny settings)."""

import csv
import json
from pathlib import Path

import pytest

from seed_data import write_seed_experiment

pytestmark = pytest.mark.integration


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_force_over_a_seed_experiment_keeps_no_old_score(cli, tmp_path: Path):
    """The issue's command with --force: new rows, and no trait_score from the old ones."""
    root = write_seed_experiment(tmp_path)
    result = cli(
        "generate", "--experiment", "my_exp", "--trait", "my_trait", "--batch_size", "2",
        "--n_examples", "2", "--max_new_tokens", "4", "--layers", "0,30", "--force",
        "--experiments-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for polarity in ("pos", "neg"):
        rows = _rows(root / "responses" / f"{polarity}.csv")
        assert [r["id"] for r in rows] == ["0", "1"]
        assert "trait_score" not in rows[0]
        assert not any(r["response"].startswith("old ") for r in rows)
    assert not (root / "activations" / "all_layers.pt").exists()
    meta = json.loads((root / "activations" / "metadata.json").read_text())
    assert meta["poolings"]["response_avg"]["layers"] == [0, 30]


def test_the_seed_two_stage_commands(cli, tmp_path: Path):
    """Seed 002's 'Two-Stage Extraction', spelled as the seed spells it."""
    args = ["--experiment", "my_exp", "--trait", "refusal", "--experiments-dir", tmp_path]
    stage1 = cli(
        "generate", *args, "--batch_size", "1", "--n_examples", "1", "--max_new_tokens", "2",
        "--extract_activations", "False",
    )  # fmt: skip
    assert stage1.exit_code == 0, stage1.output
    acts = tmp_path / "my_exp" / "refusal" / "activations"
    assert not acts.exists() or not list(acts.glob("*.npy"))
    stage2 = cli("extract", "activations", *args, "--layers", "0,30")
    assert stage2.exit_code == 0, stage2.output
    assert (acts / "pos_response_avg.npy").is_file() and (acts / "neg_response_avg.npy").is_file()
