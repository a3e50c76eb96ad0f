"""`tracekit build-dataset`: classifier datasets from sentence feature NPZ files (seed 004)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import Normalization, Strategy
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import build_config, show_result, task_progress

if TYPE_CHECKING:
    from tracekit.datasets.build import BuildDatasetResult


def _print_result(result: BuildDatasetResult) -> None:
    from rich.table import Table

    table = Table(title=f"build-dataset: {result.strategy}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("output", str(result.output)),
        (
            "input",
            f"{result.input_source}, layers {result.input_layers} "
            f"({result.layer_numbering} numbering)",
        ),
        ("files", str(result.n_files)),
        ("samples", str(result.n_samples)),
        ("X", " x ".join(str(d) for d in result.x_shape)),
        ("normalization", result.norm_method),
    ]
    if result.provenance:
        from tracekit.models.weights import short_weights

        model = result.provenance.get("model") or "model not recorded"
        rows.append(("weights", ", ".join(filter(None, [model, short_weights(result.provenance)]))))
    if result.target_layer is not None:
        l0 = "not recorded" if result.average_l0 is None else f"{result.average_l0:g}"
        rows.append(
            (
                "target",
                f"layer {result.target_layer}, feature {result.target_feature} "
                f"(SAE width {result.sae_width}, average L0 {l0})",
            )
        )
    if result.n_train is not None:
        rows.append(("split", f"{result.n_train} train / {result.n_test} test"))
    for field, value in rows:
        table.add_row(field, value)
    out_console.print(table)
    for notice in result.notices:
        err_console.print(f"[cyan]note:[/] {notice}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("build-dataset")
    def build_dataset_command(
        ctx: typer.Context,
        strategy: Annotated[
            Strategy | None,
            typer.Option(
                "--strategy",
                help="embedding-to-feature: embeddings -> one SAE feature; hidden-to-feature: "
                "hidden state of --target-layer -> its SAE feature; hidden-to-concept: hidden "
                "states of --layer/--layers -> concept label. Required.",
            ),
        ] = None,
        input: Annotated[
            Path | None,
            typer.Option(
                "--input",
                help="Folder of sentence_*.npz files (from `tracekit extract features`). Required.",
                file_okay=False,
            ),
        ] = None,
        output: Annotated[
            Path | None,
            typer.Option(
                "--output",
                help="Dataset .npz to write (parent folders are created). Required.",
                dir_okay=False,
            ),
        ] = None,
        normalize: Annotated[
            Normalization,
            typer.Option("--normalize", help="Feature scaling of X."),
        ] = Normalization.standardize,
        target_layer: Annotated[
            int | None,
            typer.Option(
                "--target-layer", min=0, help="*-to-feature: layer whose SAE feature is y."
            ),
        ] = None,
        target_feature: Annotated[
            int | None,
            typer.Option(
                "--target-feature",
                min=0,
                help="*-to-feature: SAE feature index (checked against the SAE width in the "
                "files).",
            ),
        ] = None,
        layer: Annotated[
            int | None,
            typer.Option("--layer", min=0, help="hidden-to-concept: one input layer."),
        ] = None,
        layers: opt.Layers = None,
        average_l0: Annotated[
            float | None,
            typer.Option(
                "--average-l0",
                help="*-to-feature: average L0 of the SAE the feature id comes from (e.g. "
                "from ranked_features.csv); the run fails if the files' SAE at the target "
                "layer has another (compared rounded to integers).",
            ),
        ] = None,
        test_fraction: Annotated[
            float | None,
            typer.Option(
                "--test-fraction",
                help="Also split: this fraction of samples goes to X_test/y_test; the "
                "normalization is fitted on the training part only.",
            ),
        ] = None,
        seed: Annotated[
            int, typer.Option("--seed", help="Random seed of the train/test split.")
        ] = 0,
        group_by: Annotated[
            str | None,
            typer.Option(
                "--group-by",
                help="Keep samples with equal FIELD on one side of the split: 'sentence' or "
                "the name of a per-sentence scalar array in the files "
                "(e.g. concept_strength_label).",
            ),
        ] = None,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Build classifier datasets (X, y, metadata) from sentence feature NPZ files."""
        from tracekit.datasets.build import BuildDatasetConfig, build_dataset

        cfg = build_config(ctx, BuildDatasetConfig)
        with task_progress("reading sentence files", "files", transient=True) as bar:
            result = build_dataset(cfg, on_progress=bar.completed)
        show_result(result, json_output, _print_result, result.as_dict())
