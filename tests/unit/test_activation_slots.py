"""Slot files: a generate run's activations written in place by row id, then finalized."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tracekit.errors import InputError
from tracekit.storage.activation_slots import (
    finalize_activation_file,
    prepare_slots,
    slots_file,
)
from tracekit.storage.atomic import save_npz
from tracekit.storage.experiment import TraitPaths, write_batch_part

SHAPE = (3, 4)  # layers, hidden
POOL = "response_avg"


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, *SHAPE)).astype(np.float32)


def _batch(paths: TraitPaths, ids: list[int], values: np.ndarray, tag: str = "") -> None:
    rows = [{"id": i, "response": f"r{i}"} for i in ids]
    write_batch_part(paths, "pos", rows, {POOL: values}, tag=tag)


def test_batches_in_any_order_then_a_complete_run_is_renamed_into_place(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    rng = np.random.default_rng(0)
    slots = prepare_slots(paths, "pos", POOL, 6, SHAPE, [])
    assert slots == slots_file(paths, "pos", POOL) and slots.is_file()
    assert np.load(slots, allow_pickle=False).shape == (6, *SHAPE)
    want = _values(rng, 6)
    _batch(paths, [4, 5], want[4:], tag="-rank1")  # processes finish in any order
    _batch(paths, [0, 1, 2, 3], want[:4], tag="-rank0")
    inode = slots.stat().st_ino

    files = finalize_activation_file(paths, "pos", POOL, list(range(6)), SHAPE, write_pt=True)

    final = paths.activation_file("pos", POOL)
    pt = paths.activation_file("pos", POOL, ".pt")
    assert files == [paths.ids_file("pos", POOL), final, pt]
    assert final.stat().st_ino == inode and not slots.exists()  # renamed, not copied
    np.testing.assert_array_equal(np.load(final, allow_pickle=False), want)
    np.testing.assert_array_equal(torch.load(pt, weights_only=True).numpy(), want)
    assert np.load(paths.ids_file("pos", POOL)).tolist() == list(range(6))
    assert not list(paths.activations_dir.rglob(".tmp-*"))


def test_a_partial_set_of_rows_is_copied_and_the_slot_file_stays(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    want = _values(np.random.default_rng(1), 5)
    prepare_slots(paths, "pos", POOL, 5, SHAPE, [])
    _batch(paths, [0, 2, 4], want[[0, 2, 4]])
    paths.activation_file("pos", POOL, ".pt").write_bytes(b"stale")

    files = finalize_activation_file(paths, "pos", POOL, [0, 2, 4], SHAPE)

    got = np.load(paths.activation_file("pos", POOL), allow_pickle=False)
    np.testing.assert_array_equal(got, want[[0, 2, 4]])
    assert np.load(paths.ids_file("pos", POOL)).tolist() == [0, 2, 4]
    assert slots_file(paths, "pos", POOL).is_file()  # later runs fill the other rows
    assert not paths.activation_file("pos", POOL, ".pt").exists()  # would not match the .npy
    assert len(files) == 2


def test_more_rows_keep_the_finished_ones_from_the_final_file_and_old_parts(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    rng = np.random.default_rng(2)
    first = _values(rng, 4)
    prepare_slots(paths, "pos", POOL, 4, SHAPE, [])
    _batch(paths, [0, 1, 2, 3], first)
    finalize_activation_file(paths, "pos", POOL, [0, 1, 2, 3], SHAPE)  # slot file consumed
    # a journal part of an earlier tracekit version (npz) holding row 4
    legacy = _values(rng, 1)
    save_npz(paths.activation_parts_dir / "pos-0000004.npz", ids=np.array([4]), **{POOL: legacy})

    # a second run asks for 8 rows: rows 0-4 are finished, 5-7 are generated
    prepare_slots(paths, "pos", POOL, 8, SHAPE, [0, 1, 2, 3, 4])
    more = _values(rng, 3)
    _batch(paths, [5, 6, 7], more)
    finalize_activation_file(paths, "pos", POOL, list(range(8)), SHAPE)

    got = np.load(paths.activation_file("pos", POOL), allow_pickle=False)
    np.testing.assert_array_equal(got, np.concatenate([first, legacy, more]))


def test_a_finished_row_with_no_activations_anywhere_is_named(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    prepare_slots(paths, "pos", POOL, 3, SHAPE, [])
    _batch(paths, [0, 1, 2], _values(np.random.default_rng(3), 3))
    finalize_activation_file(paths, "pos", POOL, [0, 1, 2], SHAPE)
    paths.activation_file("pos", POOL).unlink()  # the only copy of rows 0-2

    with pytest.raises(InputError, match=r"3 finished pos row\(s\).*ids \[0, 1, 2\]"):
        prepare_slots(paths, "pos", POOL, 4, SHAPE, [0, 1, 2])
    assert not slots_file(paths, "pos", POOL).exists()
    assert not list(paths.activations_dir.rglob(".tmp-*"))


def test_an_up_to_date_final_file_is_kept_without_a_slot_file(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    prepare_slots(paths, "pos", POOL, 2, SHAPE, [])
    _batch(paths, [0, 1], _values(np.random.default_rng(4), 2))
    finalize_activation_file(paths, "pos", POOL, [0, 1], SHAPE)
    final = paths.activation_file("pos", POOL)
    before = (final.stat().st_ino, final.stat().st_mtime_ns)
    finalize_activation_file(paths, "pos", POOL, [0, 1], SHAPE)  # e.g. a judge-only rerun
    assert (final.stat().st_ino, final.stat().st_mtime_ns) == before
    assert not slots_file(paths, "pos", POOL).exists()


def test_writing_rows_without_a_slot_file_is_an_error(tmp_path: Path):
    paths = TraitPaths.of(tmp_path, "exp", "trait")
    with pytest.raises(InputError, match="slot file .* is missing"):
        _batch(paths, [0], _values(np.random.default_rng(5), 1))
    assert not paths.parts_dir.exists() or not list(paths.parts_dir.glob("*.json"))


def test_a_slot_file_that_cannot_be_created_is_one_clear_error(tmp_path: Path):
    from tracekit.errors import InputError

    paths = TraitPaths.of(tmp_path, "exp", "trait")
    paths.activations_dir.mkdir(parents=True)
    paths.activation_parts_dir.write_text("not a folder")  # creating the file fails (OSError)
    with pytest.raises(InputError, match=r"parts is a file, not a folder"):
        prepare_slots(paths, "pos", POOL, 1000, SHAPE, [])
