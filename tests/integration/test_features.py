"""`extract features` on the embedded model: hidden states, SAE activations, layout, resume."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedded_weights import embedded_weights
from tolerance import assert_close_to_scale
from tracekit.errors import ConfigError, InputError, OutputExistsError
from tracekit.features import FeaturesConfig, csr_to_dense, extract_features
from tracekit.storage.sentences import (
    SentenceFile,
    get_final_token_data,
    load_all_sentences,
    sentence_provenance,
)

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "make_example_saes", Path(__file__).resolve().parents[2] / "examples" / "make_example_saes.py"
)
assert _spec and _spec.loader
saes_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(saes_example)

HIDDEN = 576
WIDTH = 96
SENTENCES = [
    ("The cat sat on the mat.", 0),
    ("He lied about the money he took from the shared account last spring.", 3),
    ("Fine.", 1),
    ("She told her friend the dress looked great although she disliked it.", 2),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A sentences CSV and SAE folders for release layers 0 and 2 (tracekit layers 1 and 3)."""
    root = tmp_path_factory.mktemp("features")
    sentences = root / "sentences.csv"
    with sentences.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "concept_strength_label"])
        writer.writerows(SENTENCES)
    gemma, saelens, params = root / "gemma-scope", root / "saelens", {}
    for layer in (0, 2):
        for l0 in (8, 24):
            p = saes_example.random_sae(HIDDEN, WIDTH, seed=10 * layer + l0)
            # thresholds at the scale of SmolLM2's residual states, so features really switch off
            p["threshold"] = np.full(WIDTH, 0.5 + 0.05 * l0, dtype=np.float32)
            params[("gemma-scope", layer, l0)] = p
            saes_example.write_gemma_scope(gemma, layer, p, l0)
        p = saes_example.random_sae(HIDDEN, WIDTH, seed=100 + layer)
        params[("saelens", layer)] = p
        saes_example.write_saelens(saelens, layer, p, "topk", k=6)
    return {
        "root": root,
        "sentences": sentences,
        "gemma": gemma,
        "saelens": saelens,
        "params": params,
    }


def reference_jumprelu(x, p):
    pre = x.astype(np.float64) @ p["W_enc"].astype(np.float64) + p["b_enc"]
    return np.where(pre > p["threshold"], pre, 0.0)


