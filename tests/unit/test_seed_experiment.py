"""Seed 002's experiment folders meet tracekit (no model: everything here is refused or
decided before a model loads)."""

import csv
import json
from pathlib import Path

from seed_data import snapshot, write_seed_experiment
from tracekit.storage.experiment import carry_extra_columns as _carry_extra_columns


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_generate_refuses_a_seed_experiment_and_changes_nothing(cli, tmp_path: Path):
    """The issue's command, on the seed's folder: one line naming what is there, --force."""
    root = write_seed_experiment(tmp_path)
    before = snapshot(root)
    result = cli(
        "generate", "--experiment", "my_exp", "--trait", "my_trait", "--batch_size", "2",
        "--n_examples", "2", "--max_new_tokens", "4", "--experiments-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert "holds outputs that no tracekit generate run wrote there" in text
    assert "responses/pos.csv, responses/neg.csv, activations/all_layers.pt" in text
    assert "--force" in text and "Traceback" not in result.output
    assert snapshot(root) == before


def test_generate_refuses_a_lone_seed_metadata_file_too(cli, tmp_path: Path):
    root = write_seed_experiment(tmp_path)
    for polarity in ("pos", "neg"):
        (root / "responses" / f"{polarity}.csv").unlink()
    (root / "activations" / "all_layers.pt").unlink()
    result = cli(
        "generate", "--experiment", "my_exp", "--trait", "my_trait", "--n_examples", "2",
        "--experiments-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1
    assert "(activations/metadata.json)" in _flat(result.output)


def test_extract_activations_refuses_the_seed_metadata(cli, tmp_path: Path):
    root = write_seed_experiment(tmp_path)
    before = snapshot(root)
    result = cli(
        "extract", "activations", "--experiment", "my_exp", "--trait", "my_trait",
        "--experiments-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert "activations/metadata.json was not written by tracekit" in text and "--force" in text
    assert snapshot(root) == before


def test_extract_activations_refuses_an_ids_or_pt_file_it_would_replace(cli, tmp_path: Path):
    root = write_seed_experiment(tmp_path, with_activations=False)
    (root / "activations").mkdir()
    (root / "activations" / "neg_response_avg.pt").write_bytes(b"kept")
    result = cli(
        "extract", "activations", "--experiment", "my_exp", "--trait", "my_trait",
        "--experiments-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        "output already exists" in _flat(result.output) and "neg_response_avg.pt" in result.output
    )
    assert (root / "activations" / "neg_response_avg.pt").read_bytes() == b"kept"


def test_judge_scores_follow_id_and_response_never_id_alone(tmp_path: Path):
    """A seed CSV (no id column: ids by row order, trait_score 90) and new rows with the same
    ids: a score stays only on the response it judged."""
    root = write_seed_experiment(tmp_path, with_activations=False)
    csv_path = root / "responses" / "pos.csv"
    with csv_path.open(newline="") as handle:
        old = list(csv.DictReader(handle))
    new = [
        {"id": 0, "question": old[0]["question"], "response": "a new answer"},
        {"id": 1, "question": old[1]["question"], "response": old[1]["response"]},
    ]
    merged = _carry_extra_columns(csv_path, new)
    assert "trait_score" not in merged[0]
    assert merged[1]["trait_score"] == "90"
    assert json.dumps(merged)  # plain values
