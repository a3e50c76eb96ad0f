"""Sentence feature files (``extract features``): hidden states and SAE activations per token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracekit._lazy import lazy_attributes

if TYPE_CHECKING:  # the same names, for type checkers
    from tracekit.config.choices import SaeStorage
    from tracekit.config.features import FeaturesConfig, parse_label_range
    from tracekit.jobs.extract_features import FeaturesResult, extract_features
    from tracekit.sae.csr import csr_to_dense
    from tracekit.storage.sentences import MANIFEST_NAME, sentence_file

# public name -> module that defines it, imported on first use, so that the package's own
# modules import without the job (tracekit.jobs) that combines them

_LAZY: dict[str, str] = {
    "FeaturesConfig": "tracekit.config.features",
    "SaeStorage": "tracekit.config.choices",
    "parse_label_range": "tracekit.config.features",
    "MANIFEST_NAME": "tracekit.storage.sentences",
    "csr_to_dense": "tracekit.sae.csr",
    "sentence_file": "tracekit.storage.sentences",
    "FeaturesResult": "tracekit.jobs.extract_features",
    "extract_features": "tracekit.jobs.extract_features",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = [
    "FeaturesConfig",
    "FeaturesResult",
    "MANIFEST_NAME",
    "SaeStorage",
    "csr_to_dense",
    "extract_features",
    "parse_label_range",
    "sentence_file",
]
