"""``build-dataset``'s configuration; the work is :mod:`tracekit.datasets.build`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, NonNegativeInt, model_validator

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import Normalization, Strategy
from tracekit.config.types import LayerSpec


class BuildDatasetConfig(TracekitConfig):
    """Options of ``tracekit build-dataset`` (checked together, before any file is read)."""

    strategy: Strategy
    input: Path
    output: Path
    normalize: Normalization = Normalization.standardize
    target_layer: NonNegativeInt | None = None
    target_feature: NonNegativeInt | None = None
    layer: NonNegativeInt | None = None
    layers: LayerSpec | None = None
    average_l0: Annotated[float, Field(gt=0)] | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    seed: int = 0
    group_by: str | None = None
    force: bool = False

    @model_validator(mode="after")
    def _options_fit_the_strategy(self) -> BuildDatasetConfig:
        name = self.strategy.value
        if self.strategy.predicts_feature:
            missing = [
                opt
                for opt, value in (
                    ("--target-layer", self.target_layer),
                    ("--target-feature", self.target_feature),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"--strategy {name} needs {' and '.join(missing)}")
            if self.layer is not None or self.layers is not None:
                raise ValueError(
                    f"--strategy {name} takes --target-layer, not --layer/--layers "
                    "(those select inputs for hidden-to-concept)"
                )
        else:
            if self.layer is not None and self.layers is not None:
                raise ValueError("--layer and --layers are mutually exclusive: give one of them")
            if self.layer is None and self.layers is None:
                raise ValueError(
                    f"--strategy {name} needs --layer L (one layer) or --layers SPEC (several)"
                )
            if self.target_layer is not None or self.target_feature is not None:
                raise ValueError(
                    f"--strategy {name} predicts the concept label: --target-layer and "
                    "--target-feature apply to the *-to-feature strategies only"
                )
            if self.average_l0 is not None:
                raise ValueError("--average-l0 applies to the *-to-feature strategies only")
        if self.group_by is not None and self.test_fraction is None:
            raise ValueError("--group-by needs --test-fraction (it controls the split)")
        if self.output.suffix != ".npz":
            raise ValueError(f"--output must be a .npz file, got '{self.output}'")
        return self
