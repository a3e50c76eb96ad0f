"""Typed configuration: field types, the base config and option precedence.

Names are imported on first access so that ``tracekit.config.choices`` (the CLI's option
enums) can be imported without pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracekit._lazy import lazy_attributes

if TYPE_CHECKING:
    from tracekit.config.base import (
        TracekitConfig,
        format_validation_error,
        read_config_file,
        resolve_config,
    )
    from tracekit.config.choices import DecodeFormat, Normalization, Strategy
    from tracekit.config.types import MAX_BATCH_SIZE, BatchSize, LayerSpec, parse_layers_arg

_LAZY: dict[str, str] = {
    "TracekitConfig": "tracekit.config.base",
    "format_validation_error": "tracekit.config.base",
    "read_config_file": "tracekit.config.base",
    "resolve_config": "tracekit.config.base",
    "DecodeFormat": "tracekit.config.choices",
    "Normalization": "tracekit.config.choices",
    "Strategy": "tracekit.config.choices",
    "MAX_BATCH_SIZE": "tracekit.config.types",
    "BatchSize": "tracekit.config.types",
    "LayerSpec": "tracekit.config.types",
    "parse_layers_arg": "tracekit.config.types",
}


__getattr__, __dir__ = lazy_attributes("tracekit.config", _LAZY, globals())

__all__ = [
    "MAX_BATCH_SIZE",
    "BatchSize",
    "DecodeFormat",
    "LayerSpec",
    "Normalization",
    "Strategy",
    "TracekitConfig",
    "format_validation_error",
    "parse_layers_arg",
    "read_config_file",
    "resolve_config",
]
