"""Judge configuration: how to judge (`JudgeConfig`) and the file job (`JudgeJobConfig`).

Validators are pure. Which backend runs when none is named, the API key and the base URL from
the environment are resolved once, explicitly, by :func:`resolve_backend` and
:func:`resolve_base_url` (the key itself never enters a config, so it cannot be dumped into
metadata: only the *name* of the environment variable holding it does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import DtypeName, JudgeBackendName
from tracekit.config.types import split_commas

METRICS = ("trait", "coherence")
"""Metrics tracekit knows: ``trait`` uses the trait's ``eval_prompt``; ``coherence`` is built in."""

DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
"""Judge model of the openai backend when ``--judge-model`` is not given (returns logprobs)."""

DEFAULT_BASE_URL = "https://api.openai.com/v1"


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_like_api_key(value: str) -> bool:
    """Whether ``value`` looks like a secret rather than a variable name: a known key prefix
    (``sk-``, ``hf_``, ...; :data:`tracekit.errors.KEY_PATTERN`) or a long run of mixed-case
    letters and digits, which variable names (``OPENAI_API_KEY``) are not."""
    from tracekit.errors import KEY_PATTERN

    if KEY_PATTERN.search(value):
        return True
    return len(value) >= 24 and any(c.islower() for c in value) and any(c.isdigit() for c in value)


_COLUMN = re.compile(r"^\S(.*\S)?$")


class JudgeConfig(TracekitConfig):
    """How rows are judged: backend, judge model, metrics, prompts, retries and cache.

    This is what ``tracekit.judge_rows`` (and ``generate --judge-model``) takes; the
    ``judge`` command adds the input/output options in :class:`JudgeJobConfig`.
    """

    trait: str | None = None
    """Trait name or trait JSON path whose ``eval_prompt`` scores the ``trait`` metric."""
    experiment: str | None = None
    """Look for the trait in ``experiments/EXP/TRAIT/trait_definition.json`` first."""
    eval_prompt: Path | None = None
    """A text file with the judge prompt for ``trait`` (``{question}``/``{answer}``)."""
    metrics: tuple[str, ...] = ("trait",)
    judge_model: str | None = None
    """openai: model name (default gpt-4.1-mini); local: hub id or folder (default embedded)."""
    backend: JudgeBackendName | None = None
    """None: openai when a base URL or API key is configured, else local (see resolve_backend)."""
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (never the key itself)."""
    question_column: str = "question"
    response_column: str = "response"
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 32
    min_mass: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    """Scores with less probability than this on the numbers 0-100 are left empty (low_mass)."""
    top_logprobs: Annotated[int, Field(ge=1, le=20)] = 20
    max_tokens: Annotated[int, Field(ge=1, le=64)] = 3
    """Tokens the judge may answer with: the score uses the first; the text fallback all."""
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Seconds per request (connect, write, read, pool wait)."""
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 6
    backoff: Annotated[float, Field(ge=0, le=600)] = 1.0
    """Seconds before the first retry; doubles per attempt (with jitter) up to backoff_max."""
    backoff_max: Annotated[float, Field(ge=0, le=3600)] = 60.0
    retry_after_max: Annotated[float, Field(ge=0, le=3600)] = 120.0
    """``Retry-After`` is honoured up to this many seconds per wait."""
    cache: Path | None = None
    """SQLite judge cache; None: ``<tracekit cache dir>/judge/cache.sqlite``."""
    no_cache: bool = False
    device: str = "auto"
    dtype: DtypeName = DtypeName.auto

    _split_metrics = field_validator("metrics", mode="before")(split_commas)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"give at least one metric: {', '.join(METRICS)}")
        unknown = [m for m in value if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric '{unknown[0]}': use {', '.join(METRICS)}")
        return tuple(dict.fromkeys(value))

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        # the value is never echoed: what was typed here is often the key itself
        if looks_like_api_key(value) or not _ENV_NAME.match(value):
            raise ValueError(
                "expects the NAME of an environment variable (e.g. OPENAI_API_KEY) and the "
                "value given is not one (it looks like a key or has characters a name cannot "
                "have): put the key in a variable and pass that variable's name"
            )
        return value

    @field_validator("question_column", "response_column")
    @classmethod
    def _column_name(cls, value: str) -> str:
        if not _COLUMN.match(value):
            raise ValueError("column names must be non-empty without surrounding spaces")
        return value

    @field_validator("base_url")
    @classmethod
    def _url_syntax(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"base URL '{value}' must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _prompt_source(self) -> JudgeConfig:
        if self.trait is not None and self.eval_prompt is not None:
            raise ValueError("give either --trait or --eval-prompt, not both")
        if self.backoff_max < self.backoff:
            raise ValueError(
                f"backoff_max ({self.backoff_max:g} s) must be at least --backoff "
                f"({self.backoff:g} s)"
            )
        return self


class JudgeJobConfig(JudgeConfig):
    """The ``judge`` command: a :class:`JudgeConfig` plus the file to judge and where to write."""

    input: Path
    output: Path | None = None
    """None: rewrite the input in place (atomically), adding or replacing the judge columns."""
    force: bool = False
    allow_failures: bool = False

    @field_validator("input", "output")
    @classmethod
    def _table_suffix(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"'{value}' must be a .csv or .jsonl file")
        return value

    def judge_config(self) -> JudgeConfig:
        """The judging part of this job."""
        return JudgeConfig(**{name: getattr(self, name) for name in JudgeConfig.model_fields})


def resolve_base_url(config: JudgeConfig, env: Mapping[str, str] | None = None) -> str | None:
    """``--base-url`` > ``OPENAI_BASE_URL`` > None."""
    env = os.environ if env is None else env
    return config.base_url or env.get("OPENAI_BASE_URL") or None


def resolve_backend(config: JudgeConfig, env: Mapping[str, str] | None = None) -> JudgeBackendName:
    """The backend to use: ``--backend`` if given; else openai when a base URL (flag or
    ``OPENAI_BASE_URL``) or an API key (in ``--api-key-env``'s variable) is configured; else
    local, so that with nothing configured the whole chain runs offline on the embedded model.
    """
    env = os.environ if env is None else env
    if config.backend is not None:
        return config.backend
    if resolve_base_url(config, env) or env.get(config.api_key_env):
        return JudgeBackendName.openai
    return JudgeBackendName.local


def score_column(metric: str) -> str:
    """``trait`` -> ``trait_score`` (the column name the seeds' responses CSVs use)."""
    return f"{metric}_score"


def judge_columns(metric: str) -> tuple[str, str, str, str]:
    """The columns one metric adds: score, mass, status, method."""
    return (score_column(metric), f"{metric}_mass", f"{metric}_status", f"{metric}_method")
