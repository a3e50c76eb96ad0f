"""The judge job: rows in, judge columns out; the file variant reads and rewrites CSV/JSONL.

:func:`judge_rows` is the library entry point (``generate --judge-model`` calls it);
:func:`judge_file` is the ``judge`` command. For every row and metric the job adds
``<metric>_score`` (0-100 or empty), ``<metric>_mass``, ``<metric>_status`` and
``<metric>_method``. Answers come from the cache when present, otherwise from the backend under
a concurrency limit; each answer is cached the moment it arrives. No row is ever dropped: a
judgment that could not be made is a row with status ``failed: <reason>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.judge import (
    JudgeConfig,
    JudgeJobConfig,
    judge_columns,
    resolve_backend,
    resolve_base_url,
)
from tracekit.errors import InputError
from tracekit.judge.backends import Answered, JudgeBackend, LocalBackend, OpenAIBackend
from tracekit.judge.cache import JudgeCache, cache_key, default_cache_path
from tracekit.judge.prompts import fill, resolve_templates
from tracekit.judge.scoring import RawAnswer, Verdict, score_answer
from tracekit.storage.table import read_table, write_table

if TYPE_CHECKING:
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""Called with (judgments done, judgments in total) as the job advances."""


@dataclass
class MetricCounts:
    """Outcomes and traffic of one metric."""

    scored: int = 0
    refused: int = 0
    low_mass: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    """Scored rows per method (``logprobs``, ``digits``, ``text``, ``local``)."""

    def add(self, other: MetricCounts) -> None:
        for name in self.__dataclass_fields__:
            if name != "methods":
                setattr(self, name, getattr(self, name) + getattr(other, name))
        for method, count in other.methods.items():
            self.methods[method] = self.methods.get(method, 0) + count

    def mixed_methods(self) -> str | None:
        """A note when some rows were scored another way than most, else None."""
        if len(self.methods) < 2:
            return None
        main, *others = sorted(self.methods, key=lambda m: -self.methods[m])
        rest = ", ".join(f"{self.methods[m]} by {m}" for m in others)
        return f"{rest} (the other {self.methods[main]} by {main}): see the method column"


@dataclass
class JudgeSummary:
    """What a judge run did: per-metric counts, time, and the judge's provenance."""

    rows: int
    metrics: dict[str, MetricCounts]
    seconds: float
    judge: dict[str, Any]
    cache: str | None
    output: str | None = None
    mean_scores: dict[str, float | None] = field(default_factory=dict)

    @property
    def total(self) -> MetricCounts:
        total = MetricCounts()
        for counts in self.metrics.values():
            total.add(counts)
        return total

    @property
    def failed(self) -> int:
        return self.total.failed

    def notes(self) -> list[str]:
        """One line per metric whose rows were not all scored one way, and one when the
        server forced the text method on the whole run."""
        lines = []
        if self.judge.get("digit_split") == "unsupported":
            lines.append(
                "the judge splits numbers into digits and the server cannot be asked for the "
                "next digit: every score comes from the answer text"
            )
        elif self.judge.get("logprobs") is False:
            lines.append("the server rejects logprobs: every score comes from the answer text")
        for metric, counts in self.metrics.items():
            mixed = counts.mixed_methods()
            if mixed:
                lines.append(f"{metric}: {mixed}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "metrics": {m: asdict(c) for m, c in self.metrics.items()},
            "notes": self.notes(),
            "total": asdict(self.total),
            "mean_scores": self.mean_scores,
            "seconds": round(self.seconds, 3),
            "judge": self.judge,
            "cache": self.cache,
            "output": self.output,
        }


@dataclass
class JudgeResult:
    """Judged rows (input columns plus the judge columns) and the run's summary."""

    rows: list[dict[str, Any]]
    summary: JudgeSummary


# --- the core --------------------------------------------------------------------------------
def make_backend(config: JudgeConfig, model: LoadedModel | None = None) -> JudgeBackend:
    """The backend ``config`` asks for (see :func:`~tracekit.config.judge.resolve_backend`)."""
    if resolve_backend(config) == "openai":
        return OpenAIBackend(
            config, resolve_base_url(config), os.environ.get(config.api_key_env) or None
        )
    return LocalBackend(config, model)


def check_columns(columns: Sequence[str], config: JudgeConfig, source: str) -> None:
    """Raise :class:`InputError` naming the first missing question/response column."""
    for option, name in (
        ("--question-column", config.question_column),
        ("--response-column", config.response_column),
    ):
        if name not in columns:
            shown = ", ".join(columns[:12]) or "none"
            raise InputError(
                f"{source} has no column '{name}' (columns: {shown})",
                f"name the right column with {option}",
            )


