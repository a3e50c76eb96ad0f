"""`tracekit extract activations` (stage 2) and `tracekit extract vectors` (stage 3)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import DtypeName, NegRule, VectorExport, VectorMethod
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import batch_progress, build_config, is_main_process, launch_processes, show_result

if TYPE_CHECKING:
    from tracekit.jobs.extract_activations import ExtractActivationsResult
    from tracekit.vectors.mean_diff import ExtractVectorsResult


def _print_activations(result: ExtractActivationsResult) -> None:
    out_console.print(
        f"{result.trait}: pos {result.rows.get('pos', 0)} rows, neg "
        f"{result.rows.get('neg', 0)} rows, {len(result.layers)} layers, "
        f"{', '.join(result.poolings)} in {result.seconds:.1f} s -> "
        f"{result.files[-1].parent}",
        highlight=False,
    )


def _print_vectors(result: ExtractVectorsResult) -> None:
    from rich.table import Table

    best = result.best_layer
    table = Table(
        title=f"{result.trait} · {result.method} · {result.pooling} · {result.n_pairs} pairs"
    )
    for column in ("layer", "vector norm", "Cohen's d", "AUROC"):
        table.add_column(column, justify="right")
    for s in result.layers:
        mark = " *" if s.layer == best else ""
        table.add_row(f"{s.layer}{mark}", f"{s.norm:.3f}", f"{s.cohen_d:.2f}", f"{s.auroc:.3f}")
    table.caption = "* best separation (AUROC, then d), in-sample over the pairs used"
    out_console.print(table)
    out_console.print(f"vectors (n_layers x hidden): {result.files[0]}", markup=False)
    for path in result.files:
        if path.suffix == ".png":
            out_console.print(f"separation plot: {path}", markup=False)
    if result.gguf is not None:
        written = sorted(result.gguf.directions.values())
        skipped = ", ".join(map(str, result.gguf.skipped))
        out_console.print(
            f"llama.cpp control vector: {result.gguf.path} (direction.{written[0]}.."
            f"{written[-1]} = tracekit layers {written[0] + 1}..{written[-1] + 1}"
            + (f"; layers {skipped} have no llama.cpp slot)" if skipped else ")"),
            markup=False,
        )


def register(app: typer.Typer) -> None:
    @app.command("activations")
    def activations_command(
        ctx: typer.Context,
        experiment: opt.Experiment = None,
        trait: opt.Trait = None,
        experiments_dir: opt.ExperimentsDir = Path("experiments"),
        model: opt.Model = None,
        dtype: opt.Dtype = DtypeName.auto,
        device: opt.Device = "auto",
        device_map: opt.DeviceMap = None,
        chat_template: opt.ChatTemplate = True,
        batch_size: opt.BatchSize = 8,
        layers: opt.Layers = None,
        pooling: opt.Pooling = None,
        engine: opt.ForwardEngine = "auto",
        pt: opt.Pt = False,
        force: opt.Force = False,
        num_processes: opt.NumProcesses = 1,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Stage 2: teacher-forced activations for saved responses (responses/{pos,neg}.csv)."""
        from tracekit.config.extract_activations import ExtractActivationsConfig
        from tracekit.jobs.extract_activations import extract_activations

        cfg = build_config(ctx, ExtractActivationsConfig)
        launch_processes(["extract", "activations"], cfg, num_processes, json_output)
        with batch_progress() as (on_total, on_batch):
            result = extract_activations(cfg, on_batch=on_batch, on_total=on_total)
        if is_main_process():  # (it reports the merged result)
            show_result(result, json_output, _print_activations)

    @app.command("vectors")
    def vectors_command(
        ctx: typer.Context,
        experiment: opt.Experiment = None,
        trait: opt.Trait = None,
        experiments_dir: opt.ExperimentsDir = Path("experiments"),
        method: Annotated[
            VectorMethod,
            typer.Option(
                "--method",
                help="mean_diff: mean(pos) - mean(neg) per layer; pca_diff: first principal "
                "component of the paired differences, sign along the mean difference, unit norm "
                "(repeng); probe: logistic-regression weight pos vs neg, unit norm.",
            ),
        ] = VectorMethod.mean_diff,
        pooling: opt.SavedPooling = "response_avg",
        threshold: Annotated[
            float,
            typer.Option(
                "--threshold",
                help="Judge filter: pos trait score >= T; neg below the --neg-rule limit.",
            ),
        ] = 50.0,
        min_coherence: Annotated[
            float,
            typer.Option(
                "--min-coherence",
                help="Drop pairs with coherence below this, or without a coherence score when "
                "the CSVs have that column.",
            ),
        ] = 50.0,
        neg_rule: Annotated[
            NegRule,
            typer.Option(
                "--neg-rule",
                help="Neg rows kept: 'mirrored' (default) neg score < 100 - T, as "
                "persona_vectors, so raising T tightens both sides alike (same pairs at T=50); "
                "'same' neg score < T.",
            ),
        ] = NegRule.mirrored,
        plot: Annotated[
            bool,
            typer.Option(
                "--plot/--no-plot",
                help="Draw the separation table as a PNG (Cohen's d and AUROC per layer) "
                "beside the metadata JSON.",
            ),
        ] = True,
        export: Annotated[
            VectorExport | None,
            typer.Option(
                "--export",
                help="gguf: also write a llama.cpp control vector (--control-vector FILE): "
                "tracekit layer i becomes direction.{i-1}; layers 0 and 1 have no llama.cpp slot.",
            ),
        ] = None,
        gguf_model_hint: Annotated[
            str | None,
            typer.Option(
                "--gguf-model-hint",
                help="controlvector.model_hint of the GGUF (default: the architecture recorded "
                "by generate, e.g. llama).",
            ),
        ] = None,
        force: opt.Force = False,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Stage 3: per-layer trait vectors (mean_diff, pca_diff, probe) and a separation table."""
        from tracekit.vectors.mean_diff import ExtractVectorsConfig, extract_vectors

        result = extract_vectors(build_config(ctx, ExtractVectorsConfig))
        if not result.judged:
            err_console.print(
                f"no judge scores found: using all {result.n_pairs} pairs "
                "(run 'tracekit judge' first to filter by trait score)"
            )
        else:
            err_console.print(f"judge filter: {result.judge_filter}", markup=False)
            shown = ", ".join(f"{n} {why}" for why, n in result.dropped.items()) or "none"
            err_console.print(f"left out: {shown}; {result.n_pairs} pairs used")
        show_result(result, json_output, _print_vectors)
