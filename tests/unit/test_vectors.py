"""`tracekit extract vectors` on synthetic experiments (no model): the judge filter as
persona_vectors applies it, and which rule the summary reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tolerance import assert_close_to_scale


def _flat(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def write_experiment(base, acts, trait_scores=None, coherence=None, layers=None, experiment="e"):
    """Experiment ``e``, trait ``t`` under ``base`` with pos/neg activations ``acts`` (rows in
    id order) and optional per-row score columns ('' = an empty cell)."""
    from tracekit.storage.activation_slots import save_activations
    from tracekit.storage.atomic import write_json
    from tracekit.storage.experiment import TraitPaths, write_responses_csv

    paths = TraitPaths.of(base, experiment, "t")
    for polarity in ("pos", "neg"):
        n = len(acts[polarity])
        rows = []
        for i in range(n):
            row = {"id": i, "question": f"q{i}", "prompt": "p", "response": "r"}
            if trait_scores is not None:
                row["trait_score"] = trait_scores[polarity][i]
            if coherence is not None:
                row["coherence_score"] = coherence[polarity][i]
            rows.append(row)
        write_responses_csv(paths.responses_csv(polarity), rows)
        save_activations(paths, polarity, list(range(n)), {"response_avg": acts[polarity]})
    if layers is not None:
        write_json(
            paths.activations_metadata,
            {"model": "m", "poolings": {"response_avg": {"layers": layers, "source": "test"}}},
        )
    return paths


def test_a_neg_row_without_a_coherence_score_drops_its_pair(tmp_path, cli):
    rng = np.random.default_rng(0)
    acts = {"pos": rng.normal(size=(3, 2, 8)), "neg": rng.normal(size=(3, 2, 8))}
    paths = write_experiment(
        tmp_path, acts,
        trait_scores={"pos": [90, 90, 90], "neg": [10, 10, 10]},
        coherence={"pos": [80, 80, 80], "neg": [80, "", 80]},
    )  # fmt: skip
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t",
                 "--experiments-dir", tmp_path, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_pairs"] == 2
    assert summary["dropped"] == {"no coherence score": 1}
    vectors = np.load(paths.vectors_dir / "mean_diff_response_avg.npy")
    assert_close_to_scale(vectors, acts["pos"][[0, 2]].mean(0) - acts["neg"][[0, 2]].mean(0))


@pytest.mark.parametrize(
    ("neg_rule", "kept", "limit"),
    [(None, [0, 3], "neg trait < 40 (neg rule mirrored"), ("same", [0, 1, 3], "neg trait < 60")],
)
def test_neg_rule_mirrored_by_default_and_same_on_request(tmp_path, cli, neg_rule, kept, limit):
    """At --threshold 60 persona_vectors keeps neg < 40; the 'same' rule keeps neg < 60."""
    rng = np.random.default_rng(1)
    acts = {"pos": rng.normal(size=(4, 2, 8)), "neg": rng.normal(size=(4, 2, 8))}
    # id 1: neg 45 (between the two limits); id 2: pos 55 fails either way
    paths = write_experiment(
        tmp_path, acts, trait_scores={"pos": [90, 70, 55, 61], "neg": [10, 45, 5, 39.9]}
    )
    args = ["--neg-rule", neg_rule] if neg_rule else []
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--threshold", "60",
                 "--experiments-dir", tmp_path, *args)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(kept)} pairs" in _flat(result)
    assert f"judge filter: pos trait >= 60, {limit}" in " ".join(result.stderr.split())
    meta = json.loads((paths.vectors_dir / "mean_diff_response_avg_metadata.json").read_text())
    assert meta["pair_ids"] == kept
    assert meta["neg_rule"] == (neg_rule or "mirrored")
    assert "no coherence filter" in meta["judge_filter"]


def test_select_pairs_matches_persona_vectors_mask():
    """The same pairs as generate_vec.py's pandas mask (pos >= T, neg < 100 - T, coherence >=
    50 on both sides; an empty cell compares False) on random judged rows."""
    from tracekit.vectors.mean_diff import select_pairs

    rng = np.random.default_rng(2)
    n, threshold = 200, 65.0
    table = {
        key: np.where(rng.random(n) < 0.1, np.nan, rng.uniform(0, 100, n))
        for key in ("pos_t", "neg_t", "pos_c", "neg_c")
    }

    def rows(side):
        return [
            {"id": i, "trait_score": "" if np.isnan(t) else t,
             "coherence_score": "" if np.isnan(c) else c}
            for i, (t, c) in enumerate(zip(table[f"{side}_t"], table[f"{side}_c"], strict=True))
        ]  # fmt: skip

    with np.errstate(invalid="ignore"):
        mask = (
            (table["pos_t"] >= threshold)
            & (table["neg_t"] < 100 - threshold)
            & (table["pos_c"] >= 50)
            & (table["neg_c"] >= 50)
        )
    ids, rule, _ = select_pairs(rows("pos"), rows("neg"), threshold, 50.0)
    assert ids == np.flatnonzero(mask).tolist() and len(ids) > 3
    assert rule is not None and "neg trait < 35" in rule


def _planted(rng, n_pairs=12, layers=3, hidden=6):
    """Pairs whose differences spread mostly along one known direction per layer."""
    direction = rng.normal(size=(layers, hidden))
    neg = rng.normal(size=(n_pairs, layers, hidden))
    strength = rng.uniform(0.5, 3.0, size=(n_pairs, layers, 1))
    pos = neg + strength * direction + 0.1 * rng.normal(size=neg.shape)
    return pos, neg


def test_pca_diff_is_sklearn_pca_of_the_paired_differences_signed_by_the_mean(tmp_path, cli):
    from sklearn.decomposition import PCA

    pos, neg = _planted(np.random.default_rng(3))
    paths = write_experiment(tmp_path, {"pos": pos, "neg": neg}, layers=[0, 4, 9])
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--method",
                 "pca_diff", "--experiments-dir", tmp_path, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    got = np.load(paths.vectors_dir / "pca_diff_response_avg.npy")
    for layer in range(3):
        diffs = pos[:, layer] - neg[:, layer]
        want = PCA(n_components=1).fit(diffs).components_[0]
        want = want if want @ diffs.mean(0) > 0 else -want
        assert_close_to_scale(got[layer], want)
    summary = json.loads(result.stdout)
    assert summary["method"] == "pca_diff" and [s["layer"] for s in summary["layers"]] == [0, 4, 9]
    assert all(abs(s["norm"] - 1) < 1e-6 for s in summary["layers"])


def test_pca_diff_sign_follows_the_mean_difference_when_pos_and_neg_swap():
    from tracekit.vectors.methods import pca_diff_vectors

    pos, neg = _planted(np.random.default_rng(4))
    forward, backward = pca_diff_vectors(pos, neg), pca_diff_vectors(neg, pos)
    assert_close_to_scale(backward, -forward)
    mean = (pos - neg).mean(0)
    assert ((forward * mean).sum(-1) > 0).all()


def _logistic_newton(x, y, c):
    """Reference: argmin 0.5|w|^2 + c sum log(1 + exp(-s (x.w + b))), s = +-1, b unpenalized,
    by Newton's method in numpy."""
    n, d = x.shape
    xt = np.c_[x, np.ones(n)]
    s = 2 * y - 1
    theta = np.zeros(d + 1)
    penalty = np.r_[np.ones(d), 0.0]
    for _ in range(100):
        z = xt @ theta
        p = 1 / (1 + np.exp(s * z))  # sigma(-s z)
        grad = penalty * theta - c * xt.T @ (s * p)
        q = 1 / (1 + np.exp(-z))
        hess = np.diag(penalty) + c * (xt.T * (q * (1 - q))) @ xt
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta[:d]


