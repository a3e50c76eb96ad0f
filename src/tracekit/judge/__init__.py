"""LLM-judge scoring: OpenAI-compatible HTTP or local-model backends, exact scoring, a cache.

Public API (stable; ``generate --judge-model`` uses it)::

    from tracekit.judge import JudgeConfig, judge_rows

    config = JudgeConfig(judge_model="gpt-4.1-mini", metrics=("trait",))
    result = judge_rows(rows, config, trait_prompt=trait.eval_prompt)
    result.rows        # list of dicts: each input row plus, per metric m,
                       #   m_score (float 0-100 or None), m_mass (float or None),
                       #   m_status ("ok" | "refused" | "low_mass" | "failed: <reason>"),
                       #   m_method ("logprobs" | "digits" | "text" | "local" | "")
    result.summary     # JudgeSummary: per-metric scored/refused/low_mass/failed/requests/
                       #   retries/cache_hits, seconds, judge provenance; .failed; .to_dict()

- ``rows``: a sequence of mappings with ``config.question_column`` (default ``question``) and
  ``config.response_column`` (default ``response``); other keys are kept as they are.
- The ``trait`` metric writes ``trait_score`` (the seeds' column name); ``coherence`` writes
  ``coherence_score``. ``trait_prompt`` (a template with ``{question}``/``{answer}``) overrides
  ``config.trait`` / ``config.eval_prompt``.
- ``model=`` lends an already loaded :class:`~tracekit.models.LoadedModel` to the local backend.
- Inside a running event loop, ``await ajudge_rows(...)`` instead.
- :func:`judge_file` is the ``tracekit judge`` command (:class:`JudgeJobConfig` adds
  ``input``/``output``/``force``/``allow_failures``).

Raises :class:`~tracekit.errors.JudgeError` for run-stopping problems (bad/missing API key,
unreachable server, unknown model) and :class:`~tracekit.errors.InputError` for bad input;
per-row problems never raise: they become ``failed: <reason>`` rows. docs/judge.md has the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracekit._lazy import lazy_attributes

if TYPE_CHECKING:  # the same names, for type checkers
    from tracekit.config.judge import (
        METRICS,
        JudgeConfig,
        JudgeJobConfig,
        judge_columns,
        resolve_backend,
        score_column,
    )
    from tracekit.jobs.judge import (
        JudgeResult,
        JudgeSummary,
        MetricCounts,
        ajudge_rows,
        judge_file,
        judge_rows,
    )
    from tracekit.judge.scoring import RawAnswer, Verdict, logprob_score, score_answer

# public name -> module that defines it, imported on first use, so that the package's own
# modules import without the job (tracekit.jobs) that combines them

_LAZY: dict[str, str] = {
    "METRICS": "tracekit.config.judge",
    "JudgeConfig": "tracekit.config.judge",
    "JudgeJobConfig": "tracekit.config.judge",
    "judge_columns": "tracekit.config.judge",
    "resolve_backend": "tracekit.config.judge",
    "score_column": "tracekit.config.judge",
    "JudgeResult": "tracekit.jobs.judge",
    "JudgeSummary": "tracekit.jobs.judge",
    "MetricCounts": "tracekit.jobs.judge",
    "ajudge_rows": "tracekit.jobs.judge",
    "judge_file": "tracekit.jobs.judge",
    "judge_rows": "tracekit.jobs.judge",
    "RawAnswer": "tracekit.judge.scoring",
    "Verdict": "tracekit.judge.scoring",
    "logprob_score": "tracekit.judge.scoring",
    "score_answer": "tracekit.judge.scoring",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = [
    "JudgeConfig",
    "JudgeJobConfig",
    "JudgeResult",
    "JudgeSummary",
    "METRICS",
    "MetricCounts",
    "RawAnswer",
    "Verdict",
    "ajudge_rows",
    "judge_columns",
    "judge_file",
    "judge_rows",
    "logprob_score",
    "resolve_backend",
    "score_answer",
    "score_column",
]
