"""``log``'s configuration; the job is :mod:`tracekit.jobs.log`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from tracekit.actlog.prompts import (
    DEFAULT_TEMPLATE,
    check_template,
)
from tracekit.config import BatchSize, LayerSpec, TracekitConfig
from tracekit.config.choices import DeviceMapName, DtypeName, SequenceMode, StoreDtype
from tracekit.engines.interface import check_engine_name


class LogConfig(TracekitConfig):
    """Options of ``tracekit log``."""

    qa: Path
    """QA JSONL file: one object per line, the raw question in ``question_field``."""
    lmdb: Path
    """Store directory (created if missing; resumed if it exists)."""
    model: str | None = None
    revision: str | None = None
    prompt_template: str = DEFAULT_TEMPLATE
    chat: bool = False
    """Format questions with the tokenizer's chat template instead of ``prompt_template``."""
    question_field: str = "prompt"
    layers: LayerSpec | None = None
    """None: the model's last layer."""
    sequence_mode: SequenceMode = SequenceMode.all
    dtype: StoreDtype = StoreDtype.float16
    """dtype of the stored activations."""
    model_dtype: DtypeName = DtypeName.auto
    device: str = "auto"
    device_map: DeviceMapName | None = None
    """``auto``: spread a model too large for one device over all devices (accelerate); each
    captured layer is copied to the host as it is computed, wherever its block sits."""
    batch_size: BatchSize = 8
    max_new_tokens: int = Field(64, ge=1, le=100_000)
    engine: str = "auto"
    allow_mixed: bool = False
    skip_bad_lines: bool = False

    _engine_name = field_validator("engine")(check_engine_name)

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        return check_template(value)