def _text(value: Any) -> str:
    """A cell as text: None and NaN (a missing cell from pandas) are empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


async def ajudge_rows(
    rows: Sequence[Mapping[str, Any]],
    config: JudgeConfig,
    *,
    trait_prompt: str | None = None,
    model: LoadedModel | None = None,
    progress: ProgressFn | None = None,
) -> JudgeResult:
    """Async :func:`judge_rows` (use it from inside a running event loop)."""
    started = time.perf_counter()
    templates = resolve_templates(config, trait_prompt)
    if rows:
        check_columns(list(rows[0].keys()), config, "the input")
    backend = make_backend(config, model)
    cache_path = None if config.no_cache else (config.cache or default_cache_path())
    cache = JudgeCache(cache_path) if cache_path is not None else None
    judging = _plan(rows, config, templates, backend, progress)
    try:
        judging.take_cached(cache)
        await judging.ask_missing(backend, cache, config.concurrency)
    finally:
        await backend.aclose()
        if cache is not None:
            cache.close()
    judged = _apply(rows, judging, config, text_only=backend.text_only)
    summary = JudgeSummary(
        rows=len(rows),
        metrics=judging.counts,
        seconds=time.perf_counter() - started,
        judge={
            **backend.describe(),
            "metrics": list(templates),
            "prompt_sha256": {
                m: hashlib.sha256(t.encode("utf-8")).hexdigest() for m, t in templates.items()
            },
            "min_mass": config.min_mass,
        },
        cache=None if cache_path is None else str(cache_path),
        mean_scores=_means(judged, list(templates)),
    )
    return JudgeResult(rows=judged, summary=summary)


@dataclass
class _Judging:
    """One run's judgments: the cache key of each (row, metric), the unique prompts behind the
    keys, the answers so far, the per-metric counts and the progress."""

    keys: list[dict[str, str]]
    """Per row: metric -> key."""
    todo: dict[str, tuple[str, str]]
    """key -> (metric, prompt), one per unique judgment."""
    counts: dict[str, MetricCounts]
    total: int
    """Judgments in total, one per (row, metric)."""
    progress: ProgressFn | None
    answers: dict[str, RawAnswer | str] = field(default_factory=dict)
    """key -> the judge's answer, or why there is none."""
    done: int = 0

    def take_cached(self, cache: JudgeCache | None) -> None:
        """Answer the keys the cache holds (a digit-split answer without whole-number
        probabilities is asked again)."""
        cached = cache.get_many(self.todo) if cache else {}
        self.answers.update({k: raw for k, raw in cached.items() if not raw.incomplete})
        for row_keys in self.keys:
            for metric, key in row_keys.items():
                if key in self.answers:
                    self.counts[metric].cache_hits += 1
                    self.done += 1
        if self.progress:
            self.progress(self.done, self.total)

    async def ask_missing(
        self, backend: JudgeBackend, cache: JudgeCache | None, concurrency: int
    ) -> None:
        """Ask ``backend`` for every unanswered key, at most ``concurrency`` at a time; each
        answer is cached the moment it arrives."""
        rows_per_key: dict[str, int] = {}
        for row_keys in self.keys:
            for key in row_keys.values():
                rows_per_key[key] = rows_per_key.get(key, 0) + 1
        limit = asyncio.Semaphore(concurrency)

        async def one(key: str, metric: str, prompt: str) -> None:
            async with limit:
                answered: Answered = await backend.ask(prompt)
            self.counts[metric].requests += answered.requests
            self.counts[metric].retries += answered.retries
            if answered.raw is not None:
                self.answers[key] = answered.raw
                if cache is not None and not answered.raw.incomplete:
                    cache.put(key, backend.name, backend.model_id, metric, answered.raw)
            else:
                self.answers[key] = answered.failure or "unknown failure"
            self.done += rows_per_key[key]
            if self.progress:
                self.progress(self.done, self.total)

        misses = [
            (key, metric, prompt)
            for key, (metric, prompt) in self.todo.items()
            if key not in self.answers
        ]
        if not misses:
            return
        try:
            async with asyncio.TaskGroup() as group:
                for key, metric, prompt in misses:
                    group.create_task(one(key, metric, prompt))
        except BaseExceptionGroup as errors:
            # the first real error (e.g. a bad API key) stops the run; others are echoes
            raise errors.exceptions[0] from None


