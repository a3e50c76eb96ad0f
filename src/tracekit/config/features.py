"""The configuration of ``extract features`` (one frozen pydantic model, pure validators)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError, field_validator, model_validator

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import DtypeName, SaeStorage
from tracekit.config.types import BatchSize, LayerSpec
from tracekit.models.loading import ModelConfig
from tracekit.sae.layout import parse_l0_choice, parse_width


def parse_label_range(text: str) -> tuple[int, int]:
    """``"0-3"`` -> (0, 3): the inclusive range concept-strength labels must fall in."""
    parts = str(text).split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"invalid label range '{text}': use MIN-MAX like 0-3") from None
    if low > high:
        raise ValueError(f"invalid label range '{text}': MIN is greater than MAX")
    return low, high


class FeaturesConfig(TracekitConfig):
    """What ``tracekit extract features`` reads, computes and writes."""

    sentences: Path
    """CSV with one sentence per row and a concept-strength label."""
    output: Path
    """Folder for ``sentence_000000.npz``, ... and ``features.json``."""
    text_column: str = "sentence"
    label_column: str = "concept_strength_label"
    label_range: tuple[int, int] = (0, 3)
    model: str | None = None
    dtype: DtypeName = DtypeName.auto
    device: str = "auto"
    layers: LayerSpec | None = None
    """tracekit layers to save; default: every layer with an SAE under ``sae``, else all."""
    sae: Path | None = None
    sae_width: int | None = None
    sae_l0: str | None = None
    sae_storage: SaeStorage = SaeStorage.dense
    batch_size: BatchSize = 16
    force: bool = False

    @field_validator("label_range", mode="before")
    @classmethod
    def _parse_label_range(cls, value: object) -> object:
        return parse_label_range(value) if isinstance(value, str) else value

    @field_validator("sae_width", mode="before")
    @classmethod
    def _parse_width(cls, value: object) -> object:
        return parse_width(value) if isinstance(value, str) else value

    @field_validator("sae_l0")
    @classmethod
    def _check_l0(cls, value: str | None) -> str | None:
        if value is not None:
            parse_l0_choice(value)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        try:
            return ModelConfig(device=value).device
        except ValidationError as exc:
            raise ValueError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None

    @field_validator("text_column", "label_column")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a column name cannot be empty")
        return value

    @model_validator(mode="after")
    def _sae_options_need_sae(self) -> FeaturesConfig:
        if self.sae is None:
            given = [name for name in ("sae_width", "sae_l0") if getattr(self, name) is not None]
            if given:
                option = "--" + given[0].replace("_", "-")
                raise ValueError(f"{option} chooses among SAEs, so it needs --sae DIR")
        return self

    def to_model_config(self) -> ModelConfig:
        """The model to load, as the model runtime wants it."""
        return ModelConfig(model=self.model, dtype=self.dtype, device=self.device)
