"""Atomic file writes: a temp file in the target's directory, fsync, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one; temp files carry a
``.tmp-`` prefix so they are easy to recognise and are removed when a write fails (a killed
process leaves its temp files behind: the next run that holds the output's lock removes them,
:func:`remove_stray_temps`).

Also here: the one-writer lock of an output (:func:`output_lock`), the file mode of new files
(the umask's, or the replaced file's own), and the one message a full disk gets
(:class:`~tracekit.errors.DiskFullError`: the file and, where known, the space it needs).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tracekit.errors import DiskFullError, InputError, OutputExistsError, OutputLockedError

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""No space on the device, over a disk quota, or over the process's file size limit."""

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be; else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(target: Path) -> int:
    """The mode a file written to ``target`` gets: an existing file's own mode (replacing a file
    keeps it), else ``0666`` less the umask, as ``open()`` would create it."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def disk_full_error(target: Path, exc: OSError, needed: int | None = None) -> DiskFullError:
    """The one message for a full disk (or a quota or file size limit) while writing ``target``."""
    space = f" (it needs {human_bytes(needed)})" if needed else ""
    reason = exc.strerror or os.strerror(exc.errno or 0)
    return DiskFullError(
        f"cannot write {target}{space}: {reason}",
        "free disk space (or write to another disk) and run the same command again; "
        "finished work is kept",
    )


def raise_if_disk_full(target: Path, exc: BaseException, needed: int | None = None) -> None:
    """Raise :func:`disk_full_error` for ``exc`` if it is a full disk (else return)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        raise disk_full_error(target, exc, needed) from exc


@contextlib.contextmanager
def _replacing(
    path: str | os.PathLike[str], needed: int | None = None
) -> Iterator[tuple[int, Path]]:
    """``(fd, temp path)`` of a new temp file next to ``path``; when the block ends without an
    error the temp file replaces ``path`` (the block has flushed and fsynced it), otherwise it
    is removed. The temp file has the mode ``path`` will have (:func:`new_file_mode`); a full
    disk becomes :class:`DiskFullError` naming ``path``."""
    target = Path(path)
    make_parent(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
    except OSError as exc:
        raise_if_not_writable(target, exc, needed)
        raise
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, new_file_mode(target))
        yield fd, tmp
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise_if_disk_full(target, exc, needed)
        raise


def make_parent(target: Path) -> None:
    """Create ``target``'s folder (and its parents), or say in one line why it cannot be."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise_if_not_writable(target, exc)
        raise _cannot_create(target, exc) from None


def _cannot_create(target: Path, exc: OSError) -> InputError:
    return InputError(
        f"cannot write {target}: {exc.strerror or exc} ({exc.filename or target.parent})",
        "choose a writable output folder",
    )


_NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def raise_if_not_writable(target: Path, exc: OSError, needed: int | None = None) -> None:
    """Raise the one-line error for creating ``target`` failing with ``exc`` (a full disk, no
    permission, a read-only file system, a parent that is a file); return if it is none of
    those."""
    raise_if_disk_full(target, exc, needed)
    if exc.errno in _NO_PERMISSION:
        reason = "the file system is read-only" if exc.errno == errno.EROFS else "no permission"
        raise InputError(
            f"cannot write {target}: {reason} to create files in {target.parent}",
            "choose a writable output folder, or change its permissions",
        ) from None
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        raise InputError(
            f"cannot write {target}: {_first_file(target.parent)} is a file, not a folder",
            "choose an output path whose folders are folders",
        ) from None


def _first_file(folder: Path) -> Path:
    """The first ancestor of ``folder`` (itself included) that exists as a non-folder."""
    for candidate in reversed([folder, *folder.parents]):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return folder


def remove_stray_temps(folder: Path, pattern: str = ".tmp-*", recursive: bool = True) -> list[Path]:
    """Remove the temp files (``pattern``) that killed runs left in ``folder`` (and its
    subfolders with ``recursive``); return them.

    Call only while holding the output's :func:`output_lock` (no other writer is mid-write)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for stray in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if stray.is_file() and not stray.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                stray.unlink()
                removed.append(stray)
    return removed


LOCK_NAME = ".tracekit.lock"
"""The lock file inside an output folder (:func:`output_lock`)."""


def lock_file_of(output: Path, folder: bool) -> Path:
    """The lock file of ``output``: inside it for a folder, a hidden sibling for a file or a
    folder whose contents belong to another format (an LMDB store)."""
    return output / LOCK_NAME if folder else output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike[str], folder: bool = True) -> Iterator[None]:
    """Hold the one-writer lock of ``output`` for the block, or refuse at once with
    :class:`OutputLockedError` naming the holder's pid.

    ``flock`` on :func:`lock_file_of` ``output``: the kernel drops the lock when the holder
    exits however it exits (``kill -9`` included), so a stale lock never blocks the next run.
    Holding it, the temp files a killed writer left are removed (the whole folder for a folder,
    ``.tmp-NAME.*`` for a file). The lock file is removed on release (still locked; a process
    that opened it meanwhile sees it is gone and opens a new one), with the folders made for it
    if they stayed empty: a run refused before writing anything leaves nothing behind. A second
    ``output_lock`` of one output in one process is refused like another process's."""
    import fcntl

    target = Path(output)
    lock_path = lock_file_of(target, folder)
    made = [p for p in (lock_path.parent, *lock_path.parent.parents) if not p.exists()]
    make_parent(lock_path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise_if_not_writable(lock_path, exc)
            raise _cannot_create(lock_path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            _remove_empty(made)
            raise OutputLockedError(
                f"{target} is being written by another tracekit process (pid {holder})",
                "wait for it to finish or stop it, then run again",
            ) from None
        try:
            opened, current = os.fstat(fd), os.stat(lock_path)
            if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed that file when it finished: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        if folder:
            remove_stray_temps(target)
        else:
            remove_stray_temps(target.parent, f".tmp-{target.name}.*", recursive=False)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        _remove_empty(made)
        os.close(fd)  # releases the lock


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they are empty."""
    for made in folders:
        with contextlib.suppress(OSError):
            made.rmdir()


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

    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with _replacing(path, needed) as (fd, tmp):
        try:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            # reserve every block now: a write through the map to a full disk is a SIGBUS
            reserve_space(fd, os.fstat(fd).st_size)
            yield array
            array.flush()
            del array
            os.fsync(fd)  # the same file: the pages written through the map are synced
        finally:
            os.close(fd)


def reserve_space(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the file ``fd`` on disk (holes of a sparse file included), so
    that writing them through a memory map cannot fail later: the failure comes here, as an
    ``OSError`` (ENOSPC, EFBIG), not as a SIGBUS mid-run. File systems that cannot reserve
    (EOPNOTSUPP, EINVAL) are left as they are."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise


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
