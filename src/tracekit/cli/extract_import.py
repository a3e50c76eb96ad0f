"""`tracekit extract import`: the seeds' activations/all_layers.pt into tracekit's layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.console import out_console

from . import _options as opt
from ._common import build_config, show_result

if TYPE_CHECKING:
    from tracekit.jobs.extract_import import ImportActivationsResult


def _print_result(result: ImportActivationsResult) -> None:
    rows = ", ".join(f"{n} {p}" for p, n in result.rows.items())
    out_console.print(
        f"imported {result.source} ({rows} rows) as {result.pooling}, layers "
        f"{result.layers[0]}-{result.layers[-1]}",
        markup=False,
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_command(
        ctx: typer.Context,
        experiment: opt.Experiment = None,
        trait: opt.Trait = None,
        experiments_dir: opt.ExperimentsDir = Path("experiments"),
        pooling: Annotated[
            str,
            typer.Option(
                "--pooling",
                help="Pooling the seed's rows were made with; names the files (default "
                "response_avg, the mean over response tokens).",
            ),
        ] = "response_avg",
        first_layer: Annotated[
            int,
            typer.Option(
                "--first-layer",
                min=0,
                help="Layer number of the file's first entry: 0 when it holds HF "
                "output_hidden_states (embedding output first), 1 when it holds decoder-block "
                "outputs only.",
            ),
        ] = 0,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Import seed 002's activations/all_layers.pt ([n, layers, hidden]; pos rows, then neg)
        as {pos,neg}_POOLING.npy, so 'extract vectors' reads it."""
        from tracekit.jobs.extract_import import (
            ImportActivationsConfig,
            import_seed_activations,
        )

        result = import_seed_activations(build_config(ctx, ImportActivationsConfig))
        show_result(result, json_output, _print_result)
