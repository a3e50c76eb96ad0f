"""Typed configuration: field types, the base config and option precedence."""

from tracekit.config.base import (
    TracekitConfig,
    format_validation_error,
    read_config_file,
    resolve_config,
)
from tracekit.config.types import (
    MAX_BATCH_SIZE,
    BatchSize,
    LayerSpec,
    Normalization,
    parse_layers_arg,
)

__all__ = [
    "MAX_BATCH_SIZE",
    "BatchSize",
    "LayerSpec",
    "Normalization",
    "TracekitConfig",
    "format_validation_error",
    "parse_layers_arg",
    "read_config_file",
    "resolve_config",
]
