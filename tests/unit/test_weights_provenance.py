"""Weights provenance without a model: file hashes (Hugging Face cache blobs for free, other
files hashed once and remembered), several files combined, quantization from a config."""

import hashlib
import json
from pathlib import Path

import pytest

from tracekit.models.weights import (
    files_sha256,
    quantization_of,
    short_weights,
    weight_files,
    weights_provenance,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path / "cache"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_local_folder_is_hashed_once_then_remembered(tmp_path: Path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-00001.safetensors").write_bytes(b"first shard")
    (folder / "model-00002.safetensors").write_bytes(b"second shard")
    want = sha(
        f"model-00001.safetensors  {sha(b'first shard')}\n"
        f"model-00002.safetensors  {sha(b'second shard')}\n".encode()
    )
    assert [p.name for p in weight_files(folder)] == [
        "model-00001.safetensors",
        "model-00002.safetensors",
    ]
    assert weights_provenance(str(folder), None, None) == {
        "quantization": None,
        "weights_sha256": want,
    }
    memo = json.loads((tmp_path / "cache" / "weights-sha256.json").read_text())
    assert sorted(memo.values()) == sorted([sha(b"first shard"), sha(b"second shard")])
    # remembered: a second load reads no weight bytes
    real_open = Path.open

    def no_weight_reads(self, *args, **kwargs):
        if self.suffix == ".safetensors":
            pytest.fail(f"{self.name} read again")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_weight_reads)
    assert files_sha256(weight_files(folder)) == want


def test_one_file_is_its_own_hash_and_an_edit_is_seen(tmp_path: Path):
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"v1")
    assert files_sha256(weight_files(folder)) == sha(b"v1")
    weights.write_bytes(b"v2 longer")  # size (and mtime) change: hashed again
    assert files_sha256(weight_files(folder)) == sha(b"v2 longer")


def test_hugging_face_cache_blob_names_are_the_hash(tmp_path: Path):
    digest = sha(b"blob bytes")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / digest).write_bytes(b"not hashed: the name is trusted, as the hub names it")
    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blobs / digest)
    assert files_sha256(weight_files(snapshot)) == digest


def test_quantization_from_config_and_summary_text():
    class Config:
        quantization_config = {"quant_method": "gptq", "bits": 4}

    assert quantization_of(Config()) == "gptq 4-bit"
    assert quantization_of(object()) is None
    assert short_weights({"quantization": "gptq 4-bit", "weights_sha256": "ab" * 32}) == (
        "gptq 4-bit, sha256 abababababab"
    )
    assert short_weights({"quantization": None, "weights_sha256": None}) == ""


def test_a_converted_embedded_folder_without_the_hash_gets_it_once(tmp_path: Path):
    """Folders converted before hashes were recorded: the GGUF is hashed once, written into
    the folder's record, and read from there afterwards."""
    from embedded_weights import embedded_weights
    from tracekit.models.embedded import SOURCE_RECORD, embedded_source_record

    folder = tmp_path / "smollm2-135m-instruct-q4_1-98362432"
    folder.mkdir()
    old = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf_file": "x.gguf", "dtype": "f32"}
    (folder / SOURCE_RECORD).write_text(json.dumps(old))
    assert embedded_source_record(folder) == embedded_weights()
    record = json.loads((folder / SOURCE_RECORD).read_text())
    assert record["gguf_sha256"] == embedded_weights()["weights_sha256"]
    assert weights_provenance(str(folder), None, None) == embedded_weights()
    assert embedded_source_record(tmp_path) is None  # not a converted embedded folder