def test_probe_is_the_unit_weight_of_l2_logistic_regression(tmp_path, cli):
    """Against a numpy Newton solve of the same objective on the same scaled activations."""
    rng = np.random.default_rng(5)
    pos, neg = _planted(rng, n_pairs=15)
    pos = pos * 40.0 + 7.0  # a residual-stream-like scale and offset must not change the answer
    neg = neg * 40.0 + 7.0
    paths = write_experiment(tmp_path, {"pos": pos, "neg": neg})
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--method",
                 "probe", "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    got = np.load(paths.vectors_dir / "probe_response_avg.npy")
    for layer in range(pos.shape[1]):
        x = np.concatenate([pos[:, layer], neg[:, layer]])
        x = x - x.mean(0)
        x = x / x.std()
        w = _logistic_newton(x, np.r_[np.ones(len(pos)), np.zeros(len(neg))], c=1.0)
        assert_close_to_scale(got[layer], w / np.linalg.norm(w))
    assert "probe" in _flat(result) and "15 pairs" in _flat(result)


def test_pca_diff_with_one_pair_is_refused_in_one_line(tmp_path, cli):
    pos, neg = _planted(np.random.default_rng(6), n_pairs=1)
    write_experiment(tmp_path, {"pos": pos, "neg": neg})
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--method",
                 "pca_diff", "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 1
    assert "--method pca_diff needs at least 2 pairs; 1 passed the filters" in _flat(result)


