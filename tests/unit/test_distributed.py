"""Sharding and launch guards of tracekit.distributed (no process group, no model)."""

import os

import pytest

from tracekit.config.generate import GenerateConfig
from tracekit.distributed import (
    COMPILE_THREADS_ENV,
    GPU_PER_PROCESS_ENV,
    ProcessInfo,
    isolate_gpu,
    launch,
    process_info,
    share_host_cpus,
)
from tracekit.errors import ConfigError


def test_single_process_without_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = process_info()
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert info.part_tag() == ""
    assert info.block(list(range(5)), multiple=2) == [0, 1, 2, 3, 4]
    assert ProcessInfo(rank=2, world_size=3).part_tag() == "-rank2"


def test_blocks_are_contiguous_disjoint_complete_and_balanced():
    rows = [0, 2, 3, 5, 6, 7, 9]  # e.g. what is left after a resume
    blocks = [ProcessInfo(rank=r, world_size=3).block(rows) for r in range(3)]
    assert blocks == [[0, 2], [3, 5], [6, 7, 9]]
    assert ProcessInfo().block(rows) == rows
    # 2 processes over 256 rows in batches of 64: each process's batches are single-run batches
    halves = [ProcessInfo(rank=r, world_size=2).block(list(range(256))) for r in range(2)]
    single = [list(range(i, i + 64)) for i in range(0, 256, 64)]
    assert [h[i : i + 64] for h in halves for i in range(0, 128, 64)] == single


@pytest.mark.parametrize(("n", "world", "batch"), [(100, 2, 8), (13, 3, 4), (5, 4, 4), (0, 2, 8)])
def test_blocks_cut_at_batch_multiples(n, world, batch):
    """Whatever the row count, each process's batches are batches of the single run."""
    rows = list(range(n))
    blocks = [
        ProcessInfo(rank=r, world_size=world).block(rows, multiple=batch) for r in range(world)
    ]
    assert [i for b in blocks for i in b] == rows  # disjoint, complete, in order
    single = [rows[i : i + batch] for i in range(0, n, batch)]
    per_process = [b[i : i + batch] for b in blocks for i in range(0, len(b), batch)]
    assert per_process == single
    # the index range of each block (where its rows start in the whole list)
    spans = [ProcessInfo(rank=r, world_size=world).block_range(n, batch) for r in range(world)]
    assert [list(span) for span in spans] == blocks
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= batch


