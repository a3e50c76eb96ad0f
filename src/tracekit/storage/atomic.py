"""Atomic file writes: a temp file in the target's directory, fsync, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one; temp files carry a
``.tmp-`` prefix so they are easy to recognise and are removed when a write fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tracekit.errors import OutputExistsError


@contextlib.contextmanager
def _replacing(path: str | os.PathLike[str]) -> Iterator[tuple[int, Path]]:
    """``(fd, temp path)`` of a new temp file next to ``path``; when the block ends without an
    error the temp file replaces ``path`` (the block has flushed and fsynced it), otherwise it
    is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        yield fd, tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created if missing) for the
    block: processes on one host that decide or build the same thing take turns, and the ones
    that waited find it done."""
    import fcntl

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on success it replaces ``path`` atomically."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open supports only 'w' and 'wb'")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
        kwargs.setdefault("newline", "")
    with _replacing(path) as (fd, _), os.fdopen(fd, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_npy_memmap(
    path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any
) -> Iterator[Any]:
    """A writable ``.npy`` memory map in a temp file next to ``path``; on success it is flushed,
    fsynced and replaces ``path`` atomically.

    For outputs assembled out of order from many pieces (journal parts): rows go straight to
    their place in the file, with no full in-memory copy of an array that can be GBs.
    """
    import numpy as np

    with _replacing(path) as (fd, tmp):
        try:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            yield array
            array.flush()
            del array
            os.fsync(fd)  # the same file: the pages written through the map are synced
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as UTF-8 JSON atomically (non-ASCII kept readable)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_npy(path: str | os.PathLike[str], array: Any) -> None:
    """``np.save`` atomically; refuses object arrays, which would need pickle to read back."""
    import numpy as np

    arr = np.asarray(array)
    with atomic_open(path, "wb") as handle:
        np.save(handle, arr, allow_pickle=False)


def save_npz(path: str | os.PathLike[str], compressed: bool = False, **arrays: Any) -> None:
    """``np.savez`` atomically; refuses object arrays, which would need pickle to read back."""
    import numpy as np

    converted = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in converted.items():
        if value.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype object; it would need pickle to load")
    saver = np.savez_compressed if compressed else np.savez
    with atomic_open(path, "wb") as handle:
        saver(handle, **converted)  # type: ignore[arg-type]


def check_writable(paths: list[Path] | Path, force: bool) -> None:
    """Raise :class:`OutputExistsError` if any output exists and ``force`` is false."""
    items = [paths] if isinstance(paths, Path) else paths
    existing = [p for p in items if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputExistsError(
            f"output already exists: {shown}{more}", "pass --force to overwrite it"
        )
