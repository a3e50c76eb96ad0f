"""Model runtime: loading, the embedded default model, layer handles and capture hooks."""

from tracekit.models.capture import LayerTaps
from tracekit.models.embedded import (
    EMBEDDED_MODEL_NAME,
    cache_root,
    embedded_model_dir,
    find_embedded_gguf,
)
from tracekit.models.layers import LayerHandles
from tracekit.models.loading import LoadedModel, ModelConfig, load_model

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "LayerHandles",
    "LayerTaps",
    "LoadedModel",
    "ModelConfig",
    "cache_root",
    "embedded_model_dir",
    "find_embedded_gguf",
    "load_model",
]
