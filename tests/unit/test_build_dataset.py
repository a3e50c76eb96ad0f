"""`tracekit build-dataset` through the CLI: each strategy, option, error and warning."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "make_example_data", Path(__file__).parents[2] / "examples" / "make_example_data.py"
)
assert _spec is not None and _spec.loader is not None
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

N = 8


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """No rich line wrapping, so messages with long temp paths stay on one line."""
    from tracekit.console import err_console, out_console

    monkeypatch.setattr(err_console, "width", 1000)
    monkeypatch.setattr(out_console, "width", 1000)


def flat(text: str) -> str:
    return " ".join(text.split())


def make(folder: Path, n: int = N, seed: int = 5, **overrides) -> list[dict]:
    """``n`` sentence files (dense layout); ``overrides`` replace arrays in every file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arrays = ex.sentence_arrays(rng, label=i % 4, n_fragments=2 + i % 3)
        arrays.update(overrides)
        np.savez(folder / f"sentence_{i:06d}.npz", **arrays)
        out.append(arrays)
    return out


def final(a: dict) -> int:
    return int(np.flatnonzero(a["is_final_token"])[0])


@pytest.fixture()
def data(tmp_path: Path):
    arrays = make(tmp_path / "feat")
    return tmp_path, arrays


def run_ok(cli, *args):
    result = cli("build-dataset", *args)
    assert result.exit_code == 0, result.output
    return result


def run_err(cli, *args, code: int = 1) -> str:
    result = cli("build-dataset", *args)
    assert result.exit_code == code, result.output
    return flat(result.output)


