"""`build-dataset` on sentence files written exactly as seed 004 lists them: `embeddings`
[n, d], `hidden_states` [26 layers, n, d], `activations` [26 layers, n, W],
`concept_strength_label`, `is_final_token` — no `layers`, no `average_l0s`. The seed's
commands work as typed and give the seed's X and y (layer L is `hidden_states[L]`); the
output records the numbering and one notice line says so."""

from pathlib import Path

import numpy as np
import pytest

from tolerance import assert_close_to_scale

N_LAYERS, HIDDEN, WIDTH, N_FILES = 26, 8, 16, 6


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from tracekit.console import err_console, out_console

    monkeypatch.setattr(err_console, "width", 1000)
    monkeypatch.setattr(out_console, "width", 1000)


@pytest.fixture()
def seed_files(tmp_path: Path) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(4)
    folder = tmp_path / "dishonesty_100_features"
    folder.mkdir()
    files = []
    for i in range(N_FILES):
        n = 2 + i % 3
        final = np.zeros(n, dtype=bool)
        final[-1] = True
        arrays = {
            "embeddings": rng.normal(size=(n, HIDDEN)).astype(np.float32),
            "hidden_states": rng.normal(size=(N_LAYERS, n, HIDDEN)).astype(np.float32),
            "activations": rng.random((N_LAYERS, n, WIDTH)).astype(np.float32),
            "concept_strength_label": np.int64(i % 4),
            "is_final_token": final,
        }
        np.savez(folder / f"sentence_{i:06d}.npz", **arrays)
        files.append(arrays)
    return folder, files


def run(cli, *args):
    result = cli("build-dataset", *args)
    assert result.exit_code == 0, result.output
    return result


NOTICE = "the files have no 'layers' array (seed 004's layout): layer L is hidden_states[L]"


@pytest.mark.parametrize("layers", ["1-2", "0-5", "0,12,25", "0-2,10,15-17"])
def test_hidden_to_concept_layers_index_hidden_states(cli, seed_files, tmp_path, layers):
    folder, files = seed_files
    out = tmp_path / "h_to_concept.npz"
    result = run(
        cli, "--strategy", "hidden-to-concept", "--input", folder, "--layers", layers,
        "--normalize", "none", "--output", out,
    )  # fmt: skip
    from tracekit.config.types import LayerSpec

    picked = list(LayerSpec.parse(layers).layers)
    d = np.load(out)
    want_x = np.stack([f["hidden_states"][picked, -1, :].reshape(-1) for f in files])
    assert_close_to_scale(d["X"], want_x)
    assert d["y"].tolist() == [int(f["concept_strength_label"]) for f in files]
    assert d["meta_input_layers"].tolist() == picked
    assert str(d["meta_layer_numbering"]) == "seed"
    assert " ".join(result.output.split()).count(NOTICE) == 1


def test_single_layer_standardized_as_the_seed(cli, seed_files, tmp_path):
    folder, files = seed_files
    out = tmp_path / "h12.npz"
    run(cli, "--strategy", "hidden-to-concept", "--input", folder, "--layer", "12",
        "--output", out)  # fmt: skip
    x = np.stack([f["hidden_states"][12, -1, :] for f in files])
    want = (x - x.mean(0)) / x.std(0)
    assert_close_to_scale(np.load(out)["X"], want)


@pytest.mark.parametrize(
    ("strategy", "layer", "feature"),
    [("embedding-to-feature", 12, 1234 % WIDTH), ("hidden-to-feature", 15, 7)],
)
def test_feature_strategies_take_the_seed_layer(
    cli, seed_files, tmp_path, strategy, layer, feature
):
    folder, files = seed_files
    out = tmp_path / "f.npz"
    result = run(
        cli, "--strategy", strategy, "--input", folder, "--target-layer", str(layer),
        "--target-feature", str(feature), "--normalize", "none", "--output", out,
    )  # fmt: skip
    d = np.load(out)
    source = "embeddings" if strategy == "embedding-to-feature" else "hidden_states"
    want_x = np.stack(
        [f["embeddings"][-1] if source == "embeddings" else f["hidden_states"][layer, -1]
         for f in files]
    )  # fmt: skip
    assert_close_to_scale(d["X"], want_x)
    assert_close_to_scale(d["y"], np.array([f["activations"][layer, -1, feature] for f in files]))
    assert int(d["meta_target_layer"]) == layer and str(d["meta_layer_numbering"]) == "seed"
    assert np.isnan(d["meta_average_l0"])  # the seed's files record none: said, not invented
    assert NOTICE in " ".join(result.output.split())


def test_seed_layer_out_of_range_and_mixed_numbering(cli, seed_files, tmp_path):
    folder, _ = seed_files
    result = cli("build-dataset", "--strategy", "hidden-to-concept", "--input", folder,
                 "--layers", "20-26", "--output", tmp_path / "x.npz")  # fmt: skip
    assert result.exit_code == 1
    assert "Layer 26 not found in data" in result.output and "has layers 0-25" in result.output
    with np.load(folder / "sentence_000000.npz") as z:
        arrays = dict(z)
    np.savez(folder / "sentence_000099.npz", **arrays, layers=np.arange(N_LAYERS))
    result = cli("build-dataset", "--strategy", "hidden-to-concept", "--input", folder,
                 "--layers", "1", "--output", tmp_path / "y.npz")  # fmt: skip
    assert result.exit_code == 1
    assert "number layers two ways" in " ".join(result.output.split())
