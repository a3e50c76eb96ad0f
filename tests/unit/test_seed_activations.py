"""Seed 002's activations/all_layers.pt: imported into tracekit's layout with one command, then
read by `extract vectors` (no model needed for either)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seed_data import HIDDEN, N_LAYERS, N_ROWS, write_seed_experiment
from tolerance import assert_close_to_scale


def _flat(text: str) -> str:
    return " ".join(text.split())


def _args(tmp_path: Path) -> list:
    return ["--experiment", "my_exp", "--trait", "my_trait", "--experiments-dir", tmp_path]


def test_extract_vectors_on_seed_data_says_how_to_import(cli, tmp_path: Path):
    write_seed_experiment(tmp_path)
    result = cli("extract", "vectors", *_args(tmp_path))
    assert result.exit_code == 1
    text = _flat(result.output)
    assert "activations not found" in text
    assert "tracekit extract import --experiment my_exp --trait my_trait" in text


def test_import_then_vectors_match_the_seed_tensor(cli, tmp_path: Path):
    root = write_seed_experiment(tmp_path)
    seed = torch.load(root / "activations" / "all_layers.pt", weights_only=True).numpy()
    result = cli("extract", "import", *_args(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == {"pos": N_ROWS, "neg": N_ROWS}
    acts = root / "activations"
    assert np.array_equal(np.load(acts / "pos_response_avg.npy"), seed[:N_ROWS])
    assert np.array_equal(np.load(acts / "neg_response_avg.npy"), seed[N_ROWS:])
    assert np.load(acts / "neg_response_avg_ids.npy").tolist() == list(range(N_ROWS))
    meta = json.loads((acts / "metadata.json").read_text())
    entry = meta["poolings"]["response_avg"]
    assert entry["layers"] == list(range(N_LAYERS)) and entry["source"] == "seed all_layers.pt"
    assert meta["seed_metadata"] == {"model": "google/gemma-2-2b-it", "n_examples": 8}
    assert "0 = embedding output" in meta["layer_indexing"]
    assert (acts / "all_layers.pt").is_file()  # left in place

    vectors = cli("extract", "vectors", *_args(tmp_path), "--json", "--no-plot")
    assert vectors.exit_code == 0, vectors.output
    summary = json.loads(vectors.stdout)
    assert summary["n_pairs"] == N_ROWS and summary["judged"] is True  # trait_score 90 / 10
    saved = np.load(root / "vectors" / "mean_diff_response_avg.npy")
    expected = seed[:N_ROWS].mean(axis=0) - seed[N_ROWS:].mean(axis=0)
    assert saved.shape == (N_LAYERS, HIDDEN)
    assert_close_to_scale(saved, expected)


def test_first_layer_numbers_block_outputs(cli, tmp_path: Path):
    root = write_seed_experiment(tmp_path)
    result = cli("extract", "import", *_args(tmp_path), "--first-layer", "1")
    assert result.exit_code == 0, result.output
    assert "layers 1-31" in _flat(result.output)
    meta = json.loads((root / "activations" / "metadata.json").read_text())
    assert meta["poolings"]["response_avg"]["layers"] == list(range(1, N_LAYERS + 1))


def test_import_refuses_to_overwrite_and_a_row_count_mismatch(cli, tmp_path: Path):
    root = write_seed_experiment(tmp_path)
    assert cli("extract", "import", *_args(tmp_path)).exit_code == 0
    again = cli("extract", "import", *_args(tmp_path))
    assert again.exit_code == 1 and "output already exists" in _flat(again.output)
    torch.save(torch.zeros(5, 2, 3), root / "activations" / "all_layers.pt")
    bad = cli("extract", "import", *_args(tmp_path), "--force")
    assert bad.exit_code == 1
    assert "holds 5 rows but responses/pos.csv and neg.csv hold 4 + 4" in _flat(bad.output)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (lambda p: torch.save({"acts": torch.zeros(8, 2, 3)}, p), "not a tensor [n_examples"),
        (lambda p: torch.save(torch.zeros(8, 3), p), "holds (8, 3), not a tensor"),
        (lambda p: p.write_bytes(b"not a tensor file"), "cannot read"),
    ],
)
def test_a_file_that_is_not_the_seed_tensor_is_one_line(cli, tmp_path: Path, content, fragment):
    root = write_seed_experiment(tmp_path)
    content(root / "activations" / "all_layers.pt")
    result = cli("extract", "import", *_args(tmp_path))
    assert result.exit_code == 1 and fragment in _flat(result.output)
    assert not (root / "activations" / "pos_response_avg.npy").exists()