# --- strategies ---------------------------------------------------------------------------
def test_hidden_to_concept_single_layer_standardized(cli, data):
    tmp, arrays = data
    out = tmp / "new" / "dir" / "c.npz"
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "3",
        "--output",
        out,
    )
    d = np.load(out, allow_pickle=False)
    raw = np.stack([a["hidden_states"][3, final(a)] for a in arrays])
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    np.testing.assert_allclose(d["X"], (raw - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["norm_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(d["norm_std"], std, rtol=1e-6)
    assert d["y"].tolist() == [i % 4 for i in range(N)]
    assert str(d["meta_strategy"]) == "hidden-to-concept"
    assert str(d["meta_input_source"]) == "hidden_states"
    assert d["meta_input_layers"].tolist() == [3]
    assert int(d["meta_input_dims"]) == ex.HIDDEN and int(d["meta_n_samples"]) == N
    assert d["meta_sentence_indices"].tolist() == list(range(N))
    assert str(d["norm_method"]) == "standardize"
    assert "meta_target_layer" not in d.files and "X_train" not in d.files


def test_hidden_to_concept_layers_concatenated_in_order_minmax(cli, data):
    tmp, arrays = data
    out = tmp / "m.npz"
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layers",
        "5,0-1",
        "--normalize",
        "minmax",
        "--output",
        out,
    )
    d = np.load(out)
    raw = np.stack([a["hidden_states"][[0, 1, 5], final(a)].reshape(-1) for a in arrays])
    low, high = raw.min(axis=0), raw.max(axis=0)
    np.testing.assert_allclose(d["X"], (raw - low) / (high - low), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d["norm_min"], low)
    np.testing.assert_array_equal(d["norm_max"], high)
    assert d["meta_input_layers"].tolist() == [0, 1, 5] and d["X"].shape == (N, 3 * ex.HIDDEN)


def test_layers_all_takes_every_layer_in_the_files(cli, data):
    tmp, arrays = data
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layers",
        "all",
        "--normalize",
        "none",
        "--output",
        tmp / "a.npz",
    )
    d = np.load(tmp / "a.npz")
    assert d["meta_input_layers"].tolist() == ex.LAYERS
    np.testing.assert_array_equal(
        d["X"][2], arrays[2]["hidden_states"][:, final(arrays[2])].reshape(-1)
    )
    assert str(d["norm_method"]) == "none" and "norm_mean" not in d.files


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_embedding_to_feature(cli, tmp_path: Path, layout: str):
    folder = tmp_path / layout
    arrays = make(folder)
    if layout == "sparse":
        for i, a in enumerate(arrays):
            sparse = {k: v for k, v in a.items() if k != "activations"}
            sparse.update(ex.to_sparse(a["activations"]))
            np.savez(folder / f"sentence_{i:06d}.npz", **sparse)
    out = tmp_path / "e.npz"
    run_ok(
        cli,
        "--strategy",
        "embedding-to-feature",
        "--input",
        folder,
        "--target-layer",
        "2",
        "--target-feature",
        "3",
        "--normalize",
        "none",
        "--output",
        out,
    )
    d = np.load(out)
    np.testing.assert_array_equal(d["X"], np.stack([a["embeddings"][final(a)] for a in arrays]))
    np.testing.assert_array_equal(
        d["y"], np.array([a["activations"][2, final(a), 3] for a in arrays], dtype=np.float32)
    )
    assert str(d["meta_input_source"]) == "embeddings" and d["meta_input_layers"].tolist() == [0]
    assert (int(d["meta_target_layer"]), int(d["meta_target_feature"])) == (2, 3)
    assert float(d["meta_average_l0"]) == ex.AVERAGE_L0


def test_hidden_to_feature_with_seed_underscore_spellings(cli, data):
    tmp, arrays = data
    out = tmp / "h.npz"
    run_ok(
        cli,
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp / "feat",
        "--target_layer",
        "4",
        "--target_feature",
        "3",
        "--output",
        out,
    )
    d = np.load(out)
    raw = np.stack([a["hidden_states"][4, final(a)] for a in arrays])
    np.testing.assert_allclose(d["X"], (raw - raw.mean(0)) / raw.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d["y"], [a["activations"][4, final(a), 3] for a in arrays])
    assert d["meta_input_layers"].tolist() == [4]


# --- split --------------------------------------------------------------------------------
def test_split_fits_normalization_on_train_only(cli, data):
    tmp, arrays = data
    out = tmp / "s.npz"
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "1",
        "--test-fraction",
        "0.25",
        "--seed",
        "3",
        "--output",
        out,
    )
    d = np.load(out)
    assert "X" not in d.files
    train, test = d["train_indices"], d["test_indices"]
    assert len(test) == 2 and sorted([*train, *test]) == list(range(N))
    raw = np.stack([a["hidden_states"][1, final(a)] for a in arrays])
    mean, std = raw[train].mean(axis=0), raw[train].std(axis=0)
    np.testing.assert_allclose(d["X_train"], (raw[train] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d["X_test"], (raw[test] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d["norm_mean"], mean, rtol=1e-6)
    labels = np.array([i % 4 for i in range(N)])
    assert d["y_train"].tolist() == labels[train].tolist()
    assert d["y_test"].tolist() == labels[test].tolist()
    assert float(d["meta_test_fraction"]) == 0.25 and int(d["meta_seed"]) == 3
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "1",
        "--test-fraction",
        "0.25",
        "--seed",
        "4",
        "--output",
        tmp / "s4.npz",
    )
    assert np.load(tmp / "s4.npz")["test_indices"].tolist() != test.tolist()


@pytest.mark.parametrize("field", ["concept_strength_label", "sentence"])
def test_group_by_keeps_groups_on_one_side(cli, data, field: str):
    tmp, _ = data
    out = tmp / "g.npz"
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "1",
        "--test-fraction",
        "0.25",
        "--group-by",
        field,
        "--output",
        out,
    )
    d = np.load(out)
    if field == "concept_strength_label":
        assert not set(d["y_train"].tolist()) & set(d["y_test"].tolist())
    sent = d["meta_sentence_indices"]
    assert not set(sent[d["train_indices"]]) & set(sent[d["test_indices"]])
    assert str(d["meta_group_by"]) == field


def test_group_by_unknown_field(cli, data):
    tmp, _ = data
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "1",
        "--test-fraction",
        "0.5",
        "--group-by",
        "speaker",
        "--output",
        tmp / "x.npz",
    )
    assert "has no 'speaker' array, which --group-by speaker needs" in text
    assert not (tmp / "x.npz").exists()


