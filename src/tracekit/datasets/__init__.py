"""Classifier datasets from sentence feature files: strategies, normalization, splitting."""

from tracekit.datasets.build import (
    BuildDatasetConfig,
    BuildDatasetResult,
    Strategy,
    build_dataset,
    save_dataset,
)
from tracekit.datasets.normalization import (
    apply_normalization,
    fit_normalization,
    normalize_features,
)
from tracekit.datasets.split import split_indices

__all__ = [
    "BuildDatasetConfig",
    "BuildDatasetResult",
    "Strategy",
    "apply_normalization",
    "build_dataset",
    "fit_normalization",
    "normalize_features",
    "save_dataset",
    "split_indices",
]
