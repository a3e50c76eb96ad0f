"""`build-dataset` and the weights its inputs came from: files written by `extract features`
record `model`, `quantization` and `weights_sha256`; files that disagree are refused before any
large read, and the dataset records the one set of weights (older files lack the fields)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tracekit.storage.sentences import write_sentence_file

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHA_A = "a" * 64
SHA_B = "b" * 64
LAYERS = [0, 1, 2]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """No rich line wrapping, so the one-line messages with temp paths stay whole."""
    from tracekit.console import err_console, out_console

    monkeypatch.setattr(err_console, "width", 1000)
    monkeypatch.setattr(out_console, "width", 1000)


def write(
    folder: Path,
    index: int,
    *,
    model: str = MODEL,
    quantization: str | None = None,
    sha: str | None = SHA_A,
    hidden: int = 8,
) -> Path:
    """One sentence file from the real writer (what `extract features` writes)."""
    rng = np.random.default_rng(index)
    n_fragments = 2 + index % 2
    states = rng.standard_normal((len(LAYERS), n_fragments, hidden)).astype(np.float32)
    path = folder / f"sentence_{index:06d}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    write_sentence_file(
        path,
        embeddings=states[0].copy(),
        hidden_states=states,
        layers=LAYERS,
        label=index % 2,
        sentence=f"sentence {index}",
        tokens=[f"t{j}" for j in range(n_fragments)],
        model=model,
        weights={"quantization": quantization, "weights_sha256": sha},
    )
    return path


def write_old(folder: Path, index: int, model: str = MODEL) -> Path:
    """A sentence file as tracekit wrote it before it recorded the weights: a model id only."""
    path = write(folder, index, model=model)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in ("quantization", "weights_sha256")}
    np.savez(path, **arrays)
    return path


def build(cli, folder: Path, out: Path, *extra: str):
    return cli(
        "build-dataset",
        "--strategy",
        "hidden-to-concept",
        "--input",
        folder,
        "--layer",
        "1",
        "--output",
        out,
        *extra,
    )


@pytest.mark.parametrize(
    ("second", "shown"),
    [
        (
            {"model": "HuggingFaceTB/SmolLM2-360M-Instruct", "hidden": 12},
            "model 'HuggingFaceTB/SmolLM2-135M-Instruct' ({first}) != "
            "'HuggingFaceTB/SmolLM2-360M-Instruct' ({other})",
        ),
        ({"quantization": "gptq 4-bit"}, "quantization none ({first}) != 'gptq 4-bit' ({other})"),
        ({"sha": SHA_B}, f"weights_sha256 '{SHA_A}' ({{first}}) != '{SHA_B}' ({{other}})"),
    ],
    ids=["model", "quantization", "weights_sha256"],
)
def test_files_of_other_weights_are_refused_in_one_line(cli, tmp_path, second, shown):
    folder = tmp_path / "feat"
    first = write(folder, 0)
    write(folder, 1)
    other = write(folder, 2, **second)
    write(folder, 3)
    out = tmp_path / "out" / "ds.npz"
    result = build(cli, folder, out)
    assert result.exit_code == 1, result.output
    # a bigger model's hidden size would also differ: the weights are named, not the size
    assert result.output.strip().splitlines() == [
        "error: the sentence files come from different weights: "
        + shown.format(first=first, other=other),
        "  hint: build from the files of one `extract features` run: put each model's (or "
        "checkpoint's) files in their own --input folder",
    ]
    assert not out.exists() and not out.parent.exists()


def test_same_weights_are_recorded_in_the_dataset(cli, tmp_path):
    folder = tmp_path / "feat"
    for i in range(4):
        write(folder, i, quantization="Q4_1 GGUF de-quantized")
    out = tmp_path / "ds.npz"
    result = build(cli, folder, out, "--test-fraction", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["provenance"] == {
        "model": MODEL,
        "quantization": "Q4_1 GGUF de-quantized",
        "weights_sha256": SHA_A,
    }
    with np.load(out) as ds:
        assert str(ds["meta_model"]) == MODEL
        assert str(ds["meta_quantization"]) == "Q4_1 GGUF de-quantized"
        assert str(ds["meta_weights_sha256"]) == SHA_A

    plain = tmp_path / "plain"
    for i in range(3):
        write(plain, i)  # not quantized: recorded as "", as in the sentence files
    result = build(cli, plain, tmp_path / "plain.npz")
    assert result.exit_code == 0, result.output
    assert f"{MODEL}, sha256 {SHA_A[:12]}" in result.output  # the table's weights row
    with np.load(tmp_path / "plain.npz") as ds:
        assert str(ds["meta_quantization"]) == "" and str(ds["meta_weights_sha256"]) == SHA_A


def test_files_without_the_fields_still_build(cli, tmp_path):
    old = tmp_path / "old"
    for i in range(3):
        write_old(old, i)
    out = tmp_path / "old.npz"
    result = build(cli, old, out)
    assert result.exit_code == 0, result.output
    with np.load(out) as ds:
        assert str(ds["meta_model"]) == MODEL
        assert "meta_weights_sha256" not in ds and "meta_quantization" not in ds

    # old and new files of one model: the hash is not compared with files that lack it, and
    # not recorded for a dataset whose other rows may come from other weights
    mixed = tmp_path / "mixed"
    write_old(mixed, 0)
    write(mixed, 1)
    write(mixed, 2, sha=None)  # a hash that could not be computed: unknown, not compared
    result = build(cli, mixed, tmp_path / "mixed.npz", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["provenance"] == {"model": MODEL}
    assert report["warnings"] == [
        "only 2 of 3 sentence files record their quantization; the others may come from other "
        "weights, so the dataset does not record it (no meta_quantization)",
        "only 1 of 3 sentence files record their weights_sha256; the others may come from "
        "other weights, so the dataset does not record it (no meta_weights_sha256)",
    ]
    with np.load(tmp_path / "mixed.npz") as ds:
        assert str(ds["meta_model"]) == MODEL and "meta_weights_sha256" not in ds

    # a model id is still compared when only one side records the weights
    write_old(mixed, 3, model="HuggingFaceTB/SmolLM2-360M-Instruct")
    result = build(cli, mixed, tmp_path / "other.npz")
    assert result.exit_code == 1 and "different weights: model" in result.output
