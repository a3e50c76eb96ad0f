from pathlib import Path

import numpy as np
import pytest

from tracekit.errors import OutputExistsError
from tracekit.storage import atomic_open, check_writable, save_npy, save_npz, write_json


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write('{"half": ')
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_npy_and_npz_refuse_object_arrays(tmp_path: Path):
    save_npy(tmp_path / "a.npy", np.array(["x", "yy"]))
    assert np.load(tmp_path / "a.npy", allow_pickle=False).tolist() == ["x", "yy"]
    with pytest.raises(ValueError):
        save_npy(tmp_path / "b.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(TypeError, match="dtype object"):
        save_npz(tmp_path / "c.npz", X=np.array([None], dtype=object))
    assert not (tmp_path / "b.npy").exists() and not (tmp_path / "c.npz").exists()


def test_check_writable(tmp_path: Path):
    existing = tmp_path / "x"
    existing.write_text("1")
    check_writable(tmp_path / "new", force=False)
    check_writable(existing, force=True)
    with pytest.raises(OutputExistsError, match="already exists"):
        check_writable([existing], force=False)


def test_npy_memmap_replaces_the_target_only_when_complete(tmp_path: Path):
    from tracekit.storage.atomic import atomic_npy_memmap

    target = tmp_path / "acts.npy"
    save_npy(target, np.zeros(2, dtype=np.float32))
    with pytest.raises(RuntimeError), atomic_npy_memmap(target, (3, 2), np.float32) as out:
        out[0] = 1.0
        raise RuntimeError("crash mid-merge")
    assert np.load(target).tolist() == [0.0, 0.0]  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.npy"]

    with atomic_npy_memmap(target, (3, 2), np.float32) as out:
        out[[2, 0]] = np.array([[5, 6], [1, 2]], dtype=np.float32)  # rows out of order
    loaded = np.load(target, allow_pickle=False)
    assert loaded.dtype == np.float32 and loaded.tolist() == [[1, 2], [0, 0], [5, 6]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.npy"]


def test_file_lock_makes_a_second_process_wait(tmp_path: Path):
    import subprocess
    import sys
    import time

    from tracekit.storage.atomic import file_lock

    lock = tmp_path / "sub" / "decisions.lock"
    log = tmp_path / "order.txt"
    child = (
        "import sys\n"
        "from tracekit.storage.atomic import file_lock\n"
        "open(sys.argv[2], 'a').write('child waits\\n')\n"
        "with file_lock(sys.argv[1]):\n"
        "    open(sys.argv[2], 'a').write('child in\\n')\n"
    )
    with file_lock(lock):
        proc = subprocess.Popen([sys.executable, "-c", child, str(lock), str(log)])
        deadline = time.monotonic() + 60
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the child is at the lock now
        with log.open("a") as f:
            f.write("parent out\n")
    assert proc.wait(timeout=60) == 0
    assert log.read_text().splitlines() == ["child waits", "parent out", "child in"]
    with file_lock(lock):  # released: taken again at once
        pass


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work():
    """/proc refuses new folders even for root (ENOENT): an InputError naming the path, not
    an unexpected FileNotFoundError after the work."""
    from tracekit.errors import InputError
    from tracekit.storage.atomic import output_lock

    missing = r"cannot write /proc/no-such-dir/out.*No such file"
    with pytest.raises(InputError, match=missing), output_lock(Path("/proc/no-such-dir/out")):
        pass