def _plan(
    rows: Sequence[Mapping[str, Any]],
    config: JudgeConfig,
    templates: Mapping[str, str],
    backend: JudgeBackend,
    progress: ProgressFn | None,
) -> _Judging:
    """The judgments ``rows`` need: one key per (row, metric), one prompt per unique key."""
    keys: list[dict[str, str]] = []
    todo: dict[str, tuple[str, str]] = {}
    for row in rows:
        question, response = (
            _text(row.get(config.question_column)),
            _text(row.get(config.response_column)),
        )
        row_keys = {}
        for metric, template in templates.items():
            key = cache_key(backend.name, backend.model_id, metric, template, question, response)
            row_keys[metric] = key
            todo.setdefault(key, (metric, fill(template, question, response)))
        keys.append(row_keys)
    counts = {metric: MetricCounts() for metric in config.metrics}
    return _Judging(keys, todo, counts, total=len(rows) * len(templates), progress=progress)


def _apply(
    rows: Sequence[Mapping[str, Any]],
    judging: _Judging,
    config: JudgeConfig,
    *,
    text_only: bool = False,
) -> list[dict[str, Any]]:
    """``rows`` with the judge columns added; counts each verdict in ``judging.counts``."""
    judged = []
    for row, row_keys in zip(rows, judging.keys, strict=True):
        out = dict(row)
        for metric, key in row_keys.items():
            answer = judging.answers.get(key, "not judged")
            verdict = (
                score_answer(answer, config.min_mass, text_only=text_only)
                if isinstance(answer, RawAnswer)
                else Verdict.failed(answer)
            )
            kind = verdict.kind
            bucket = judging.counts[metric]
            if verdict.score is not None:
                bucket.methods[verdict.method] = bucket.methods.get(verdict.method, 0) + 1
            if kind == "ok":
                bucket.scored += 1
            elif kind == "refused":
                bucket.refused += 1
            elif kind == "low_mass":
                bucket.low_mass += 1
            else:
                bucket.failed += 1
            score_col, mass_col, status_col, method_col = judge_columns(metric)
            out[score_col] = verdict.score
            out[mass_col] = verdict.mass
            out[status_col] = verdict.status
            out[method_col] = verdict.method
        judged.append(out)
    return judged


def _means(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for metric in metrics:
        column = judge_columns(metric)[0]
        values = [r[column] for r in rows if r[column] is not None]
        means[metric] = sum(values) / len(values) if values else None
    return means


def judge_rows(
    rows: Sequence[Mapping[str, Any]],
    config: JudgeConfig,
    *,
    trait_prompt: str | None = None,
    model: LoadedModel | None = None,
    progress: ProgressFn | None = None,
) -> JudgeResult:
    """Judge ``rows`` (mappings with the question/response columns) and return them with the
    judge columns added, plus a :class:`JudgeSummary`.

    ``trait_prompt`` overrides ``config.trait``/``config.eval_prompt`` for the ``trait`` metric
    (pass a loaded trait's ``eval_prompt``); ``model`` lends an already loaded model to the local
    backend. Runs its own event loop; inside one, await :func:`ajudge_rows` instead.
    """
    return asyncio.run(
        ajudge_rows(rows, config, trait_prompt=trait_prompt, model=model, progress=progress)
    )


# --- files -----------------------------------------------------------------------------------
def metadata_path(output: Path) -> Path:
    """The judge metadata written beside an output: ``<output>.judge.json``."""
    return output.with_name(output.name + ".judge.json")


def judge_file(
    config: JudgeJobConfig,
    *,
    model: LoadedModel | None = None,
    progress: ProgressFn | None = None,
) -> JudgeResult:
    """Judge a CSV/JSONL file and write it (in place when ``config.output`` is None) with the
    judge columns, plus ``<output>.judge.json`` metadata. Returns the rows and the summary.
    Holds the output's one-writer lock."""
    from tracekit.storage.atomic import output_lock

    with output_lock(config.output or config.input, folder=False):
        return _judge_file(config, model, progress)


def _judge_file(
    config: JudgeJobConfig, model: LoadedModel | None, progress: ProgressFn | None
) -> JudgeResult:
    from tracekit import __version__
    from tracekit.storage import check_writable, write_json

    output = config.output or config.input
    if output.resolve() != config.input.resolve():
        check_writable([output, metadata_path(output)], config.force)
    rows, columns = read_table(config.input)
    check_columns(columns, config, str(config.input))
    result = judge_rows(rows, config.judge_config(), model=model, progress=progress)
    new_columns = [c for metric in config.metrics for c in judge_columns(metric)]
    # judge columns already present (a rerun) keep their place; new ones go at the end
    write_table(output, result.rows, [*columns, *[c for c in new_columns if c not in columns]])
    result.summary.output = str(output)
    write_json(
        metadata_path(output),
        {
            "tracekit_version": __version__,
            "input": str(config.input),
            "output": str(output),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "columns": new_columns,
            **result.summary.to_dict(),
        },
    )
    return result
