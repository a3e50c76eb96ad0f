"""Activation files: the only reader and writer of ``activations/{polarity}_{pooling}.npy``
(with its ``_ids.npy`` and optional ``.pt``) and of the slot files a run writes them through.

Slot files: a ``generate`` run's pooled activations, written in place as batches finish.

Per polarity and pooling, ``activations/parts/{polarity}_{pooling}.slots.npy`` is a float32
``.npy`` of shape ``[rows, n_layers, hidden]`` indexed by row id. The main process creates it
(sparse, so creating it costs nothing) before any batch runs; each finished batch writes its
rows into their slots and flushes them to disk *before* its response part is written, so a row
is finished exactly when a response part holds it, as before. At the end of a complete run
the slot file already is the final ``{polarity}_{pooling}.npy`` (rows in id order) and is moved
there by a rename: the activations are written once, during generation, on the journal thread,
instead of once into per-batch parts and again by a merge after the last batch. Several
processes write disjoint rows of the same memory-mapped file (one host; a shared-memory mapping
keeps them coherent).

Invariant: when a slot file exists, every finished row below its length holds that row's
activations. A slot file is (re)built only with every finished row filled: from the previous
slot file, the final files of an earlier run, or the per-batch ``{polarity}-*.npz`` parts that
journals of earlier tracekit versions hold.
"""

from __future__ import annotations

import contextlib
import mmap
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.errors import InputError, StoreError
from tracekit.storage.atomic import atomic_npy_memmap, atomic_open, save_npy
from tracekit.storage.npy import read_npy_header

if TYPE_CHECKING:
    import numpy as np

    from tracekit.models.loading import LoadedModel
    from tracekit.storage.experiment import Polarity, TraitPaths

_COPY_ROWS = 1024
"""Rows per chunk when slots are copied into a differently shaped file."""


def slots_file(paths: TraitPaths, polarity: Polarity, pooling: str) -> Path:
    return paths.activation_parts_dir / f"{polarity}_{pooling}.slots.npy"


def _shape(path: Path) -> tuple[int, ...] | None:
    """The shape of a float32 C-order ``.npy`` file, None if it is missing or not one."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            shape, fortran, dtype = read_npy_header(handle)
    except (OSError, ValueError):
        return None
    if fortran or dtype != np.float32:
        return None
    return tuple(shape)


class _Mapped:
    """A read-write memory map of a float32 ``.npy`` file, as an array; flushes row ranges
    (``np.memmap`` flushes only the whole map)."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        self._file = open(path, "r+b")  # noqa: SIM115 (closed in close())
        try:
            shape, _, dtype = read_npy_header(self._file)
            self._offset = self._file.tell()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_WRITE)
        except BaseException:
            self._file.close()
            raise
        self.array: np.ndarray = np.ndarray(shape, dtype, buffer=self._map, offset=self._offset)
        self._row_bytes = self.array[0].nbytes if len(self.array) else 0

    def flush_rows(self, first: int, last: int) -> None:
        """Write rows ``first..last`` (inclusive) to disk (msync of the pages holding them)."""
        start = self._offset + first * self._row_bytes
        end = self._offset + (last + 1) * self._row_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        self._map.flush(aligned, end - aligned)

    def close(self) -> None:
        del self.array
        self._map.close()
        self._file.close()


def write_slots(
    paths: TraitPaths, polarity: Polarity, ids: Sequence[int], pooled: Mapping[str, Any]
) -> None:
    """Put one batch's rows (``ids``, in the order of ``pooled``'s first axis) into their slots
    and flush them to disk."""
    import numpy as np

    at = np.asarray(ids, dtype=np.int64)
    for pooling, values in pooled.items():
        path = slots_file(paths, polarity, pooling)
        try:
            mapped = _Mapped(path)
        except (OSError, ValueError):
            raise InputError(
                f"slot file {path} is missing or damaged",
                "run the same command again to rebuild it, or pass --force to start over",
            ) from None
        try:
            if len(at) and int(at.max()) >= len(mapped.array):
                raise InputError(
                    f"row id {int(at.max())} is past the end of {path}",
                    "run the same command again to rebuild it, or pass --force to start over",
                )
            mapped.array[at] = values
            if len(at):
                mapped.flush_rows(int(at.min()), int(at.max()))
        finally:
            mapped.close()


