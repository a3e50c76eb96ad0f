"""A full disk, file modes and stray temp files (issue 31, points 1 and 5).

Two honest ways to fill a disk without root, both in a child process:

- a real 1 MB tmpfs, mounted in a user + mount namespace (``unshare -rm``): writes fail with
  ENOSPC exactly as on a full disk, and a write through a memory map of a sparse file dies of
  SIGBUS. Skipped where unprivileged user namespaces are disabled.
- ``RLIMIT_FSIZE`` with SIGXFSZ ignored: a write past the limit fails with EFBIG ("File too
  large"); works everywhere, but cannot reproduce the SIGBUS (extending the sparse file already
  fails).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _child(
    script: str, *, fsize: int | None = None, tmpfs: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (tracekit importable), under a file size limit of
    ``fsize`` bytes or with a 1 MB tmpfs mounted on ``tmpfs``."""
    body = textwrap.dedent(script)
    if fsize is not None:
        body = (
            "import resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n" + body
        )
    cmd = [sys.executable, "-c", body]
    if tmpfs is not None:
        cmd = [
            "unshare", "-rm", "sh", "-c",
            'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(tmpfs), *cmd,
        ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _tmpfs_available(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(probe)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A folder that the children of ``_child(..., tmpfs=...)`` see as a full 1 MB disk."""
    if not _tmpfs_available(tmp_path):
        pytest.skip("unprivileged user namespaces are disabled: no private tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    return mount


def test_a_slot_file_on_a_full_disk_is_one_line_not_a_sigbus(small_disk: Path):
    # 64 rows x 4 layers x 2048 floats = 2.1 MB of slots on a 1 MB disk. Unreserved, the sparse
    # file is created, and the first batch written through the map dies of SIGBUS (exit -7).
    done = _child(
        f"""
        import sys
        import numpy as np
        from tracekit.errors import DiskFullError
        from tracekit.storage.activation_slots import prepare_slots, write_slots
        from tracekit.storage.experiment import TraitPaths

        paths = TraitPaths.of({str(small_disk)!r}, "exp", "trait")
        try:
            prepare_slots(paths, "pos", "response_avg", 64, (4, 2048), [])
            write_slots(paths, "pos", list(range(64)),
                        {{"response_avg": np.ones((64, 4, 2048), np.float32)}})
        except DiskFullError as exc:
            print(exc.message)
            import os
            print(sorted(p.name for p in paths.activation_parts_dir.iterdir()))
            sys.exit(3)
        """,
        tmpfs=small_disk,
    )
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    message, listing = done.stdout.strip().splitlines()
    assert "pos_response_avg.slots.npy" in message and "it needs 2.1 MB" in message
    assert "No space left on device" in message
    assert listing == "[]"  # the temp file of the failed reservation is gone


def test_other_writes_on_a_full_disk_name_the_file(small_disk: Path):
    done = _child(
        f"""
        import sys
        from tracekit.errors import DiskFullError
        from tracekit.storage.atomic import write_text

        try:
            write_text({str(small_disk / "out" / "big.json")!r}, "x" * 2_000_000)
        except DiskFullError as exc:
            print(exc.message)
            sys.exit(3)
        """,
        tmpfs=small_disk,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "big.json" in done.stdout and "No space left on device" in done.stdout


def test_a_store_on_a_full_disk_names_the_store(small_disk: Path):
    done = _child(
        f"""
        import sys
        import numpy as np
        from tracekit.errors import StoreError
        from tracekit.storage.activation_store import ActivationStoreWriter, PendingEntry

        prov = {{"model": "m", "layers": [1], "sequence_mode": "all", "dtype": "float16"}}
        with ActivationStoreWriter({str(small_disk / "acts.lmdb")!r}, prov) as writer:
            try:
                for i in range(64):
                    arrays = {{"layer_1": np.ones((50, 1000), np.float16)}}
                    writer.write_batch([PendingEntry(f"k{{i}}", {{"prompt": str(i)}}, arrays)])
            except StoreError as exc:
                print(exc.message)
                sys.exit(3)
        """,
        tmpfs=small_disk,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"cannot write to store {small_disk / 'acts.lmdb'}" in done.stdout


def test_a_file_size_limit_names_the_file_and_the_space(tmp_path: Path):
    # RLIMIT_FSIZE: the portable stand-in for a full disk (EFBIG instead of ENOSPC)
    target = tmp_path / "acts.npy"
    done = _child(
        f"""
        import sys
        import numpy as np
        from tracekit.errors import DiskFullError
        from tracekit.storage.atomic import atomic_npy_memmap, save_npz

        for write in (
            lambda: atomic_npy_memmap({str(target)!r}, (1000, 1000), np.float32).__enter__(),
            lambda: save_npz({str(tmp_path / "d.npz")!r}, X=np.ones((1000, 100))),
        ):
            try:
                write()
            except DiskFullError as exc:
                print(exc.message)
        """,
        fsize=100_000,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()
    assert f"cannot write {target} (it needs 4.0 MB): File too large" == first
    assert "d.npz" in second and "File too large" in second
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp files left


def test_new_files_honour_the_umask_and_replacing_keeps_the_mode(tmp_path: Path):
    from tracekit.storage.atomic import atomic_npy_memmap, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "1")
        with atomic_npy_memmap(tmp_path / "b.npy", (2,), np.float32):
            pass
        os.umask(0o077)
        write_text(tmp_path / "c.txt", "1")
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode == {"a.txt": 0o644, "b.npy": 0o644, "c.txt": 0o600}

    (tmp_path / "a.txt").chmod(0o640)  # a file replaced in place (judging) keeps its mode
    write_text(tmp_path / "a.txt", "2")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_output_lock_removes_temp_files_a_killed_run_left(tmp_path: Path):
    from tracekit.storage.atomic import output_lock

    parts = tmp_path / "trait" / "activations" / "parts"
    parts.mkdir(parents=True)
    stray = parts / ".tmp-pos_response_avg.slots.npy.k2j3h4"
    stray.write_bytes(b"\0" * 100)
    keep = parts / "pos_response_avg.slots.npy"
    keep.write_bytes(b"1")
    with output_lock(tmp_path / "trait"):
        assert not stray.exists() and keep.exists()

    judged = tmp_path / "rows.csv"  # a file output: only its own temp files
    judged.write_text("a\n")
    (tmp_path / ".tmp-rows.csv.abc").write_text("half")
    (tmp_path / ".tmp-other.csv.abc").write_text("not ours")
    with output_lock(judged, folder=False):
        names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-"))
    assert names == [".tmp-other.csv.abc"]