def test_an_unknown_method_is_an_option_error(tmp_path, cli):
    pos, neg = _planted(np.random.default_rng(7), n_pairs=2)
    write_experiment(tmp_path, {"pos": pos, "neg": neg})
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--method",
                 "lda", "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 2
    assert "error: --method lda: not one of mean_diff, pca_diff, probe" in _flat(result)


def test_the_separation_table_gets_a_png_beside_its_json(tmp_path, cli):
    from matplotlib.image import imread

    pos, neg = _planted(np.random.default_rng(8))
    paths = write_experiment(tmp_path, {"pos": pos, "neg": neg}, layers=[0, 4, 9])
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t",
                 "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    png = paths.vectors_dir / "mean_diff_response_avg_separation.png"
    assert f"separation plot: {png}" in result.stdout.replace("\n", "")
    image = imread(png)
    assert image.shape[:2] == (456, 1200) and image[..., :3].std() > 0  # drawn, not blank
    # --no-plot writes none; --force is needed to replace the other outputs, not a missing PNG
    png.unlink()
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--no-plot",
                 "--force", "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not png.exists()


def _gguf_string(reader, key):
    field = reader.get_field(key)
    return bytes(field.parts[field.data[0]]).decode()


def _gguf_int(reader, key):
    field = reader.get_field(key)
    return int(field.parts[field.data[0]][0])


def test_gguf_export_reads_back_with_llama_cpp_layer_numbers(tmp_path, cli):
    """tracekit layer i (after block i-1) is llama.cpp's direction.{i-1} (added after block
    i-1); layers 0 and 1 have no slot and are reported, not written."""
    import gguf

    from tracekit.storage.atomic import write_json

    layers = [0, 1, 2, 7, 30]
    pos, neg = _planted(np.random.default_rng(9), layers=len(layers))
    paths = write_experiment(tmp_path, {"pos": pos, "neg": neg}, layers=layers)
    write_json(paths.metadata, {"model": "org/m", "architecture": "LlamaForCausalLM"})
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--export", "gguf",
                 "--experiments-dir", tmp_path, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["gguf"]["directions"] == {"2": 1, "7": 6, "30": 29}
    assert summary["gguf"]["skipped_layers"] == [0, 1]

    vectors = np.load(paths.vectors_dir / "mean_diff_response_avg.npy")
    reader = gguf.GGUFReader(paths.vectors_dir / "mean_diff_response_avg.gguf")
    assert _gguf_string(reader, "general.architecture") == "controlvector"
    assert _gguf_string(reader, "controlvector.model_hint") == "llama"
    assert _gguf_int(reader, "controlvector.layer_count") == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.29", "direction.6"]
    for row, layer in enumerate(layers):
        if layer < 2:
            continue
        tensor = tensors[f"direction.{layer - 1}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [vectors.shape[1]]
        assert np.array_equal(np.asarray(tensor.data), vectors[row])
    meta = json.loads((paths.vectors_dir / "mean_diff_response_avg_metadata.json").read_text())
    assert meta["gguf"]["directions"]["30"] == 29

    # the table mode names the file and the mapping; an explicit hint wins
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--export", "gguf",
                 "--gguf-model-hint", "qwen2", "--force",
                 "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "direction.1..29 = tracekit layers 2..30; layers 0, 1 have no llama.cpp slot" in (
        _flat(result)
    )
    reader = gguf.GGUFReader(paths.vectors_dir / "mean_diff_response_avg.gguf")
    assert _gguf_string(reader, "controlvector.model_hint") == "qwen2"


def test_gguf_export_of_layers_without_a_slot_is_refused_before_writing(tmp_path, cli):
    pos, neg = _planted(np.random.default_rng(10), layers=2)
    paths = write_experiment(tmp_path, {"pos": pos, "neg": neg}, layers=[0, 1])
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--export", "gguf",
                 "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 1
    assert "--export gguf: layers 0, 1 have no llama.cpp control-vector slot" in _flat(result)
    assert not paths.vectors_dir.exists()