def prepare_slots(
    paths: TraitPaths,
    polarity: Polarity,
    pooling: str,
    n_rows: int,
    row_shape: tuple[int, int],
    done: Sequence[int],
) -> Path:
    """Make sure the slot file has room for ``n_rows`` rows and every id in ``done`` (finished
    rows), each finished row filled; return its path.

    A slot file of the right row shape and length is kept as it is (the common case: a fresh
    run creates an empty sparse file once, a resumed one finds it). Otherwise a new one is
    built, filled from the old slot file, the final files and old-style ``.npz`` parts, and
    swapped in atomically. Raises :class:`InputError` when a finished row's activations are
    nowhere to be found.
    """
    import numpy as np

    target = slots_file(paths, polarity, pooling)
    need = max([n_rows, *(int(i) + 1 for i in done)])
    current = _shape(target)
    if current is not None and current[1:] == row_shape and current[0] >= need:
        _reserve_existing(target)
        return target
    wanted = np.zeros(need, dtype=bool)
    wanted[np.asarray(list(done), dtype=np.int64)] = True
    filled = np.zeros(need, dtype=bool)
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(atomic_npy_memmap(target, (need, *row_shape), np.float32))
        except OSError as exc:  # not a full disk (that is a DiskFullError naming the file)
            gigabytes = need * row_shape[0] * row_shape[1] * 4 / 1e9
            raise StoreError(
                f"cannot create the activation slot file {target} ({gigabytes:.1f} GB when "
                f"full): {exc.strerror or exc}",
                "free disk space, or capture fewer --layers / --pooling or fewer --n-examples",
            ) from exc
        if wanted.any():
            _fill_from_final(paths, polarity, pooling, row_shape, out, wanted, filled)
            _fill_from_parts(paths, polarity, pooling, out, wanted, filled)
            if current is not None and current[1:] == row_shape:
                old = np.load(target, mmap_mode="r", allow_pickle=False)
                for first in range(0, min(current[0], need), _COPY_ROWS):
                    last = min(first + _COPY_ROWS, current[0], need)
                    keep = wanted[first:last]
                    out[first:last][keep] = old[first:last][keep]
                    filled[first:last] |= keep
            lacking = np.flatnonzero(wanted & ~filled)
            if len(lacking):
                raise InputError(
                    f"activations of {len(lacking)} finished {polarity} row(s) of "
                    f"{paths.root.name} ({pooling}; ids {lacking[:3].tolist()}) are in no "
                    "journal or output file",
                    "pass --force to regenerate",
                )
    return target


def _reserve_existing(path: Path) -> None:
    """Allocate the holes of a slot file an earlier run created sparse (writing rows into them
    through the map on a full disk would be a SIGBUS; this is an error message instead)."""
    import os

    from tracekit.storage.atomic import raise_if_disk_full, reserve_space

    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            reserve_space(handle.fileno(), size)
        except OSError as exc:
            raise_if_disk_full(path, exc, size)
            raise


def _fill_from_final(
    paths: TraitPaths,
    polarity: Polarity,
    pooling: str,
    row_shape: tuple[int, int],
    out: np.ndarray,
    wanted: np.ndarray,
    filled: np.ndarray,
) -> None:
    import numpy as np

    final, ids_file = paths.activation_file(polarity, pooling), paths.ids_file(polarity, pooling)
    shape = _shape(final)
    if shape is None or shape[1:] != row_shape or not ids_file.is_file():
        return
    ids = np.load(ids_file, allow_pickle=False)
    if ids.shape != (shape[0],):
        return
    source = np.load(final, mmap_mode="r", allow_pickle=False)
    keep = np.flatnonzero((ids >= 0) & (ids < len(wanted)))
    keep = keep[wanted[ids[keep]]]
    for first in range(0, len(keep), _COPY_ROWS):
        chunk = keep[first : first + _COPY_ROWS]
        out[ids[chunk]] = source[chunk]
        filled[ids[chunk]] = True


def _fill_from_parts(
    paths: TraitPaths,
    polarity: Polarity,
    pooling: str,
    out: np.ndarray,
    wanted: np.ndarray,
    filled: np.ndarray,
) -> None:
    """Rows from the per-batch ``.npz`` parts of earlier tracekit versions (later parts win)."""
    import numpy as np

    for part in sorted(paths.activation_parts_dir.glob(f"{polarity}-*.npz")):
        with np.load(part, allow_pickle=False) as data:
            if pooling not in data:
                continue
            ids = data["ids"].astype(np.int64)
            keep = np.flatnonzero((ids >= 0) & (ids < len(wanted)))
            keep = keep[wanted[ids[keep]]]
            if len(keep):
                out[ids[keep]] = data[pooling][keep]
                filled[ids[keep]] = True


