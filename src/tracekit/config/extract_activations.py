"""``extract activations``'s configuration; the job is :mod:`tracekit.jobs.extract_activations`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tracekit.config.generate import RuntimeOptions
from tracekit.config.types import BatchSize, FolderName, LayerSpec
from tracekit.engines.pooling import Pooling, Poolings


class ExtractActivationsConfig(RuntimeOptions):
    """Options of ``tracekit extract activations``."""

    experiment: FolderName
    trait: FolderName
    experiments_dir: Path = Path("experiments")
    batch_size: BatchSize = 8
    layers: LayerSpec = LayerSpec(None)
    pooling: Poolings = (Pooling.response_avg,)
    engine: Literal["auto", "hf", "cuda"] = "auto"
    """Teacher-forced forward: ``cuda`` = compiled blocks + flash attention
    (:mod:`tracekit.engines.cuda.forward`), ``hf`` = the model's own forward."""
    pt: bool = False
    """Also write each activation file as a ``.pt`` tensor (a second full copy on disk)."""
    force: bool = False