def test_projections_on_the_trait_vector_match_numpy_and_sklearn_auroc(tmp_path, cli):
    import csv

    from matplotlib.image import imread
    from sklearn.metrics import roc_auc_score

    pos, neg = _planted(np.random.default_rng(11), n_pairs=9, layers=3)
    neg[:, 2] = pos[:, 2] + 0.01 * np.random.default_rng(0).normal(size=pos[:, 2].shape)
    paths = write_experiment(tmp_path, {"pos": pos, "neg": neg}, layers=[0, 4, 9])
    args = ["--experiment", "e", "--trait", "t", "--experiments-dir", tmp_path]
    assert cli("extract", "vectors", *args).exit_code == 0
    result = cli("extract", "projections", *args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)

    vectors = np.load(paths.vectors_dir / "mean_diff_response_avg.npy").astype("float64")
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    want = {"pos": np.einsum("nld,ld->nl", pos, unit), "neg": np.einsum("nld,ld->nl", neg, unit)}
    base = paths.root / "projections" / "response_avg_on_mean_diff_response_avg"
    got = np.load(f"{base}.npy")
    assert got.dtype == np.float32
    assert_close_to_scale(got, np.concatenate([want["pos"], want["neg"]]))
    with open(f"{base}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 9 * 3 and list(rows[0]) == ["id", "polarity", "layer", "projection"]
    from_csv = {"pos": np.full((9, 3), np.nan), "neg": np.full((9, 3), np.nan)}
    for row in rows:
        from_csv[row["polarity"]][int(row["id"]), [0, 4, 9].index(int(row["layer"]))] = float(
            row["projection"]
        )
    for polarity in ("pos", "neg"):
        assert_close_to_scale(from_csv[polarity], want[polarity])  # activations stored as fp32
    for j, layer in enumerate(summary["layers"]):
        labels = np.r_[np.ones(9), np.zeros(9)]
        scores = np.r_[want["pos"][:, j], want["neg"][:, j]]
        assert abs(layer["auroc"] - roc_auc_score(labels, scores)) < 1e-12
        assert layer["n_pos"] == layer["n_neg"] == 9
    assert summary["layers"][0]["auroc"] > 0.9 and summary["layers"][2]["auroc"] < 0.9
    assert summary["projection"].startswith("a · v / |v|")
    written = json.loads(Path(f"{base}_summary.json").read_text())
    assert written["ids"] == {"pos": list(range(9)), "neg": list(range(9))}
    image = imread(f"{base}.png")
    assert image.shape[:2] == (456, 1200) and image[..., :3].std() > 0
    # outputs are not replaced without --force
    again = cli("extract", "projections", *args)
    assert again.exit_code == 1 and "pass --force" in _flat(again)


def test_projections_of_other_activations_match_the_vectors_layers_by_number(tmp_path, cli):
    """A vector of layers 4 and 9 (named in its metadata) on activations of layers 0, 4, 9 of
    another experiment: only the shared layers, each on its own vector; a one-vector .pt file
    is used at every layer."""
    import torch

    rng = np.random.default_rng(12)
    pos, neg = _planted(rng, layers=2)
    source = write_experiment(tmp_path, {"pos": pos, "neg": neg}, layers=[4, 9])
    assert cli("extract", "vectors", "--experiment", "e", "--trait", "t",
               "--experiments-dir", tmp_path).exit_code == 0  # fmt: skip
    vector_file = source.vectors_dir / "mean_diff_response_avg.npy"
    other = {"pos": rng.normal(size=(5, 3, 6)), "neg": rng.normal(size=(4, 3, 6))}
    target = write_experiment(tmp_path, other, layers=[0, 4, 9], experiment="other")
    args = ["--experiment", "other", "--trait", "t", "--experiments-dir", tmp_path]
    result = cli("extract", "projections", *args, "--vector", vector_file, "--json")
    assert result.exit_code == 0, result.output
    assert [s["layer"] for s in json.loads(result.stdout)["layers"]] == [4, 9]
    vectors = np.load(vector_file).astype("float64")
    got = np.load(target.root / "projections" / "response_avg_on_mean_diff_response_avg.npy")
    acts = np.concatenate([other["pos"], other["neg"]])[:, 1:]
    want = (acts * vectors).sum(-1) / np.linalg.norm(vectors, axis=-1)
    assert_close_to_scale(got, want)

    result = cli("extract", "projections", *args, "--vector", vector_file, "--layers", "0")
    assert result.exit_code == 1
    assert "--layers: layer(s) 0 not in both the activations and the vectors" in _flat(result)

    single = tmp_path / "direction.pt"
    torch.save(torch.from_numpy(vectors[1]).float(), single)
    result = cli("extract", "projections", *args, "--vector", single, "--json")
    assert result.exit_code == 0, result.output
    got = np.load(target.root / "projections" / "response_avg_on_direction.npy")
    acts = np.concatenate([other["pos"], other["neg"]])
    want = acts @ vectors[1] / np.linalg.norm(vectors[1])
    assert_close_to_scale(got, want)

    wrong = tmp_path / "wide.npy"
    np.save(wrong, np.ones(7))
    result = cli("extract", "projections", *args, "--vector", wrong)
    assert result.exit_code == 1
    assert "has vectors of width 7 but the activations have 6" in _flat(result)
