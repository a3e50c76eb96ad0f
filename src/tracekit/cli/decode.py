"""`tracekit decode`: cached generation ``.npy`` files -> JSON and Markdown (seeds 000/001)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import DecodeFormat
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import build_config, show_result

if TYPE_CHECKING:
    from tracekit.jobs.decode import DecodedFile, DecodeResult

_STYLE = {"decoded": "green", "would-decode": "cyan", "skipped": "yellow", "failed": "bold red"}


def _print_file(outcome: DecodedFile) -> None:
    from rich.markup import escape

    style = _STYLE[outcome.status]
    label = f"[{style}]{outcome.status:<12}[/]"
    if outcome.status == "failed":
        err_console.print(f"{label} {escape(outcome.error or '')}", highlight=False, soft_wrap=True)
        return
    if outcome.status == "skipped":
        note = f"outputs exist; {outcome.note or '--force to redo'}"
    else:
        note = f"{outcome.items} of {outcome.total} items"
        if outcome.note:
            note += f"; {outcome.note}"
    outputs = ", ".join(p.name for p in outcome.outputs)
    err_console.print(
        f"{label} {escape(str(outcome.source))} -> {escape(outputs)} ({note})", highlight=False
    )


def _print_summary(result: DecodeResult, dry_run: bool) -> None:
    from rich.table import Table

    table = Table(title="decode summary (dry run: nothing written)" if dry_run else "decode")
    table.add_column("decoded" if not dry_run else "would decode", justify="right")
    table.add_column("skipped (already exist)", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("total processed", justify="right")
    processed = result.decoded + result.skipped
    table.add_row(
        str(result.decoded), str(result.skipped), str(result.failed), f"{processed}/{result.total}"
    )
    out_console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("decode")
    def decode_command(
        ctx: typer.Context,
        base_dir: Annotated[
            Path,
            typer.Option(
                "--base-dir",
                help="Folder searched (recursively) for caches: generate's --experiments-dir "
                "(EXP/TRAIT/generations/) or the seed's experiments/<model>/generations/.",
                file_okay=False,
            ),
        ] = Path("experiments"),
        model: Annotated[
            str | None,
            typer.Option(
                "--model",
                help="Only the caches of this model: the model their metadata records (hub id "
                "or its last part) or, in the seed's layout, the first folder under BASE_DIR.",
            ),
        ] = None,
        limit: Annotated[
            int | None,
            typer.Option("--limit", min=1, help="Render only the first N items of each file."),
        ] = None,
        format: Annotated[
            DecodeFormat, typer.Option("--format", help="Outputs to write: json, md or both.")
        ] = DecodeFormat.both,
        allow_pickle: Annotated[
            bool,
            typer.Option(
                "--allow-pickle",
                help="Old caches whose pickles hold more than containers, strings, numbers and "
                "numpy arrays: load them with pickle, which EXECUTES CODE from the file. Use "
                "only on files you trust.",
            ),
        ] = False,
        dry_run: opt.DryRun = False,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Decode cached generation .npy files into JSON and Markdown."""
        from tracekit.config.decode import DecodeConfig
        from tracekit.errors import InputError
        from tracekit.jobs.decode import decode

        cfg = build_config(ctx, DecodeConfig)
        result = decode(cfg, on_file=None if json_output else _print_file)
        payload = {**result.summary(), "files": [f.as_dict() for f in result.files]}
        show_result(result, json_output, partial(_print_summary, dry_run=cfg.dry_run), payload)
        if result.failed:
            raise InputError(
                f"{result.failed} of {result.total} cache files could not be decoded",
                "see the 'failed' lines above; nothing was written for those files",
            )