def one_line(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("batch_size", [4, 3])
def test_hidden_states_are_padding_correct_and_match_the_reference(
    files, tmp_path, embedded_model, batch_size
):
    """Batched, left-padded extraction equals each sentence run alone through HF; with two
    batches, the second one's forward pass runs while the first one's files are written."""
    cfg = FeaturesConfig(
        sentences=files["sentences"],
        output=tmp_path / "out",
        layers="0,1,3,30",
        batch_size=batch_size,
    )
    result = extract_features(cfg, loaded=embedded_model)
    assert (result.written, result.skipped, result.layers) == (4, 0, [0, 1, 3, 30])
    tok, model = embedded_model.tokenizer, embedded_model.model
    for index, (text, label) in enumerate(SENTENCES):
        data = load(tmp_path / "out" / f"sentence_{index:06d}.npz")
        ids = tok(text, return_tensors="pt")
        n = ids["input_ids"].shape[1]
        assert data["hidden_states"].shape == (4, n, HIDDEN)
        np.testing.assert_array_equal(data["embeddings"], data["hidden_states"][0])
        if index in (1, 2):  # the longest and the most padded sentence, each run alone
            with torch.inference_mode():
                ref = model(**ids, output_hidden_states=True).hidden_states
            for pos, layer in enumerate([0, 1, 3]):  # HF's last entry is after the final norm
                assert_close_to_scale(data["hidden_states"][pos], ref[layer][0])
            # layer 30 is taken before the final norm: applying the norm gives HF's last entry
            normed = model.model.norm(torch.from_numpy(data["hidden_states"][3])).detach()
            assert_close_to_scale(normed, ref[30][0])
        assert data["is_final_token"].tolist() == [False] * (n - 1) + [True]
        assert int(data["concept_strength_label"]) == label and str(data["sentence"]) == text
        assert "".join(data["tokens"].tolist()) == text and data["tokens"].shape == (n,)
        assert data["layers"].tolist() == [0, 1, 3, 30]
        assert not {"activations", "act_values", "average_l0s", "sae_width"} & set(data)


def test_cli_dense_and_sparse_sae_files_match_numpy_and_build_dataset(cli, files, tmp_path):
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    common = ["extract", "features", "--sentences", files["sentences"], "--sae", files["gemma"]]
    common += ["--batch-size", "3"]  # two batches; equal batching keeps the two runs bitwise equal
    result = cli(*common, "--sae-l0", "10,2:20", "--output", dense)
    assert result.exit_code == 0, result.output
    result = cli(*common, "--sae-l0", "0:10,2:20", "--sae-storage", "sparse", "--output", sparse)
    assert result.exit_code == 0, result.output
    for index in range(len(SENTENCES)):
        d = load(dense / f"sentence_{index:06d}.npz")
        s = load(sparse / f"sentence_{index:06d}.npz")
        assert d["layers"].tolist() == [1, 3] and d["sae_layers"].tolist() == [0, 2]
        assert d["average_l0s"].tolist() == [8.0, 24.0] == s["average_l0s"].tolist()
        assert int(d["sae_width"]) == WIDTH and str(d["sae_format"]) == "gemma-scope"
        assert (str(d["sae_storage"]), str(s["sae_storage"])) == ("dense", "sparse")
        for pos, (release, l0) in enumerate([(0, 8), (2, 24)]):
            expected = reference_jumprelu(
                d["hidden_states"][pos], files["params"][("gemma-scope", release, l0)]
            )
            assert_close_to_scale(d["activations"][pos], expected)
            assert 0 < (expected > 0).mean() < 0.9
        assert "activations" not in s and s["act_shape"].tolist() == list(d["activations"].shape)
        assert s["act_indices"].dtype == np.int32 and s["act_indptr"].dtype == np.int64
        rebuilt = csr_to_dense(s["act_values"], s["act_indices"], s["act_indptr"], s["act_shape"])
        np.testing.assert_array_equal(rebuilt, d["activations"])
        np.testing.assert_array_equal(s["hidden_states"], d["hidden_states"])

    # the reader build-dataset uses sees the same final-token feature in both layouts
    picked = [
        get_final_token_data(load_all_sentences(folder), layers=[0, 3], target=(3, 5))
        for folder in (dense, sparse)
    ]
    np.testing.assert_array_equal(picked[0].target_activations, picked[1].target_activations)
    assert picked[0].average_l0 == 24.0 and picked[0].sae_width == WIDTH
    assert picked[0].labels.tolist() == [label for _, label in SENTENCES]
    out = tmp_path / "ds.npz"
    result = cli(
        "build-dataset", "--strategy", "hidden-to-feature", "--input", sparse,
        "--target-layer", "3", "--target-feature", "5", "--normalize", "none", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as ds:
        np.testing.assert_array_equal(ds["y"], picked[0].target_activations)
        assert ds["X"].shape == (len(SENTENCES), HIDDEN)
        # the dataset says which weights it came from: those extract features recorded
        for name in ("model", "quantization", "weights_sha256"):
            assert str(ds[f"meta_{name}"]) == str(d[name])
        assert len(str(ds["meta_weights_sha256"])) == 64


def test_saelens_topk_and_readme_walkthrough_without_sae(cli, files, tmp_path, embedded_model):
    cfg = FeaturesConfig(sentences=files["sentences"], output=tmp_path / "sl", sae=files["saelens"])
    result = extract_features(cfg, loaded=embedded_model)
    assert result.layers == [1, 3] and result.average_l0s == [6.0, 6.0]  # TopK: L0 is k
    data = load(tmp_path / "sl" / "sentence_000001.npz")
    assert ((data["activations"] > 0).sum(-1) <= 6).all()
    p = files["params"][("saelens", 2)]
    pre = (data["hidden_states"][1].astype(np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    top = np.argsort(-pre, axis=1)[:, :6]
    assert_close_to_scale(
        np.take_along_axis(data["activations"][1], top, 1),
        np.maximum(np.take_along_axis(pre, top, 1), 0),
    )

    plain = tmp_path / "plain"
    result = cli(
        "extract",
        "features",
        "--sentences",
        files["sentences"],
        "--layers",
        "0-5",
        "--output",
        plain,
    )
    assert result.exit_code == 0, result.output
    result = cli(
        "build-dataset", "--strategy", "hidden-to-concept", "--input", plain, "--layers", "0-5",
        "--output", tmp_path / "concept.npz",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "concept.npz", allow_pickle=False) as ds:
        assert ds["X"].shape == (len(SENTENCES), 6 * HIDDEN)
    result = cli(
        "build-dataset", "--strategy", "hidden-to-feature", "--input", plain, "--target-layer", "3",
        "--target-feature", "1", "--output", tmp_path / "f.npz",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "has no SAE activations" in result.output


def test_resume_skips_finished_sentences_and_refuses_other_settings(
    files, tmp_path, embedded_model
):
    out = tmp_path / "out"
    cfg = FeaturesConfig(
        sentences=files["sentences"], output=out, sae=files["gemma"], sae_l0="8", layers="3"
    )
    extract_features(cfg, loaded=embedded_model)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("sentence_*.npz")}
    before = load(out / "sentence_000002.npz")
    (out / "sentence_000002.npz").unlink()  # as if the run had crashed before writing it

    result = extract_features(cfg, loaded=embedded_model)
    assert (result.written, result.skipped) == (1, 3)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("sentence_*.npz")}
    assert {k: v for k, v in after.items() if k != "sentence_000002.npz"} == {
        k: v for k, v in kept.items() if k != "sentence_000002.npz"
    }
    again = load(out / "sentence_000002.npz")
    assert_close_to_scale(again["activations"], before["activations"])

    other = cfg.model_copy(update={"sae_l0": "24"})
    with pytest.raises(
        OutputExistsError, match=r"holds features made with other settings \(differs in: saes\)"
    ):
        extract_features(other, loaded=embedded_model)
    redo = extract_features(other.model_copy(update={"force": True}), loaded=embedded_model)
    assert (redo.written, redo.skipped) == (4, 0)
    assert load(out / "sentence_000000.npz")["average_l0s"].tolist() == [24.0]
    assert not list(out.glob(".tmp-*"))


def test_files_record_the_weights_and_a_resume_with_other_weights_is_refused(
    files, tmp_path, embedded_model, caplog
):
    out = tmp_path / "out"
    cfg = FeaturesConfig(sentences=files["sentences"], output=out, layers="1")
    extract_features(cfg, loaded=embedded_model)
    weights = embedded_weights()
    for path in sorted(out.glob("sentence_*.npz")):
        assert sentence_provenance(SentenceFile(path)) == {"model": embedded_model.name, **weights}
    manifest_path = out / "features.json"
    manifest = json.loads(manifest_path.read_text())
    assert {k: manifest["settings"][k] for k in weights} == weights

    # the folder says other weights of the same model id (another checkpoint or quantization)
    (out / "sentence_000002.npz").unlink()
    other = {**manifest, "settings": {**manifest["settings"], "weights_sha256": "f" * 64}}
    manifest_path.write_text(json.dumps(other))
    with pytest.raises(OutputExistsError) as refused:
        extract_features(cfg, loaded=embedded_model)
    assert refused.value.message == (
        f"{out} holds features made with other weights of model '{embedded_model.name}': "
        f"weights_sha256 '{'f' * 64}' (features.json) != '{weights['weights_sha256']}' (this run)"
    )
    assert "--force" in refused.value.hint and not (out / "sentence_000002.npz").exists()

    # a folder from a tracekit that did not record the weights: resumed, with one notice
    settings = {k: v for k, v in manifest["settings"].items() if k not in weights}
    manifest_path.write_text(json.dumps({**manifest, "settings": settings}))
    with caplog.at_level("WARNING", logger="tracekit"):
        result = extract_features(cfg, loaded=embedded_model)
    assert (result.written, result.skipped) == (1, 3)
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "does not record which weights" in notices[0]
    assert json.loads(manifest_path.read_text())["settings"] == manifest["settings"]


def test_bad_input_is_one_line_and_writes_nothing(cli, files, tmp_path, embedded_model):
    out = tmp_path / "never"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text,concept_strength_label\nhello there,1\n")
    result = cli("extract", "features", "--sentences", bad_csv, "--output", out)
    assert result.exit_code == 1
    assert "has no column 'sentence' (columns: text, concept_strength_label)" in one_line(result)
    assert "--text-column" in one_line(result)

    bad_csv.write_text("sentence,concept_strength_label\nhello there,1\nbye now,7\n")
    result = cli("extract", "features", "--sentences", bad_csv, "--output", out)
    assert result.exit_code == 1 and "row 2: label 7 is outside 0-3" in one_line(result)
    result = cli(
        "extract",
        "features",
        "--sentences",
        bad_csv,
        "--output",
        out,
        "--label-range",
        "0-9",
        "--layers",
        "99",
    )
    assert (
        result.exit_code == 2
        and "--layers: layer(s) 99 out of range: valid layers are 0-30" in one_line(result)
    )

    result = cli("extract", "features", "--sentences", bad_csv, "--output", out, "--sae-l0", "10")
    assert result.exit_code == 2
    assert "--sae-l0 chooses among SAEs, so it needs --sae DIR" in one_line(result)
    result = cli(
        "extract", "features", "--sentences", bad_csv, "--output", out, "--label-range", "3-1"
    )
    assert (
        result.exit_code == 2
        and "invalid label range '3-1': MIN is greater than MAX" in one_line(result)
    )

    corrupt = tmp_path / "corrupt"
    saes_example.write_gemma_scope(corrupt, 0, saes_example.random_sae(HIDDEN, WIDTH, 1), 8)
    (corrupt / "layer_0" / "width_96" / "average_l0_8" / "params.npz").write_bytes(b"garbage")
    result = cli(
        "extract", "features", "--sentences", files["sentences"], "--sae", corrupt, "--output", out
    )
    assert result.exit_code == 1 and "cannot read SAE file" in one_line(result)

    result = cli(
        "extract",
        "features",
        "--sentences",
        files["sentences"],
        "--sae",
        files["gemma"],
        "--output",
        out,
        "--layers",
        "2",
    )
    assert result.exit_code == 1
    assert "no SAE for tracekit layer 2 (SAE release layer 1)" in one_line(result)

    narrow = tmp_path / "narrow"
    saes_example.write_saelens(narrow, 0, saes_example.random_sae(64, WIDTH, 1), "relu")
    with pytest.raises(
        InputError, match=r"encodes 64-wide vectors, but the model's hidden size is 576"
    ):
        extract_features(
            FeaturesConfig(sentences=files["sentences"], output=out, sae=narrow),
            loaded=embedded_model,
        )
    with pytest.raises(ConfigError, match=r"--layers all includes layer 0"):
        extract_features(
            FeaturesConfig(sentences=files["sentences"], output=out, sae=narrow, layers="all"),
            loaded=embedded_model,
        )
    assert not out.exists()


def test_two_processes_write_the_single_process_files(cli, two_processes, files, tmp_path):
    """``--num-processes 2`` (torchrun, gloo): each process writes its block of sentence files;
    together they are the single run's files, and the manifest is the main process's."""
    import json

    common = ["extract", "features", "--sentences", str(files["sentences"])]
    common += ["--sae", str(files["gemma"]), "--sae-l0", "10", "--batch-size", "1"]
    common += ["--device", "cpu"]  # batches of one: no padding differences between the runs
    one, two = tmp_path / "one", tmp_path / "two"
    result = cli(*common, "--output", one)
    assert result.exit_code == 0, result.output
    summary = two_processes(*common, "--output", two)
    assert summary["written"] == len(SENTENCES)  # both processes' counts
    for index in range(len(SENTENCES)):
        want = load(one / f"sentence_{index:06d}.npz")
        got = load(two / f"sentence_{index:06d}.npz")
        assert sorted(got) == sorted(want)
        for key in ("hidden_states", "activations"):
            # each process has half the CPU threads: sums in another order
            assert_close_to_scale(got[key], want[key])
        assert str(got["sentence"]) == SENTENCES[index][0]
    manifest = json.loads((two / "features.json").read_text())
    assert manifest["complete"] is True and manifest["files"] == len(SENTENCES)
    assert manifest["settings"] == json.loads((one / "features.json").read_text())["settings"]
