"""`tracekit extract projections`: per-row, per-layer projections of activations on a vector."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import VectorMethod
from tracekit.console import out_console

from . import _options as opt
from ._common import build_config, show_result

if TYPE_CHECKING:
    from tracekit.vectors.projections import ProjectionsResult


def _print(result: ProjectionsResult) -> None:
    from rich.table import Table

    table = Table(title=f"{result.trait} · {result.pooling} · projection on {result.vector.name}")
    for column in ("layer", "pos rows", "neg rows", "mean pos", "mean neg", "Cohen's d", "AUROC"):
        table.add_column(column, justify="right")
    for s in result.layers:
        table.add_row(
            str(s.layer), str(s.n_pos), str(s.n_neg), f"{s.mean_pos:.3f}", f"{s.mean_neg:.3f}",
            f"{s.cohen_d:.2f}", f"{s.auroc:.3f}",
        )  # fmt: skip
    table.caption = "projection = a · v / |v|; AUROC = P(pos projection > neg), ties half"
    out_console.print(table)
    shown = ", ".join(path.suffix.lstrip(".") for path in result.files)
    out_console.print(f"projections ({shown}): {result.files[0].parent}", markup=False)


def register(app: typer.Typer) -> None:
    @app.command("projections")
    def projections_command(
        ctx: typer.Context,
        experiment: opt.Experiment = None,
        trait: opt.Trait = None,
        experiments_dir: opt.ExperimentsDir = Path("experiments"),
        vector: Annotated[
            Path | None,
            typer.Option(
                "--vector",
                help="Vectors file (.npy or .pt, [n_layers, hidden] or one [hidden] vector), "
                "e.g. another experiment's. Default: this trait's vectors/{method}_{pooling}.npy.",
                dir_okay=False,
            ),
        ] = None,
        method: Annotated[
            VectorMethod,
            typer.Option(
                "--method", help="Picks the default --vector (vectors/{method}_{pooling}.npy)."
            ),
        ] = VectorMethod.mean_diff,
        pooling: opt.SavedPooling = "response_avg",
        layers: opt.Layers = None,
        plot: Annotated[
            bool,
            typer.Option(
                "--plot/--no-plot",
                help="Draw a PNG: AUROC per layer, and the pos/neg projections at the best layer.",
            ),
        ] = True,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Project every row's pooled activation on a trait vector (a · v / |v|) per layer:
        CSV + .npy, and how well the projection separates pos from neg (AUROC) per layer."""
        from tracekit.vectors.projections import ProjectionsConfig, extract_projections

        result = extract_projections(build_config(ctx, ProjectionsConfig))
        show_result(result, json_output, _print)