# --- output, json, config -----------------------------------------------------------------
def test_existing_output_needs_force_and_json_output(cli, data):
    tmp, _ = data
    out = tmp / "o.npz"
    out.write_bytes(b"old")
    args = [
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "2",
        "--output",
        out,
    ]
    text = run_err(cli, *args)
    assert "error: output already exists" in text and "--force" in text
    assert out.read_bytes() == b"old"
    result = run_ok(cli, *args, "--force", "--json")
    summary = json.loads(result.stdout)
    assert summary["n_samples"] == N and summary["x_shape"] == [N, ex.HIDDEN]
    assert summary["input_layers"] == [2] and summary["norm_method"] == "standardize"
    assert np.load(out)["X"].shape == (N, ex.HIDDEN)


def test_table_output_and_config_file(cli, data):
    tmp, _ = data
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        f"build-dataset:\n  strategy: hidden-to-feature\n  input: {tmp / 'feat'}\n"
        "  target-layer: 1\n  target-feature: 3\n  normalize: minmax\n"
    )
    result = run_ok(cli, "--config", cfg, "--output", tmp / "cfg.npz")
    text = flat(result.output)
    assert "hidden-to-feature" in text and "minmax" in text and f"{N} x {ex.HIDDEN}" in text
    assert "layer 1, feature 3 (SAE width 64, average L0 12)" in text
    assert str(np.load(tmp / "cfg.npz")["norm_method"]) == "minmax"


# --- option errors (exit 2, before any file is read) --------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "1", "--layers", "2-3"], "--layer and --layers are mutually exclusive"),
        ([], "needs --layer L (one layer) or --layers SPEC"),
        (["--layer", "1", "--target-layer", "1"], "--target-layer and --target-feature apply"),
        (["--layer", "1", "--average-l0", "12"], "--average-l0 applies to the *-to-feature"),
        (["--layer", "1", "--group-by", "sentence"], "--group-by needs --test-fraction"),
        (
            ["--layer", "1", "--test-fraction", "1.5"],
            "--test-fraction: Input should be less than 1",
        ),
        (["--layers", "5-2"], "invalid layer range '5-2'"),
    ],
)
def test_concept_option_errors(cli, data, args, message):
    tmp, _ = data
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--output",
        tmp / "x.npz",
        *args,
        code=2,
    )
    assert message in text
    assert not (tmp / "x.npz").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-layer", "1"], "--strategy hidden-to-feature needs --target-feature"),
        (["--target-feature", "1"], "needs --target-layer"),
        (
            ["--target-layer", "1", "--target-feature", "1", "--layer", "2"],
            "takes --target-layer, not --layer/--layers",
        ),
    ],
)
def test_feature_option_errors(cli, data, args, message):
    tmp, _ = data
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp / "feat",
        "--output",
        tmp / "x.npz",
        *args,
        code=2,
    )
    assert message in text


def test_required_options_and_output_suffix(cli, data):
    tmp, _ = data
    assert "missing option --strategy" in run_err(
        cli, "--input", tmp / "feat", "--output", tmp / "x.npz", "--layer", "1", code=2
    )
    assert "--output must be a .npz file" in run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layer",
        "1",
        "--output",
        tmp / "x.csv",
        code=2,
    )
    assert run_err(cli, "--strategy", "bogus", "--input", tmp / "feat", code=2)


# --- data errors (exit 1, nothing written) ------------------------------------------------
def test_no_files_and_missing_input(cli, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    base = ["--strategy", "hidden-to-concept", "--layer", "1", "--output", tmp_path / "x.npz"]
    assert "No sentence_*.npz files found in" in run_err(cli, *base, "--input", tmp_path / "empty")
    assert "input directory not found" in run_err(cli, *base, "--input", tmp_path / "nope")
    assert not (tmp_path / "x.npz").exists()


def test_layer_not_found(cli, data):
    tmp, _ = data
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp / "feat",
        "--layers",
        "2,9",
        "--output",
        tmp / "x.npz",
    )
    assert "Layer 9 not found in data" in text and "has layers 0-6" in text
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp / "feat",
        "--target-layer",
        "12",
        "--target-feature",
        "0",
        "--output",
        tmp / "x.npz",
    )
    assert "Layer 12 not found in data" in text
    assert not (tmp / "x.npz").exists()


def test_feature_out_of_range_uses_width_in_data(cli, data):
    tmp, _ = data
    text = run_err(
        cli,
        "--strategy",
        "embedding-to-feature",
        "--input",
        tmp / "feat",
        "--target-layer",
        "1",
        "--target-feature",
        "64",
        "--output",
        tmp / "x.npz",
    )
    assert "--target-feature 64 is out of range: Feature index must be 0-63" in text


