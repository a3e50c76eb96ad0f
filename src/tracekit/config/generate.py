"""``generate``'s configuration: the runtime options shared with ``extract activations``
(:class:`RuntimeOptions`) and :class:`GenerateConfig`; the job is :mod:`tracekit.jobs.generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tracekit.config.choices import SteerControl, SteerPositions, SteerPrompts
from tracekit.config.types import BatchSize, LayerSpec, check_name, split_commas
from tracekit.engines.interface import GenerationParams, check_engine_name
from tracekit.engines.pooling import Pooling, Poolings
from tracekit.models.loading import ModelChoice, ModelConfig
from tracekit.storage.experiment import POLARITIES, Polarity


class RuntimeOptions(ModelChoice):
    """Model selection options shared by generate and extract."""

    chat_template: bool = True
    """Use the tokenizer's chat template (instruction as system prompt); False for base models."""

    def model_settings(self) -> ModelConfig:
        return ModelConfig(**self.model_dump(include=set(ModelChoice.model_fields)))


class GenerateConfig(RuntimeOptions):
    """Options of ``tracekit generate`` (and of :func:`generate`)."""

    experiment: str
    traits: tuple[str, ...] = Field(min_length=1)
    experiments_dir: Path = Path("experiments")
    engine: str = "auto"
    batch_size: BatchSize = 8
    n_examples: int = Field(default=100, ge=1, le=1_000_000)
    max_new_tokens: int = Field(default=150, ge=1, le=100_000)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    layers: LayerSpec = LayerSpec(None)
    pooling: Poolings = (Pooling.response_avg,)
    extract_activations: bool = True
    judge_model: str | None = None
    """Judge each response with this model (tracekit.judge; backend from the options below)."""
    judge_metrics: tuple[Literal["trait", "coherence"], ...] = ("trait",)
    judge_base_url: str | None = None
    judge_min_mass: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    """OpenAI-compatible server; None: ``OPENAI_BASE_URL``, else the local backend."""
    threshold: float = Field(default=50.0, ge=0.0, le=100.0)
    generation_cache: bool = True
    pt: bool = False
    """Also write each activation file as a ``.pt`` tensor (a second full copy on disk)."""
    force: bool = False
    steer_vector: Path | None = None
    """Steer: add ``coef * vector`` to the residual stream (:mod:`tracekit.engines.steering`);
    a vectors file as ``extract vectors`` writes it (``[layers, hidden]``) or one ``[hidden]``."""
    steer_layer: int | None = Field(default=None, ge=0)
    steer_coef: tuple[float, ...] = ()
    """One output set per coefficient (a sweep)."""
    steer_positions: SteerPositions = SteerPositions.response
    steer_control: SteerControl | None = None
    """``random``: also the same sweep along a seeded random direction of the vector's norm."""
    steer_control_seed: int = 0
    steer_prompts: SteerPrompts = SteerPrompts.neutral
    """Steered runs ask the trait's questions without instruction (``neutral``, one CSV) or
    with its pos/neg instructions (``trait``)."""

    _engine_name = field_validator("engine")(check_engine_name)

    @field_validator("steer_coef", mode="before")
    @classmethod
    def _split_coefs(cls, value: Any) -> Any:
        if isinstance(value, (int, float)):
            return (value,)
        if isinstance(value, str):
            try:
                return tuple(float(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"'{value}' is not a list of numbers (e.g. -4,-2,0,2,4)") from None
        return value

    @field_validator("steer_coef")
    @classmethod
    def _unique_coefs(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        import math

        if any(not math.isfinite(v) for v in value):
            raise ValueError("coefficients must be finite numbers")
        return tuple(dict.fromkeys(v + 0.0 for v in value))

    @model_validator(mode="after")
    def _steering_complete(self) -> GenerateConfig:
        if self.steer_vector is None:
            given = [
                name
                for name in ("steer_layer", "steer_coef", "steer_control")
                if getattr(self, name) not in (None, ())
            ]
            if given:
                option = "--" + given[0].replace("_", "-")
                raise ValueError(f"{option} needs --steer-vector FILE")
        elif self.steer_layer is None:
            raise ValueError("--steer-vector needs --steer-layer L (the layer to add it at)")
        elif not self.steer_coef:
            raise ValueError("--steer-vector needs --steer-coef (e.g. -4,-2,0,2,4)")
        return self

    @property
    def polarities(self) -> tuple[Polarity, ...]:
        """The row sets a run generates: pos and neg, or only neutral rows when steering."""
        if self.steer_vector is not None and self.steer_prompts == SteerPrompts.neutral:
            return ("neutral",)
        return POLARITIES

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return check_name(value, "experiment")

    _split_metrics = field_validator("judge_metrics", mode="before")(split_commas)

    @field_validator("traits", mode="before")
    @classmethod
    def _split_traits(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",")]
        if isinstance(value, (list, tuple)):
            items = [str(v).strip() for v in value]
            if any(not v for v in items):
                raise ValueError("empty trait name in the trait list (look for ',,')")
            return tuple(dict.fromkeys(items))
        return value

    def generation_params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )
