"""`tracekit reconstruct`: rebuild an inference JSONL from QA data and an activation store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import build_config, show_result

if TYPE_CHECKING:
    from tracekit.jobs.reconstruct import ReconstructResult


def _render(result: ReconstructResult) -> None:
    from rich.table import Table

    table = Table(title="reconstruct", show_header=False)
    table.add_column("statistic", style="bold")
    table.add_column("count", justify="right")
    table.add_row("QA rows", f"{result.qa_rows:,}")
    table.add_row("store entries", f"{result.store_entries:,}")
    table.add_row("matched (rows written)", f"{result.matched:,}")
    table.add_row("QA rows unmatched", f"{result.qa_unmatched:,}")
    table.add_row("store entries unmatched", f"{result.store_unmatched:,}")
    table.add_row("corrupted entries skipped", f"{result.corrupted:,}")
    table.add_row("entries without activations", f"{result.without_activations:,}")
    if result.bad_lines:
        table.add_row("malformed QA lines skipped", f"{result.bad_lines:,}")
    out_console.print(table)
    err_console.print(f"prompts formatted with the {result.prompt_format}", highlight=False)
    if result.output:
        err_console.print(f"wrote {result.output}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("reconstruct")
    def reconstruct_command(
        ctx: typer.Context,
        qa_output_path: Annotated[
            Path | None,
            typer.Option("--qa-output-path", help="The original QA JSONL file.", dir_okay=False),
        ] = None,
        lmdb_path: Annotated[
            Path | None,
            typer.Option(
                "--lmdb-path",
                help="The activation store written by 'tracekit log' or the seed's logger.",
            ),
        ] = None,
        output_path: Annotated[
            Path | None,
            typer.Option("--output-path", help="Where the inference JSONL goes.", dir_okay=False),
        ] = None,
        prompt_template: opt.PromptTemplate = None,
        chat: Annotated[
            bool,
            typer.Option(
                "--chat",
                help="Format questions with the chat template of --model (default: the "
                "store's model). Stores logged with --chat use it automatically.",
            ),
        ] = False,
        model: opt.Model = None,
        question_field: opt.QuestionField = "prompt",
        skip_bad_lines: opt.SkipBadLines = False,
        verbose: Annotated[
            bool, typer.Option("--verbose", help="Log matching details (counts, prompt hashes).")
        ] = False,
        allow_pickle: opt.StorePickle = False,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Rebuild an inference JSONL from QA data and an activation store (tracekit's or
        the seed's)."""
        import logging

        from tracekit.config.reconstruct import ReconstructConfig
        from tracekit.errors import InputError
        from tracekit.jobs.reconstruct import reconstruct

        cfg = build_config(ctx, ReconstructConfig)
        if cfg.verbose:
            logging.getLogger("tracekit").setLevel(logging.INFO)
        result = reconstruct(cfg)
        show_result(result, json_output, _render)
        if result.matched == 0:
            if result.closest is not None:
                mine, closest = result.closest
                err_console.print(f"first QA prompt as formatted: {mine!r}", highlight=False)
                err_console.print(f"closest prompt in the store:  {closest!r}", highlight=False)
            raise InputError(
                f"no QA row matched an entry of {cfg.lmdb_path}; nothing was written",
                "compare the two prompts above; pass the --prompt-template (or --chat) used "
                "when logging",
            )