@pytest.mark.parametrize(
    ("flag", "local_rank", "visible", "expected"),
    [
        ("1", "1", None, "1"),  # the local rank's GPU
        ("1", "1", "4,6", "6"),  # the local rank's entry of the launcher's list
        ("1", "2", "4,6", "4,6"),  # more processes than GPUs: left alone
        ("0", "1", "4,6", "4,6"),  # opted out
        (None, "1", "4,6", "4,6"),  # not started by tracekit's launcher
    ],
)
def test_isolate_gpu_shows_each_launched_process_its_own_gpu(
    monkeypatch, flag, local_rank, visible, expected
):
    for name, value in ((GPU_PER_PROCESS_ENV, flag), ("CUDA_VISIBLE_DEVICES", visible)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    isolate_gpu()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == expected


@pytest.mark.parametrize(
    ("local_world", "preset", "expected"),
    [
        ("2", None, 3),  # 6 CPUs over 2 processes
        ("4", None, 1),  # at least one worker
        ("1", None, None),  # one process: torch's own default
        (None, None, None),  # not launched
        ("2", "7", "7"),  # the user's value is kept
    ],
)
def test_compile_workers_are_shared_by_the_processes_of_a_host(
    monkeypatch, local_world, preset, expected
):
    for name, value in (("LOCAL_WORLD_SIZE", local_world), (COMPILE_THREADS_ENV, preset)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    share_host_cpus()
    got = os.environ.get(COMPILE_THREADS_ENV)
    assert got == (None if expected is None else str(expected))


def test_launch_refuses_inside_a_distributed_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = GenerateConfig(experiment="e", traits=("refusal",))
    with pytest.raises(ConfigError, match="--num-processes inside an already distributed run"):
        launch(["generate"], config, 2)


PROV = {"model": "org/model-a", "layers": [1], "sequence_mode": "all", "dtype": "float16"}


def _entry(key: str, value: float):
    import numpy as np

    from tracekit.storage.activation_store import PendingEntry

    arrays = {"layer_1": np.full((2, 3), value, dtype=np.float16)}
    return PendingEntry(key=key, metadata={"prompt": key}, arrays=arrays)


def test_merge_from_copies_missing_entries_and_refuses_another_setup(tmp_path):
    from tracekit.errors import StoreError
    from tracekit.storage.activation_store import ActivationStoreWriter, open_store

    with ActivationStoreWriter(tmp_path / "shard", {**PROV, "created": 2.0}) as shard:
        shard.write_batch([_entry("a", 1.0), _entry("b", 2.0)])
    with ActivationStoreWriter(tmp_path / "main", PROV) as main:
        main.write_batch([_entry("a", 9.0)])  # already merged: kept as it is
        assert main.merge_from(tmp_path / "shard", batch=1) == 1
    with open_store(tmp_path / "main") as store:
        assert sorted(store.keys()) == ["a", "b"]
        assert store.get("a").arrays["layer_1"][0, 0] == 9.0
        assert store.get("b").arrays["layer_1"].tolist() == [[2.0] * 3] * 2
        assert store.get("b").metadata["prompt"] == "b"
        assert len(store.provenance) == 1

    with ActivationStoreWriter(tmp_path / "other", {**PROV, "model": "org/model-b"}) as other:
        other.write_batch([_entry("c", 3.0)])
    with ActivationStoreWriter(tmp_path / "main", PROV) as main:
        with pytest.raises(StoreError, match="was written by another setup than"):
            main.merge_from(tmp_path / "other")
        assert main.merge_from(tmp_path / "other", allow_mixed=True) == 1


def test_a_gloo_group_is_destroyed_before_the_interpreter_shuts_down():
    """The exit handler leaves the group while Python is still alive (a live gloo group can
    abort the process in its destructor during shutdown)."""
    import subprocess
    import sys

    code = (
        "import atexit, socket\n"
        "import torch.distributed as dist\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0,"
        " world_size=1)\n"
        # registered first, so it runs after tracekit's handler (atexit is last-in, first-out)
        "atexit.register(lambda: print('alive at exit:', dist.is_initialized()))\n"
        "from tracekit.distributed import _leave_group_at_exit\n"
        "_leave_group_at_exit(); _leave_group_at_exit()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "alive at exit: False"


def test_model_config_per_process_refuses_a_device_map_when_data_parallel():
    from tracekit.distributed import process_model_config
    from tracekit.errors import ConfigError
    from tracekit.models import ModelConfig

    split = ModelConfig(device_map="auto")
    assert process_model_config(split, ProcessInfo()) == split  # one process: as given
    with pytest.raises(ConfigError, match="--device-map auto cannot be combined"):
        process_model_config(split, ProcessInfo(rank=1, world_size=2))
    on_cpu = ModelConfig(device="cpu")
    assert process_model_config(on_cpu, ProcessInfo(rank=1, world_size=2)).device == "cpu"


@pytest.mark.parametrize("with_group", [True, False])
def test_exit_process_keeps_the_status_and_the_output(with_group):
    """``python -m tracekit`` ends through exit_process: with a gloo group it leaves it and
    ends hard (no interpreter finalization), and its status and buffered output survive."""
    import subprocess
    import sys

    code = (
        "import socket, sys\n"
        "import torch.distributed as dist\n"
        "from tracekit.distributed import exit_process\n"
        f"if {with_group}:\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0,"
        " world_size=1)\n"
        "print('written before the end')\n"  # block-buffered: stdout is a pipe
        "exit_process(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])\n"
    )
    for status, want_code, want_err in (("3", 3, ""), ("0", 0, ""), ("no way", 1, "no way")):
        done = subprocess.run(
            [sys.executable, "-c", code, status],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == want_code, done.stderr[-3000:]
        assert done.stdout == "written before the end\n"
        assert want_err in done.stderr
