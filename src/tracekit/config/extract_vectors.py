"""``extract vectors``'s configuration; the work is :mod:`tracekit.vectors.mean_diff`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import NegRule, VectorExport, VectorMethod
from tracekit.engines.pooling import Pooling


class ExtractVectorsConfig(TracekitConfig):
    """Options of ``tracekit extract vectors``."""

    experiment: str
    trait: str
    experiments_dir: Path = Path("experiments")
    method: VectorMethod = VectorMethod.mean_diff
    pooling: Pooling = Pooling.response_avg
    threshold: float = Field(default=50.0, ge=0.0, le=100.0)
    min_coherence: float = Field(default=50.0, ge=0.0, le=100.0)
    neg_rule: NegRule = NegRule.mirrored
    plot: bool = True
    export: VectorExport | None = None
    """``gguf``: also write a llama.cpp control vector (:mod:`tracekit.vectors.gguf_export`)."""
    gguf_model_hint: str | None = None
    """``controlvector.model_hint``; default: the architecture in the trait's metadata."""
    force: bool = False
