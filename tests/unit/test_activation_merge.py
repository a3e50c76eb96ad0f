"""Merging a run's journal parts into the activation files (``merge_activation_parts``)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tracekit.errors import InputError
from tracekit.storage.experiment import TraitPaths, merge_activation_parts, write_batch_part

SHAPE = (3, 4)  # layers, hidden


def _part(paths: TraitPaths, ids: list[int], rng: np.random.Generator, tag: str = "") -> dict:
    values = rng.standard_normal((len(ids), *SHAPE)).astype(np.float32)
    rows = [{"id": i, "response": f"r{i}"} for i in ids]
    write_batch_part(paths, "pos", rows, {"response_avg": values}, tag=tag)
    return dict(zip(ids, values, strict=True))


def test_parts_in_any_order_land_in_id_order_in_all_three_files(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    rng = np.random.default_rng(0)
    expected: dict[int, np.ndarray] = {}
    # interleaved id sets (a resumed run's batches span an earlier run's gaps), two ranks
    expected |= _part(paths, [4, 5, 9], rng, tag="-rank1")
    expected |= _part(paths, [0, 1, 2, 3], rng)
    expected |= _part(paths, [6, 7, 8], rng, tag="-rank0")
    stale = _part(paths, [10, 11], rng)  # not asked for: ignored
    ids = list(range(10))

    files = merge_activation_parts(paths, "pos", "response_avg", ids, SHAPE)

    npy, pt = paths.activation_file("pos", "response_avg"), paths.activation_file(
        "pos", "response_avg", ".pt"
    )
    assert set(files) == {npy, pt, paths.ids_file("pos", "response_avg")}
    want = np.stack([expected[i] for i in ids])
    got = np.load(npy, allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (10, *SHAPE)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(torch.load(pt, weights_only=True).numpy(), want)
    assert np.load(paths.ids_file("pos", "response_avg")).tolist() == ids
    assert not any(np.allclose(got, v) for v in stale.values())
    assert not list(paths.activations_dir.glob(".tmp-*"))


def test_a_later_part_wins_and_a_missing_row_is_named(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    rng = np.random.default_rng(1)
    _part(paths, [0, 1], rng)
    newer = _part(paths, [1, 2], rng)  # sorts after the first part: its row 1 wins
    merge_activation_parts(paths, "pos", "response_avg", [0, 1, 2], SHAPE)
    got = np.load(paths.activation_file("pos", "response_avg"), allow_pickle=False)
    np.testing.assert_array_equal(got[1], newer[1])

    with pytest.raises(InputError, match=r"lack row\(s\) \[5\]"):
        merge_activation_parts(paths, "pos", "response_avg", [0, 1, 2, 5], SHAPE)
    # the failed merge left the earlier files as they were, and no temp file
    assert np.load(paths.activation_file("pos", "response_avg")).shape == (3, *SHAPE)
    assert not list(paths.activations_dir.glob(".tmp-*"))
