"""`tracekit judge`: 0-100 scores from an LLM judge (thin: options -> config -> judge_file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tracekit.config.choices import DtypeName, JudgeBackendName
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import build_config, show_result, task_progress

if TYPE_CHECKING:
    from tracekit.judge import JudgeSummary


def judge(
    ctx: typer.Context,
    input: Annotated[
        Path | None,
        typer.Option(
            "--input", help="CSV or JSONL with question/response columns.", dir_okay=False
        ),
    ] = None,
    trait: Annotated[
        str | None,
        typer.Option(
            "--trait", help="Trait name or trait JSON path; its eval_prompt judges 'trait'."
        ),
    ] = None,
    eval_prompt: Annotated[
        Path | None,
        typer.Option(
            "--eval-prompt",
            help="Text file with the judge prompt ({question}, {answer}).",
            dir_okay=False,
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="Find --trait in experiments/EXP/TRAIT/ first."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", help="Comma-separated: trait, coherence. Default: trait."),
    ] = None,
    judge_model: Annotated[
        str | None,
        typer.Option(
            "--judge-model",
            help="openai: model name (default gpt-4.1-mini); local: hub id or folder "
            "(default: the embedded SmolLM2-135M, for plumbing only).",
        ),
    ] = None,
    backend: Annotated[
        JudgeBackendName | None,
        typer.Option(
            "--backend",
            help="openai or local. Default: openai when a base URL or API key is "
            "configured, else local.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="Write here instead of rewriting --input in place.", dir_okay=False
        ),
    ] = None,
    question_column: Annotated[
        str | None, typer.Option("--question-column", help="Default: question.")
    ] = None,
    response_column: Annotated[
        str | None, typer.Option("--response-column", help="Default: response.")
    ] = None,
    min_mass: Annotated[
        float | None,
        typer.Option(
            "--min-mass",
            help="Leave the score empty below this probability on numbers (default 0.25).",
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="OpenAI-compatible server, e.g. http://localhost:8000/v1 "
            "(default: $OPENAI_BASE_URL, else api.openai.com).",
        ),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env",
            help="NAME of the variable holding the API key (default OPENAI_API_KEY).",
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, help="Requests in flight (default 32)."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds per request (default 60)."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            "--max-attempts",
            min=1,
            help="Attempts per judgment before it is marked failed (default 6).",
        ),
    ] = None,
    backoff: Annotated[
        float | None,
        typer.Option(
            "--backoff",
            help="First retry delay in seconds, doubling with jitter (default 1).",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Judge cache file (SQLite). Default: <tracekit cache dir>/judge/cache.sqlite.",
            dir_okay=False,
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the cache.")
    ] = False,
    allow_failures: Annotated[
        bool, typer.Option("--allow-failures", help="Exit 0 even when some judgments failed.")
    ] = False,
    device: opt.Device = "auto",
    dtype: opt.Dtype = DtypeName.auto,
    force: opt.Force = False,
    json_output: opt.Json = False,
    config: opt.Config = None,
) -> None:
    """Score responses 0-100 with an LLM judge (OpenAI-compatible API or local model).

    Adds <metric>_score, _mass, _status and _method columns (trait -> trait_score) and
    writes <output>.judge.json. Answers are cached: a rerun asks only for what is missing.
    """
    from tracekit.judge import JudgeJobConfig, judge_file

    cfg = build_config(ctx, JudgeJobConfig)
    with task_progress("judging", "judgments") as bar:
        summary = judge_file(cfg, progress=bar.completed).summary
    show_result(summary, json_output, _print_summary)
    if summary.failed and not cfg.allow_failures:
        from tracekit.errors import JudgeError

        raise JudgeError(
            f"{summary.failed} judgment(s) failed (status column says why)",
            "rerun to retry them, or pass --allow-failures",
        )


def _print_summary(summary: JudgeSummary) -> None:
    out_console.print(_table(summary))
    for note in summary.notes():
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    err_console.print(f"wrote {summary.output}", highlight=False)


def _table(summary: JudgeSummary) -> Any:
    from rich import box
    from rich.table import Table

    judge = summary.judge
    table = Table(
        title=f"judge: {judge.get('judge_model')} ({judge.get('backend')}), {summary.rows} rows",
        caption=f"time {summary.seconds:.1f} s",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("metric", no_wrap=True)
    for name in (
        "scored",
        "refused",
        "low\nmass",
        "failed",
        "requests",
        "retries",
        "cache\nhits",
        "mean\nscore",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    rows = list(summary.metrics.items())
    if len(rows) > 1:
        rows.append(("total", summary.total))
    for metric, c in rows:
        mean = summary.mean_scores.get(metric)
        table.add_row(
            metric,
            str(c.scored),
            str(c.refused),
            str(c.low_mass),
            f"[red]{c.failed}[/]" if c.failed else "0",
            str(c.requests),
            str(c.retries),
            str(c.cache_hits),
            "" if mean is None else f"{mean:.1f}",
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("judge")(judge)