def finalize_activation_file(
    paths: TraitPaths,
    polarity: Polarity,
    pooling: str,
    ids: Sequence[int],
    row_shape: tuple[int, int],
    write_pt: bool = False,
) -> list[Path]:
    """Write ``{polarity}_{pooling}.npy`` and ``_ids.npy`` (and ``.pt`` with ``write_pt``) for
    rows ``ids`` (ascending) from the slot file; return the paths.

    When ``ids`` are exactly ``0..len-1`` and the slot file has that length (a complete run),
    the slot file is renamed into place: no copy. Otherwise the rows are copied into a new file
    and the slot file stays for later runs. With no slot file (nothing generated this run), a
    final file that already holds exactly ``ids`` is kept as it is.
    """
    import numpy as np

    final, ids_file = paths.activation_file(polarity, pooling), paths.ids_file(polarity, pooling)
    order = np.asarray(list(ids), dtype=np.int64)
    slots = slots_file(paths, polarity, pooling)
    shape = _shape(slots)
    if (
        shape is None
        and _shape(final) == (len(order), *row_shape)
        and ids_file.is_file()
        and np.array_equal(np.load(ids_file, allow_pickle=False), order)
    ):  # nothing generated since the file was written
        return publish_activation_file(paths, polarity, pooling, order, write_pt)
    if shape is None or shape[1:] != row_shape or (len(order) and order[-1] >= shape[0]):
        prepare_slots(paths, polarity, pooling, 0, row_shape, order.tolist())
        shape = _shape(slots)
    assert shape is not None
    if shape[0] == len(order) and np.array_equal(order, np.arange(len(order))):
        return publish_activation_file(paths, polarity, pooling, order, write_pt, source=slots)
    source = np.load(slots, mmap_mode="r", allow_pickle=False)
    with atomic_npy_memmap(final, (len(order), *row_shape), np.float32) as out:
        for first in range(0, len(order), _COPY_ROWS):
            chunk = order[first : first + _COPY_ROWS]
            out[first : first + len(chunk)] = source[chunk]
    return publish_activation_file(paths, polarity, pooling, order, write_pt)


def activation_outputs(
    paths: TraitPaths, polarities: Iterable[Polarity], poolings: Iterable[str]
) -> list[Path]:
    """Every file an activation set of ``polarities`` x ``poolings`` may write: the ``.npy``,
    its ``_ids.npy`` and the ``.pt`` copy of each (what ``--force`` must allow to replace)."""
    poolings = list(poolings)
    return [
        path
        for polarity in polarities
        for pooling in poolings
        for path in (
            paths.activation_file(polarity, pooling),
            paths.ids_file(polarity, pooling),
            paths.activation_file(polarity, pooling, ".pt"),
        )
    ]


def publish_activation_file(
    paths: TraitPaths,
    polarity: Polarity,
    pooling: str,
    ids: Iterable[int],
    write_pt: bool = False,
    source: Path | None = None,
) -> list[Path]:
    """Finish one activation file: move ``source`` (a complete float32 ``.npy`` next to it) into
    place as ``{polarity}_{pooling}.npy`` when given, write ``_ids.npy``, and write the ``.pt``
    copy with ``write_pt`` or else remove one an earlier run left (it would no longer match).
    Returns the paths written."""
    import os

    import numpy as np

    final = paths.activation_file(polarity, pooling)
    if source is not None:
        with open(source, "rb+") as handle:
            os.fsync(handle.fileno())  # rows written through memory maps, the header too
        os.replace(source, final)
    save_npy(paths.ids_file(polarity, pooling), np.asarray(list(ids), dtype=np.int64))
    pt = paths.activation_file(polarity, pooling, ".pt")
    if not write_pt:
        pt.unlink(missing_ok=True)
        return [paths.ids_file(polarity, pooling), final]
    write_pt_file(pt, np.load(final, mmap_mode="r", allow_pickle=False))
    return [paths.ids_file(polarity, pooling), final, pt]


def write_pt_file(path: Path, array: np.ndarray) -> None:
    """``array`` as a ``.pt`` tensor file, streamed into the temp file (no in-memory copy)."""
    import warnings

    import numpy as np
    import torch

    with atomic_open(path, "wb") as handle, warnings.catch_warnings():
        # a read-only memory map: torch only reads it while saving
        warnings.filterwarnings("ignore", message=".*not writable.*")
        torch.save(torch.from_numpy(np.asarray(array)), handle)


