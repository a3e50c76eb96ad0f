"""Sentence feature files (``extract features``): hidden states and SAE activations per token."""

from tracekit.features.config import FeaturesConfig, SaeStorage, parse_label_range
from tracekit.features.files import MANIFEST_NAME, csr_to_dense, sentence_file
from tracekit.features.job import FeaturesResult, extract_features

__all__ = [
    "MANIFEST_NAME",
    "FeaturesConfig",
    "FeaturesResult",
    "SaeStorage",
    "csr_to_dense",
    "extract_features",
    "parse_label_range",
    "sentence_file",
]
