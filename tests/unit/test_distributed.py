"""Sharding and launch guards of tracekit.distributed (no process group, no model)."""

import pytest

from tracekit.distributed import ProcessInfo, launch, process_info
from tracekit.errors import ConfigError
from tracekit.generation.run import GenerateConfig


def test_single_process_without_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = process_info()
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert info.part_tag() == ""
    assert info.shard(list(range(5)), key=int) == [0, 1, 2, 3, 4]


def test_shards_are_strided_by_id_disjoint_and_complete():
    ids = [0, 2, 3, 5, 6, 7, 9]  # e.g. what is left after a resume
    shards = [ProcessInfo(rank=r, world_size=3).shard(ids, key=int) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [7], [2, 5]]
    assert sorted(i for s in shards for i in s) == ids
    assert ProcessInfo(rank=2, world_size=3).part_tag() == "-rank2"


def test_launch_refuses_inside_a_distributed_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = GenerateConfig(experiment="e", traits=("refusal",))
    with pytest.raises(ConfigError, match="--num-processes inside an already distributed run"):
        launch(["generate"], config, 2)