def test_no_sae_activations(cli, tmp_path: Path):
    rng = np.random.default_rng(0)
    (tmp_path / "plain").mkdir()
    arrays = ex.sentence_arrays(rng, label=1, n_fragments=3)
    for key in ("activations", "average_l0s", "sae_width"):
        del arrays[key]
    np.savez(tmp_path / "plain" / "sentence_000000.npz", **arrays)
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp_path / "plain",
        "--target-layer",
        "1",
        "--target-feature",
        "3",
        "--output",
        tmp_path / "x.npz",
    )
    assert "has no SAE activations" in text and "hidden-to-concept" in text
    run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "plain",
        "--layer",
        "1",
        "--output",
        tmp_path / "ok.npz",
    )


def test_average_l0_check(cli, data):
    tmp, _ = data
    args = [
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp / "feat",
        "--target-layer",
        "1",
        "--target-feature",
        "3",
    ]
    text = run_err(cli, *args, "--average-l0", "84", "--output", tmp / "x.npz")
    assert (
        "average_l0 mismatch: --average-l0 84 but the files' SAE at layer 1 has average L0 12"
        in text
    )
    # SAEs are named by their rounded L0
    run_ok(cli, *args, "--average-l0", "12.3", "--output", tmp / "ok.npz")


def test_average_l0_differs_between_files(cli, tmp_path: Path):
    make(tmp_path / "mix", n=2)
    make(tmp_path / "other", n=1, average_l0s=np.full(len(ex.LAYERS), 40.0, dtype=np.float32))
    (tmp_path / "other" / "sentence_000000.npz").rename(tmp_path / "mix" / "sentence_000002.npz")
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp_path / "mix",
        "--target-layer",
        "1",
        "--target-feature",
        "3",
        "--output",
        tmp_path / "x.npz",
    )
    assert (
        "average_l0 mismatch: the files record different average L0s for layer 1 (12, 40)" in text
    )


def test_nan_average_l0_means_not_recorded_not_a_mismatch(cli, tmp_path: Path):
    make(tmp_path / "mix", n=2)
    make(tmp_path / "nan", n=1, average_l0s=np.full(len(ex.LAYERS), np.nan, dtype=np.float32))
    (tmp_path / "nan" / "sentence_000000.npz").rename(tmp_path / "mix" / "sentence_000002.npz")
    args = ["--strategy", "hidden-to-feature", "--input", tmp_path / "mix"]
    args += ["--target-layer", "1", "--target-feature", "3", "--output", tmp_path / "ok.npz"]
    run_ok(cli, *args)
    assert float(np.load(tmp_path / "ok.npz")["meta_average_l0"]) == 12.0


def test_missing_average_l0s_warns_or_fails(cli, tmp_path: Path):
    arrays = make(tmp_path / "nol0", n=3)
    for i, a in enumerate(arrays):
        del a["average_l0s"]
        np.savez(tmp_path / "nol0" / f"sentence_{i:06d}.npz", **a)
    args = [
        "--strategy",
        "hidden-to-feature",
        "--input",
        tmp_path / "nol0",
        "--target-layer",
        "1",
        "--target-feature",
        "3",
    ]
    result = run_ok(cli, *args, "--output", tmp_path / "ok.npz")
    assert "record no average_l0s for layer 1" in flat(result.output)
    assert np.isnan(np.load(tmp_path / "ok.npz")["meta_average_l0"])
    text = run_err(cli, *args, "--average-l0", "12", "--output", tmp_path / "x.npz")
    assert "average_l0 mismatch: --average-l0 12 was given but the files record no" in text


