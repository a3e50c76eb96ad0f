"""Out-of-memory batch halving in `tracekit.generate`, with a test engine registered through the
public engine registry: it runs the real reference engine but raises CUDA's out-of-memory error
for batches larger than it can "fit", as a GPU would."""

import logging

import pytest
import torch

from tracekit.config.generate import GenerateConfig
from tracekit.engines import interface as engine_module
from tracekit.engines.hf import HFEngine
from tracekit.jobs.generate import generate
from tracekit.storage.experiment import TraitPaths, read_parts

pytestmark = pytest.mark.integration


class SmallMemoryEngine(HFEngine):
    """The reference engine on a device that fits at most two rows per batch."""

    name = "small-memory"
    batches: list[int] = []
    pads: list[int | None] = []

    def start(self, request):
        SmallMemoryEngine.batches.append(len(request.prompts))
        SmallMemoryEngine.pads.append(request.pad_to)
        if len(request.prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().start(request)


class NoMemoryEngine(HFEngine):
    """A device where not even one row fits."""

    def start(self, request):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")


def test_out_of_memory_halves_the_batch_once_and_loses_no_rows(
    embedded_model, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(engine_module.ENGINES, "small-memory", f"{__name__}:SmallMemoryEngine")
    SmallMemoryEngine.batches = []
    SmallMemoryEngine.pads = []
    config = GenerateConfig(
        experiment="e",
        traits=("verbosity",),
        experiments_dir=tmp_path,
        engine="small-memory",
        batch_size=8,
        n_examples=5,
        max_new_tokens=2,
        temperature=0,
        extract_activations=False,
        generation_cache=False,
    )
    with caplog.at_level(logging.WARNING, logger="tracekit"):
        result = generate(config, loaded=embedded_model)
    assert result.batch_size == 2
    # pos: 5 rows tried at 8 (OOM), 4 (OOM), then 2+2+1; neg starts at the halved size
    assert SmallMemoryEngine.batches == [5, 4, 2, 2, 1, 2, 2, 1]
    # each call is told the batch size in force, so a last short batch can run at that shape
    # (at most the run's 5 rows: a run smaller than a batch is not padded)
    assert SmallMemoryEngine.pads == [5, 4, 2, 2, 2, 2, 2, 2]
    halving = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(halving) == 1 and "batch size 4" in halving[0].getMessage()
    paths = TraitPaths.of(tmp_path, "e", "verbosity")
    assert sorted(read_parts(paths, "pos")) == sorted(read_parts(paths, "neg")) == list(range(5))


def test_out_of_memory_at_batch_size_one_is_a_clear_error(embedded_model, tmp_path, monkeypatch):
    from tracekit.errors import ModelError

    monkeypatch.setitem(engine_module.ENGINES, "none", f"{__name__}:NoMemoryEngine")
    config = GenerateConfig(
        experiment="e",
        traits=("verbosity",),
        experiments_dir=tmp_path,
        engine="none",
        batch_size=2,
        n_examples=1,
        max_new_tokens=2,
    )
    with pytest.raises(ModelError, match="out of memory even at batch size 1"):
        generate(config, loaded=embedded_model)
