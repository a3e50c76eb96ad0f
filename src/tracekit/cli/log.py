"""`tracekit log`: log activations to an LMDB store while generating; `tracekit log stats`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tracekit.config.choices import DtypeName, SequenceMode, StoreDtype
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import (
    SeedSpellingGroup,
    build_config,
    is_main_process,
    launch_processes,
    show_result,
    task_progress,
)

if TYPE_CHECKING:
    from tracekit.jobs.log import LogResult
    from tracekit.storage.activation_store import StoreStats


def _render_result(result: LogResult) -> None:
    from rich.table import Table

    table = Table(title=f"log -> {result.store}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    rate = result.logged / result.seconds if result.seconds > 0 else 0.0
    for name, value in [
        ("model", result.model_label or result.model),
        ("layers", ",".join(str(layer) for layer in result.layers)),
        ("QA rows", f"{result.qa_rows:,}"),
        ("unique prompts", f"{result.unique_prompts:,}"),
        ("already in store (skipped)", f"{result.already_logged:,}"),
        ("logged now", f"{result.logged:,} in {result.batches:,} batches"),
        ("malformed lines skipped", f"{result.bad_lines:,}"),
        ("written", f"{result.bytes_written / 1e6:,.2f} MB"),
        ("time", f"{result.seconds:,.1f} s ({rate:,.2f} entries/s)"),
    ]:
        table.add_row(name, value)
    out_console.print(table)


def _render_stats(stats: StoreStats) -> None:
    from rich.table import Table

    table = Table(title=f"activation store {stats.path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("format", stats.format)
    table.add_row("entries", f"{stats.entries:,} ({stats.with_activations:,} with activations)")
    for name, info in stats.arrays.items():
        width = "x".join(str(w) for w in info["width"])
        table.add_row(
            name,
            f"{info['dtype']}, width {width}, {info['positions']:,} positions "
            f"in {info['entries']:,} entries",
        )
    table.add_row("activation bytes", f"{stats.activation_bytes / 1e6:,.2f} MB")
    table.add_row("metadata bytes", f"{stats.metadata_bytes / 1e6:,.2f} MB")
    table.add_row(
        "file / map size", f"{stats.file_bytes / 1e6:,.2f} MB / {stats.map_size / 1e6:,.0f} MB"
    )
    for pid, record in stats.provenance.items():
        table.add_row(f"provenance {pid}", _provenance_line(record))
    out_console.print(table)


def _provenance_line(record: dict[str, Any]) -> str:
    """One store provenance record as a line: the model (its revision and weights where
    recorded), then the settings its entries were logged with."""
    from tracekit.models.weights import short_weights

    model = f"model {record.get('model')}"
    revision = f"revision {record['revision']}" if record.get("revision") else ""
    extras = [part for part in (revision, short_weights(record)) if part]
    if extras:
        model += f" ({'; '.join(extras)})"
    gen = record.get("generation") or {}
    return (
        f"{model}, layers {record.get('layers')}, sequence mode {record.get('sequence_mode')}, "
        f"dtype {record.get('dtype')}, prompt {record.get('prompt_format')}, "
        f"max_new_tokens {gen.get('max_new_tokens')}"
    )


def register(app: typer.Typer) -> None:
    log_app = typer.Typer(
        cls=SeedSpellingGroup,
        invoke_without_command=True,
        help="Log activations to an LMDB store (keyed by prompt hash) while generating; "
        "'tracekit log stats PATH' inspects a store.",
    )

    @log_app.callback()
    def log_command(
        ctx: typer.Context,
        qa: Annotated[
            Path | None,
            typer.Option(
                "--qa",
                help="QA JSONL file: one object per line, raw question in 'prompt'.",
                dir_okay=False,
            ),
        ] = None,
        lmdb: Annotated[
            Path | None,
            typer.Option(
                "--lmdb",
                help="Store directory; created if missing, resumed if it exists.",
                file_okay=False,
            ),
        ] = None,
        model: opt.Model = None,
        revision: Annotated[
            str | None, typer.Option("--revision", help="Model revision (hub models).")
        ] = None,
        prompt_template: opt.PromptTemplate = None,
        chat: Annotated[
            bool,
            typer.Option("--chat", help="Format questions with the model's chat template."),
        ] = False,
        question_field: opt.QuestionField = "prompt",
        layers: opt.Layers = None,
        sequence_mode: Annotated[
            SequenceMode,
            typer.Option(
                "--sequence-mode",
                help="Positions stored: all (prompt + response), prompt, or response "
                "(response excludes the eos token).",
            ),
        ] = SequenceMode.all,
        dtype: Annotated[
            StoreDtype,
            typer.Option(
                "--dtype", help=f"dtype of the stored activations: {opt.one_of(StoreDtype)}."
            ),
        ] = StoreDtype.float16,
        model_dtype: Annotated[
            DtypeName,
            typer.Option(
                "--model-dtype",
                help=opt.MODEL_DTYPE_HELP,
            ),
        ] = DtypeName.auto,
        device: opt.Device = "auto",
        device_map: opt.DeviceMap = None,
        batch_size: opt.BatchSize = 8,
        max_new_tokens: opt.MaxNewTokens = 64,
        engine: opt.Engine = "auto",
        allow_mixed: Annotated[
            bool,
            typer.Option(
                "--allow-mixed",
                help="Let a store hold entries from another setup (model, template, layers...).",
            ),
        ] = False,
        skip_bad_lines: opt.SkipBadLines = False,
        num_processes: opt.NumProcesses = 1,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Generate for each QA question and log its activations to an LMDB store."""
        if ctx.invoked_subcommand is not None:
            return
        from tracekit.config.log import LogConfig
        from tracekit.jobs.log import log_activations

        cfg = build_config(ctx, LogConfig)
        launch_processes(["log"], cfg, num_processes, json_output)
        if not is_main_process():  # data-parallel: the main process shows progress and result
            log_activations(cfg)
            return
        with task_progress("logging", "entries") as bar:
            result = log_activations(cfg, on_batch=lambda n, size, total: bar.advance(n, total))
        if result.bad_lines:
            err_console.print(f"skipped {result.bad_lines} malformed QA line(s)")
        show_result(result, json_output, _render_result)

    @log_app.command("stats")
    def stats_command(
        path: Annotated[Path, typer.Argument(help="Store directory.")],
        allow_pickle: opt.StorePickle = False,
        json_output: opt.Json = False,
    ) -> None:
        """Show a store's entries, layers, dtype, bytes and provenance (tracekit's stores and
        the seed's)."""
        from tracekit.storage.seed_store import open_any_store

        with open_any_store(path, allow_pickle) as store:
            stats = store.stats()
        show_result(stats, json_output, _render_stats)

    app.add_typer(log_app, name="log")