def test_fewer_samples_warns_and_zero_samples_fails(cli, tmp_path: Path):
    arrays = make(tmp_path / "few", n=4)
    arrays[2]["is_final_token"][:] = False
    np.savez(tmp_path / "few" / "sentence_000002.npz", **arrays[2])
    result = run_ok(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "few",
        "--layer",
        "0",
        "--output",
        tmp_path / "f.npz",
    )
    assert "Only 3 samples (expected ~4): 1 sentence file(s) have no final token" in flat(
        result.output
    )
    assert np.load(tmp_path / "f.npz")["meta_sentence_indices"].tolist() == [0, 1, 3]
    for i, a in enumerate(make(tmp_path / "none", n=2)):
        a["is_final_token"][:] = False
        np.savez(tmp_path / "none" / f"sentence_{i:06d}.npz", **a)
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "none",
        "--layer",
        "0",
        "--output",
        tmp_path / "n.npz",
    )
    assert "no final tokens in 2 sentence files" in text


def test_inconsistent_files(cli, tmp_path: Path):
    make(tmp_path / "bad", n=1)
    make(tmp_path / "wide", n=1, seed=9)
    rng = np.random.default_rng(1)
    wide = ex.sentence_arrays(rng, label=0, n_fragments=2, hidden=8)
    np.savez(tmp_path / "bad" / "sentence_000001.npz", **wide)
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "bad",
        "--layer",
        "1",
        "--output",
        tmp_path / "x.npz",
    )
    assert "hidden size 8 differs from 16 in" in text
    assert "all sentence files must come from one model" in text
    text = run_err(
        cli,
        "--strategy",
        "embedding-to-feature",
        "--input",
        tmp_path / "bad",
        "--target-layer",
        "1",
        "--target-feature",
        "3",
        "--output",
        tmp_path / "x.npz",
    )
    assert "embedding size 8 differs from 16 in" in text
    assert "sentence_000000.npz" in text  # the first file, whose size the others must have
    nolabel = ex.sentence_arrays(rng, label=0, n_fragments=2)
    del nolabel["concept_strength_label"]
    np.savez(tmp_path / "wide" / "sentence_000001.npz", **nolabel)
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "wide",
        "--layer",
        "1",
        "--output",
        tmp_path / "x.npz",
    )
    assert "has no 'concept_strength_label' array" in text


def test_corrupt_and_pickled_files(cli, tmp_path: Path):
    make(tmp_path / "c", n=2)
    (tmp_path / "c" / "sentence_000001.npz").write_bytes(b"garbage")
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "c",
        "--layer",
        "1",
        "--output",
        tmp_path / "x.npz",
    )
    assert "sentence_000001.npz: not a valid .npz" in text
    arrays = make(tmp_path / "p", n=1)[0]
    arrays["layers"] = np.array(list(ex.LAYERS), dtype=object)
    np.savez(tmp_path / "p" / "sentence_000000.npz", **arrays)
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "p",
        "--layer",
        "1",
        "--output",
        tmp_path / "x.npz",
    )
    assert "array 'layers' is a pickled object array" in text
    assert not (tmp_path / "x.npz").exists()


def test_python_api_and_save_dataset(tmp_path: Path, data):
    import tracekit

    tmp, _ = data
    result = tracekit.build_dataset(
        tracekit.BuildDatasetConfig(
            strategy="hidden-to-concept", input=tmp / "feat", output=tmp / "api.npz", layers="0-1"
        )
    )
    assert result.n_samples == N and result.x_shape == (N, 2 * ex.HIDDEN)
    Xn, params = tracekit.normalize_features(np.ones((2, 3), dtype=np.float32), "minmax")
    path = tracekit.save_dataset(
        Xn, np.array([0, 1]), {"strategy": "custom", **params}, tmp / "x" / "c.npz"
    )
    d = np.load(path)
    assert str(d["meta_strategy"]) == "custom" and str(d["norm_method"]) == "minmax"
    assert d["norm_min"].tolist() == [1, 1, 1] and d["X"].tolist() == [[0, 0, 0]] * 2


def _damage(arrays: dict, how: str) -> dict:
    if how == "fragments":
        arrays["is_final_token"] = np.array([False] * 5 + [True])
    elif how == "embedding-size":
        arrays["embeddings"] = np.zeros((arrays["embeddings"].shape[0], 3), dtype=np.float32)
    elif how == "activations-ndim":
        arrays["activations"] = arrays["activations"][0]
    elif how == "sae-layers":
        arrays["activations"] = arrays["activations"][:2]
    elif how == "label-shape":
        arrays["concept_strength_label"] = np.array([1, 2])
    return arrays