def save_activations(
    paths: TraitPaths,
    polarity: Polarity,
    ids: Sequence[int],
    pooled: Mapping[str, np.ndarray],
    write_pt: bool = False,
) -> list[Path]:
    """Write ``{polarity}_{pooling}.npy`` and ``_ids.npy`` per pooling from in-memory arrays
    (and ``.pt`` with ``write_pt``; see :func:`publish_activation_file`); return the paths."""
    import numpy as np

    files: list[Path] = []
    for pooling, array in pooled.items():
        save_npy(paths.activation_file(polarity, pooling), np.asarray(array, dtype=np.float32))
        files += publish_activation_file(paths, polarity, pooling, ids, write_pt)
    return files


def load_activations(paths: TraitPaths, polarity: Polarity, pooling: str) -> tuple[Any, Any]:
    """``(ids [n], activations [n, n_layers, hidden])`` as numpy arrays, without pickle."""
    import numpy as np

    npy = paths.activation_file(polarity, pooling)
    if not npy.is_file():
        hint = (
            "run 'tracekit generate --extract-activations' or 'tracekit extract activations' "
            f"with --pooling {pooling}"
        )
        if (paths.activations_dir / "all_layers.pt").is_file():
            hint = (
                "this folder holds the seeds' activations/all_layers.pt: import it with "
                f"'tracekit extract import --experiment {paths.root.parent.name} "
                f"--trait {paths.root.name}'"
            )
        raise InputError(f"activations not found: {npy}", hint)
    acts = read_npy(npy, "[rows, layers, hidden] floats", ndim=3, kinds="fiu")
    ids_path = paths.ids_file(polarity, pooling)
    ids = (
        read_npy(ids_path, "row ids", ndim=1, kinds="iu")
        if ids_path.is_file()
        else np.arange(len(acts))
    )
    if len(ids) != len(acts):
        raise InputError(f"{ids_path} has {len(ids)} ids but {npy} has {len(acts)} rows")
    return ids, acts


def read_npy(path: Path, what: str, ndim: int, kinds: str) -> np.ndarray:
    """``np.load`` without pickle, or one line saying why the file is not ``what``: object
    arrays (pickle), truncated or non-``.npy`` files, a wrong number of dimensions, or a dtype
    kind outside ``kinds`` (numpy's letters: f float, i/u integer)."""
    import numpy as np

    def refuse(problem: str) -> InputError:
        return InputError(
            f"{path} is not {what}: {problem}",
            "re-run 'tracekit generate' or 'tracekit extract activations --force' to rewrite it",
        )

    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise refuse("it holds Python objects, which would need pickle to load") from None
        raise refuse(f"not a readable .npy file ({str(exc).splitlines()[0]})") from None
    except (EOFError, OSError) as exc:
        raise refuse(f"not a readable .npy file ({exc})") from None
    if array.ndim != ndim:
        raise refuse(f"it has shape {array.shape}")
    if array.dtype.kind not in kinds:
        raise refuse(f"it holds {array.dtype} values")
    return array


def activation_metadata(
    loaded: LoadedModel,
    layers: tuple[int, ...],
    poolings: list[str],
    rows: dict[str, int],
    source: str,
    previous: Path | None = None,
) -> dict[str, Any]:
    """``activations/metadata.json``: what each pooling's files hold and how they were made.

    Entries for poolings not written now are kept from ``previous`` (an earlier metadata
    file), since their files stay; each pooling records its own layers and source.
    """
    import json

    entries: dict[str, Any] = {}
    if previous is not None and previous.is_file():
        try:
            entries = dict(json.loads(previous.read_text(encoding="utf-8")).get("poolings", {}))
        except (OSError, ValueError, AttributeError):
            entries = {}
    for pooling in poolings:
        entries[pooling] = {
            "source": source,
            "layers": list(layers),
            "shape": {p: [n, len(layers), loaded.hidden_size] for p, n in rows.items()},
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    return {
        **loaded.provenance(),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "layer_indexing": "0 = embedding output; i = residual stream after decoder block i-1 "
        "(before the final norm)",
        "files": {
            "activations": "{polarity}_{pooling}.npy and .pt (float32 [n_rows, n_layers, hidden])",
            "ids": "{polarity}_{pooling}_ids.npy (int64 row ids; pos and neg pair by id)",
        },
        "poolings": entries,
    }
