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

from tracekit.judge.config import (
    METRICS,
    JudgeConfig,
    JudgeJobConfig,
    judge_columns,
    resolve_backend,
    score_column,
)
from tracekit.judge.job import (
    JudgeResult,
    JudgeSummary,
    MetricCounts,
    ajudge_rows,
    judge_file,
    judge_rows,
)
from tracekit.judge.scoring import RawAnswer, Verdict, logprob_score, score_answer

__all__ = [
    "METRICS",
    "JudgeConfig",
    "JudgeJobConfig",
    "JudgeResult",
    "JudgeSummary",
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
