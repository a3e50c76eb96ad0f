"""The sentence-file reader, normalizations and splitting, checked against plain numpy."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import tracekit
from tracekit.datasets import apply_normalization, fit_normalization, split_indices
from tracekit.errors import InputError
from tracekit.storage.sentences import SentenceFile

_spec = importlib.util.spec_from_file_location(
    "make_example_data", Path(__file__).parents[2] / "examples" / "make_example_data.py"
)
assert _spec is not None and _spec.loader is not None
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)


def write_dir(folder: Path, n: int = 6, compressed: bool = False, sparse: bool = False) -> list:
    rng = np.random.default_rng(7)
    saver = np.savez_compressed if compressed else np.savez
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        arrays = ex.sentence_arrays(rng, label=i % 4, n_fragments=2 + i % 3)
        written.append(arrays)
        if sparse:
            arrays = {k: v for k, v in arrays.items() if k != "activations"}
            arrays.update(ex.to_sparse(written[-1]["activations"]))
        saver(folder / f"sentence_{i:06d}.npz", **arrays)
    return written


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_sliced_reads_equal_full_loads(tmp_path: Path, compressed: bool):
    arrays = write_dir(tmp_path, n=1, compressed=compressed)[0]
    file = SentenceFile(tmp_path / "sentence_000000.npz")
    assert file.index == 0 and set(file) >= {"hidden_states", "layers", "tokens"}
    with file.opened():
        np.testing.assert_array_equal(
            file.read_rows("hidden_states", (4, 1)), arrays["hidden_states"][4, 1]
        )
        np.testing.assert_array_equal(file.read_rows("activations", (6,)), arrays["activations"][6])
        np.testing.assert_array_equal(file["layers"], arrays["layers"])
        assert file.scalar("concept_strength_label") == 0
        assert file.scalar("model") == ex.MODEL
    np.testing.assert_array_equal(file.read_flat("average_l0s", 2, 4), arrays["average_l0s"][2:4])


def test_seed_style_api_gathers_final_tokens(tmp_path: Path):
    arrays = write_dir(tmp_path / "d", n=5)
    sentences = tracekit.load_all_sentences(tmp_path / "d")
    assert [s.index for s in sentences] == [0, 1, 2, 3, 4]
    data = tracekit.get_final_token_data(sentences)
    finals = [int(np.flatnonzero(a["is_final_token"])[0]) for a in arrays]
    expected_hidden = np.stack(
        [a["hidden_states"][:, f] for a, f in zip(arrays, finals, strict=True)]
    )
    np.testing.assert_array_equal(data["hidden_states"], expected_hidden)
    np.testing.assert_array_equal(
        data["embeddings"],
        np.stack([a["embeddings"][f] for a, f in zip(arrays, finals, strict=True)]),
    )
    assert data["labels"].tolist() == [0, 1, 2, 3, 0]
    assert data["layers"] == tuple(ex.LAYERS) and data.n_samples == 5
    layers = tracekit.parse_layers_arg("0-2,5")
    X = data["hidden_states"][:, layers, :].reshape(5, -1)
    assert X.shape == (5, 4 * ex.HIDDEN)


def test_sparse_and_dense_target_values_agree(tmp_path: Path):
    dense = write_dir(tmp_path / "dense", n=4)
    write_dir(tmp_path / "sparse", n=4, sparse=True)
    for folder in ("dense", "sparse"):
        data = tracekit.get_final_token_data(
            tracekit.load_all_sentences(tmp_path / folder),
            layers=[2],
            embeddings=False,
            labels=False,
            target=(2, 3),
        )
        want = [a["activations"][2, -1, 3] for a in dense]  # final token is the last fragment
        np.testing.assert_array_equal(data.target_activations, np.array(want, dtype=np.float32))
        assert data.sae_width == ex.SAE_WIDTH and data.average_l0 == ex.AVERAGE_L0
    # a feature absent from a sparse row reads as 0
    sparse = tracekit.get_final_token_data(
        tracekit.load_all_sentences(tmp_path / "sparse"),
        layers=[],
        embeddings=False,
        labels=False,
        hidden_states=False,
        target=(5, 60),
    )
    np.testing.assert_array_equal(
        sparse.target_activations, np.array([a["activations"][5, -1, 60] for a in dense])
    )


def test_layer_zero_falls_back_to_embeddings(tmp_path: Path):
    rng = np.random.default_rng(0)
    arrays = ex.sentence_arrays(rng, label=1, n_fragments=3, layers=[3, 4])
    np.savez(tmp_path / "sentence_000000.npz", **arrays)
    data = tracekit.get_final_token_data(tracekit.load_all_sentences(tmp_path), layers=[0, 4])
    np.testing.assert_array_equal(data.hidden_states[0, 0], arrays["embeddings"][-1])
    np.testing.assert_array_equal(data.hidden_states[0, 1], arrays["hidden_states"][1, -1])


def test_object_arrays_and_corrupt_files_are_refused(tmp_path: Path):
    np.savez(tmp_path / "sentence_000000.npz", layers=np.array([object()], dtype=object))
    with pytest.raises(InputError, match="pickled object array"):
        SentenceFile(tmp_path / "sentence_000000.npz").info("layers")
    (tmp_path / "sentence_000001.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a valid .npz"):
        list(SentenceFile(tmp_path / "sentence_000001.npz"))


def test_truncated_member_is_reported(tmp_path: Path):
    write_dir(tmp_path, n=1)
    path = tmp_path / "sentence_000000.npz"
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(InputError, match="sentence_000000.npz"):
        tracekit.get_final_token_data(tracekit.load_all_sentences(tmp_path))


# --- normalization -------------------------------------------------------------------------
X_SMALL = np.array(
    [[1.0, 10.0, 5.0], [3.0, 10.0, 7.0], [2.0, 10.0, 0.0], [6.0, 10.0, 1.0]], dtype=np.float32
)


def test_standardize_matches_numpy():
    Xn, params = tracekit.normalize_features(X_SMALL, "standardize")
    mean = X_SMALL.mean(axis=0)
    std = X_SMALL.std(axis=0)  # population std; the constant column divides by 1
    want = (X_SMALL - mean) / np.where(std == 0, 1, std)
    np.testing.assert_allclose(Xn, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(params["norm_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(params["norm_std"], std, rtol=1e-6)
    assert params["norm_method"] == "standardize"
    assert np.all(Xn[:, 1] == 0)
    np.testing.assert_array_equal(X_SMALL[0], [1.0, 10.0, 5.0])  # input untouched


def test_minmax_and_none_match_numpy():
    Xn, params = tracekit.normalize_features(X_SMALL, "minmax")
    low, high = X_SMALL.min(axis=0), X_SMALL.max(axis=0)
    want = (X_SMALL - low) / np.where(high - low == 0, 1, high - low)
    np.testing.assert_allclose(Xn, want, rtol=1e-6)
    assert Xn.min() == 0 and Xn.max() == 1
    np.testing.assert_array_equal(params["norm_min"], low)
    np.testing.assert_array_equal(params["norm_max"], high)
    Xn, params = tracekit.normalize_features(X_SMALL, "none")
    np.testing.assert_array_equal(Xn, X_SMALL)
    assert params == {"norm_method": "none"}


def test_chunked_fit_on_rows_matches_numpy_on_those_rows():
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((2500, 4)) * 3 + 100).astype(np.float32)  # > one 1024-row chunk
    rows = np.arange(0, 2500, 3)
    params = fit_normalization(X, "standardize", rows=rows)
    np.testing.assert_allclose(
        params["norm_mean"], X[rows].astype(np.float64).mean(axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        params["norm_std"], X[rows].astype(np.float64).std(axis=0), rtol=1e-5
    )
    out = apply_normalization(X, params, out=X.copy())
    np.testing.assert_allclose(out[rows].mean(axis=0), 0, atol=1e-4)


# --- splitting ----------------------------------------------------------------------------
def test_split_is_seeded_disjoint_and_sized():
    train, test = split_indices(20, 0.25, seed=1)
    assert len(test) == 5 and len(train) == 15
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(20))
    again = split_indices(20, 0.25, seed=1)
    assert again[1].tolist() == test.tolist()
    assert split_indices(20, 0.25, seed=2)[1].tolist() != test.tolist()


def test_group_split_keeps_groups_together():
    groups = np.repeat(np.arange(10), 3)
    train, test = split_indices(30, 0.3, seed=0, groups=groups)
    assert not set(groups[train]) & set(groups[test])
    assert len(test) == 9
    with pytest.raises(InputError, match="all 4 samples share one group"):
        split_indices(4, 0.5, groups=[1, 1, 1, 1])
    with pytest.raises(InputError, match="cannot split 1 sample"):
        split_indices(1, 0.5)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_reads_files_from_the_extract_features_writer(tmp_path: Path, storage: str):
    """Contract: what `tracekit extract features` writes is what build-dataset reads."""
    import torch

    from tracekit.sae.csr import to_csr
    from tracekit.storage.sentences import SaeMeta, write_sentence_file

    rng = np.random.default_rng(11)
    arrays = ex.sentence_arrays(rng, label=2, n_fragments=4, layers=[0, 3, 6])
    acts = arrays["activations"]
    sae = SaeMeta(
        width=ex.SAE_WIDTH,
        average_l0s=[9.0, 9.0, 9.0],
        release_layers=[0, 2, 5],
        formats="example",
        storage=storage,
    )
    sparse = (
        to_csr(torch.from_numpy(acts.reshape(-1, acts.shape[-1]))) if storage == "sparse" else None
    )
    write_sentence_file(
        tmp_path / "sentence_000000.npz",
        embeddings=arrays["embeddings"],
        hidden_states=arrays["hidden_states"],
        layers=[0, 3, 6],
        label=2,
        sentence="a b c d",
        tokens=["a", "b", "c", "d"],
        model="m",
        sae=sae,
        activations=acts if storage == "dense" else None,
        sparse=sparse,
    )
    data = tracekit.get_final_token_data(
        tracekit.load_all_sentences(tmp_path), layers=[3, 6], target=(6, 3)
    )
    np.testing.assert_array_equal(data.hidden_states[0], arrays["hidden_states"][1:, -1])
    assert data.target_activations[0] == acts[2, -1, 3]
    assert data.labels.tolist() == [2] and data.average_l0 == 9.0 and data.sae_width == ex.SAE_WIDTH


def test_sentence_files_record_the_weights_and_older_files_still_read(tmp_path: Path):
    from tracekit.storage.sentences import sentence_provenance, write_sentence_file

    arrays = ex.sentence_arrays(np.random.default_rng(3), label=1, n_fragments=2, layers=[0, 2])
    common = {
        "embeddings": arrays["embeddings"],
        "hidden_states": arrays["hidden_states"],
        "layers": [0, 2],
        "label": 1,
        "sentence": "a b",
        "tokens": ["a", "b"],
        "model": "org/m",
    }
    write_sentence_file(
        tmp_path / "sentence_000000.npz",
        **common,
        weights={"model": "org/m", "quantization": "gptq 4-bit", "weights_sha256": "ab" * 32},
    )
    write_sentence_file(  # a plain model whose hash is unknown
        tmp_path / "sentence_000001.npz",
        **common,
        weights={"quantization": None, "weights_sha256": None},
    )
    # as an older tracekit wrote it: the model id, no weights fields
    with np.load(tmp_path / "sentence_000001.npz", allow_pickle=False) as data:
        older = {k: data[k] for k in data.files if k not in ("quantization", "weights_sha256")}
    np.savez(tmp_path / "sentence_000002.npz", **older)
    files = tracekit.load_all_sentences(tmp_path)
    assert [sentence_provenance(f) for f in files] == [
        {"model": "org/m", "quantization": "gptq 4-bit", "weights_sha256": "ab" * 32},
        {"model": "org/m", "quantization": None, "weights_sha256": None},
        {"model": "org/m"},
    ]
    # the plain model and the older file read together (the hash is unknown / not recorded)
    data = tracekit.get_final_token_data(files[1:], layers=[2])
    expected = arrays["hidden_states"][1, -1]
    for row in range(2):
        np.testing.assert_array_equal(data.hidden_states[row, 0], expected)
    assert data.provenance == {"model": "org/m"} and data.provenance_partial == {"quantization": 1}
    with pytest.raises(InputError, match="different weights: quantization 'gptq 4-bit'"):
        tracekit.get_final_token_data(files, layers=[2])  # quantized and plain weights
