"""`tracekit report`: summaries across finished runs (the steering dose-response)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import ReportPolarity
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import build_config, show_result

if TYPE_CHECKING:
    from tracekit.report.steering import MetricSummary, SteeringReport


def _cell(summary: MetricSummary) -> str:
    if summary.mean is None:
        return "-"
    if summary.low is None or summary.high is None:
        return f"{summary.mean:.3g}"
    return f"{summary.mean:.3g} [{summary.low:.3g}, {summary.high:.3g}]"


def _print_report(report: SteeringReport) -> None:
    from rich.table import Table

    table = Table(title=f"steering · {report.trait} · layer {report.layer}")
    table.add_column("direction")
    table.add_column("coef", justify="right")
    table.add_column("rows", justify="right")
    for metric in report.metrics:
        table.add_column(f"{metric} (95% CI)", justify="right")
        if metric.endswith("_score"):
            table.add_column("failed", justify="right")
    for point in report.points:
        cells = []
        for metric in report.metrics:
            cells.append(_cell(point.metrics[metric]))
            if metric.endswith("_score"):
                cells.append(str(point.metrics[metric].failed))
        table.add_row(point.direction, f"{point.coef:+g}", str(point.rows), *cells)
    out_console.print(table)
    for note in report.notes:
        out_console.print(note, markup=False, highlight=False)
    if report.png is not None:
        out_console.print(f"plot: {report.png}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    report_app = typer.Typer(help="Summaries across finished runs.", no_args_is_help=True)

    @report_app.command("steering")
    def steering_command(
        ctx: typer.Context,
        experiment: opt.Experiment = None,
        trait: opt.Trait = None,
        experiments_dir: opt.ExperimentsDir = Path("experiments"),
        layer: Annotated[
            int | None,
            typer.Option("--layer", help="The steered layer (only when sweeps at several exist)."),
        ] = None,
        measure: Annotated[
            str | None,
            typer.Option(
                "--measure",
                help="An independent measure next to the judge's scores: a numeric CSV column "
                "(n_tokens) or words:FILE (fraction of a response's words in a word list).",
            ),
        ] = None,
        polarity: Annotated[
            ReportPolarity,
            typer.Option(
                "--polarity",
                help="Which rows of each set: all (default), neutral, pos or neg (the last two "
                "for --steer-prompts trait sweeps).",
            ),
        ] = ReportPolarity.all,
        output: Annotated[
            Path | None,
            typer.Option(
                "--output", dir_okay=False, help="The PNG (default: in the sweep's folder)."
            ),
        ] = None,
        plot: Annotated[
            bool, typer.Option("--plot/--no-plot", help="Write the dose-response PNG.")
        ] = True,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Dose-response of a steering sweep: per coefficient, each metric's mean with its 95%
        interval, vector against the random control (table, --json, PNG)."""
        from tracekit.report.steering import SteeringReportConfig, steering_report

        result = steering_report(build_config(ctx, SteeringReportConfig))
        show_result(result, json_output, _print_report)
        if not any(p.direction == "random" for p in result.points):
            err_console.print("no random control in this sweep (generate --steer-control random)")

    app.add_typer(report_app, name="report")