@pytest.mark.parametrize(
    ("how", "strategy_args", "message"),
    [
        (
            "fragments",
            ["hidden-to-concept", "--layer", "1"],
            "'hidden_states' has 2 fragments but 'is_final_token' has 6",
        ),
        (
            "embedding-size",
            ["embedding-to-feature", "--target-layer", "1", "--target-feature", "0"],
            "embedding size 3 differs from 16",
        ),
        (
            "activations-ndim",
            ["hidden-to-feature", "--target-layer", "1", "--target-feature", "0"],
            "expected [layers, fragments, width]",
        ),
        (
            "sae-layers",
            ["hidden-to-feature", "--target-layer", "1", "--target-feature", "0"],
            "SAE activations cover 2 layers but 'layers' lists 7",
        ),
        (
            "label-shape",
            ["hidden-to-concept", "--layer", "1"],
            "'concept_strength_label' should hold one value but has shape (2,)",
        ),
    ],
)
def test_malformed_second_file(cli, tmp_path: Path, how, strategy_args, message):
    arrays = make(tmp_path / "d", n=2)
    np.savez(tmp_path / "d" / "sentence_000001.npz", **_damage(arrays[0], how))
    text = run_err(
        cli, "--strategy", *strategy_args, "--input", tmp_path / "d", "--output", tmp_path / "x.npz"
    )
    assert message in text
    assert not (tmp_path / "x.npz").exists()


def test_group_split_impossible(cli, tmp_path: Path):
    make(tmp_path / "one", n=2)
    text = run_err(
        cli,
        "--strategy",
        "hidden-to-concept",
        "--input",
        tmp_path / "one",
        "--layer",
        "1",
        "--test-fraction",
        "0.5",
        "--group-by",
        "model",
        "--output",
        tmp_path / "x.npz",
    )
    assert "cannot split by group: all 2 samples share one group" in text


def test_example_data_records_the_weights_of_the_model_it_names(tmp_path: Path):
    """As every real writer: the embedded model's quantization and GGUF hash, in the sentence
    files of each layout and in the generation caches' metadata."""
    from embedded_weights import embedded_weights
    from tracekit.storage.sentences import SentenceFile, sentence_provenance

    assert ex.main([str(tmp_path), "--sentences", "2"]) == 0
    want = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", **embedded_weights()}
    files = sorted(tmp_path.glob("features*/sentence_*.npz"))
    assert len(files) == 6
    for path in files:
        assert sentence_provenance(SentenceFile(path)) == want
    caches = sorted((tmp_path / "experiments").rglob("*_metadata.json"))
    assert len(caches) == 2
    for path in caches:
        metadata = json.loads(path.read_text())
        assert {k: metadata[k] for k in want} == want


def test_example_data_walkthrough(cli, tmp_path: Path):
    """README's walk-through: example data -> decode -> all three dataset kinds, both layouts."""
    assert ex.main([str(tmp_path), "--sentences", "6"]) == 0
    assert cli("decode", "--base-dir", tmp_path / "experiments").exit_code == 0
    assert len(list((tmp_path / "experiments").rglob("*_completions.md"))) == 2
    runs = {
        "emb": ["embedding-to-feature", "--target-layer", "2", "--target-feature", "3"],
        "hid": ["hidden-to-feature", "--target-layer", "2", "--target-feature", "3"],
        "con": ["hidden-to-concept", "--layers", "0-6"],
    }
    for name, args in runs.items():
        outs = []
        for folder in ("features", "features_sparse"):
            out = tmp_path / "ds" / f"{name}_{folder}.npz"
            run_ok(cli, "--strategy", *args, "--input", tmp_path / folder, "--output", out)
            outs.append(np.load(out))
        np.testing.assert_array_equal(outs[0]["X"], outs[1]["X"])
        np.testing.assert_array_equal(outs[0]["y"], outs[1]["y"])
    run_ok(
        cli,
        "--strategy",
        *runs["con"],
        "--input",
        tmp_path / "features_no_sae",
        "--output",
        tmp_path / "ds" / "plain.npz",
    )
    assert "has no SAE activations" in run_err(
        cli,
        "--strategy",
        *runs["emb"],
        "--input",
        tmp_path / "features_no_sae",
        "--output",
        tmp_path / "ds" / "x.npz",
    )
