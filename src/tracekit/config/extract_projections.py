"""``extract projections``'s configuration; the work is :mod:`tracekit.vectors.projections`."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import VectorMethod
from tracekit.config.types import LayerSpec
from tracekit.engines.pooling import Pooling


class ProjectionsConfig(TracekitConfig):
    """Options of ``tracekit extract projections``."""

    experiment: str
    trait: str
    experiments_dir: Path = Path("experiments")
    vector: Path | None = None
    """Vectors file (.npy or .pt); default: this trait's ``vectors/{method}_{pooling}.npy``."""
    method: VectorMethod = VectorMethod.mean_diff
    pooling: Pooling = Pooling.response_avg
    layers: LayerSpec = LayerSpec(None)
    plot: bool = True
    force: bool = False

    @model_validator(mode="after")
    def _vector_suffix(self) -> ProjectionsConfig:
        if self.vector is not None and self.vector.suffix not in (".npy", ".pt"):
            raise ValueError(f"'{self.vector}' is not a .npy or .pt vectors file")
        return self
