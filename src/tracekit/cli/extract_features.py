"""`tracekit extract features`: sentence feature files (hidden states + SAE activations)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import DtypeName, SaeStorage
from tracekit.console import err_console, out_console

from . import _options as opt
from ._common import build_config, is_main_process, launch_processes, show_result, task_progress

if TYPE_CHECKING:
    from tracekit.jobs.extract_features import FeaturesResult


def _print_result(result: FeaturesResult) -> None:
    from rich.table import Table

    from tracekit.config.types import LayerSpec

    table = Table(title="extract features", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    sae = "none (hidden states only)"
    if result.sae_width is not None:
        l0s = sorted({f"{v:g}" for v in result.average_l0s or []})
        sae = (
            f"{', '.join(result.sae_formats)}, width {result.sae_width}, "
            f"average L0 {'/'.join(l0s)}, {result.sae_storage} storage"
        )
    rows = [
        ("output", str(result.output)),
        ("model", result.model_label or result.model),
        ("layers", str(LayerSpec(result.layers))),
        ("SAE", sae),
        ("sentences", f"{result.written} written, {result.skipped} already done (resumed)"),
    ]
    if result.written:
        rate = f"{result.sentences_per_second:.1f} sentences/s, {result.tokens} tokens"
        rows.append(("speed", f"{rate} (model and SAE loading not counted)"))
    for field, value in rows:
        table.add_row(field, value)
    out_console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("features")
    def features_command(
        ctx: typer.Context,
        sentences: Annotated[
            Path | None,
            typer.Option(
                "--sentences",
                help="CSV with one sentence per row and a concept-strength label. Required.",
                dir_okay=False,
            ),
        ] = None,
        output: Annotated[
            Path | None,
            typer.Option(
                "--output",
                help="Folder for sentence_000000.npz, ... (row i of the CSV) and features.json. "
                "Required.",
                file_okay=False,
            ),
        ] = None,
        text_column: Annotated[
            str, typer.Option("--text-column", help="CSV column holding the sentence.")
        ] = "sentence",
        label_column: Annotated[
            str, typer.Option("--label-column", help="CSV column holding the integer label.")
        ] = "concept_strength_label",
        label_range: Annotated[
            str, typer.Option("--label-range", help="Allowed labels, MIN-MAX.")
        ] = "0-3",
        model: opt.Model = None,
        layers: opt.Layers = None,
        sae: Annotated[
            Path | None,
            typer.Option(
                "--sae",
                help="Folder of SAEs, one per layer, numbered as the SAE release numbers them: "
                "layer_N/width_W/average_l0_K/params.npz (Gemma Scope) or layer_N/cfg.json + "
                "sae_weights.safetensors (SAELens). Release layer N (resid_post of block N) "
                "is tracekit layer N+1. Default --layers: every layer it has.",
                file_okay=False,
            ),
        ] = None,
        sae_width: Annotated[
            str | None,
            typer.Option(
                "--sae-width", help="Gemma Scope: which width_W folder (e.g. 16k or 16384)."
            ),
        ] = None,
        sae_l0: Annotated[
            str | None,
            typer.Option(
                "--sae-l0",
                help="Gemma Scope: pick the average_l0_K nearest this target in every layer "
                "(e.g. 100), and/or per release layer (e.g. '100,12:82').",
            ),
        ] = None,
        sae_storage: Annotated[
            SaeStorage,
            typer.Option(
                "--sae-storage",
                help="dense: 'activations' [layers, tokens, width] as the seed has it; sparse: "
                "CSR indices + values (much smaller; build-dataset reads both).",
            ),
        ] = SaeStorage.dense,
        batch_size: opt.BatchSize = 16,
        dtype: opt.Dtype = DtypeName.auto,
        device: opt.Device = "auto",
        force: opt.Force = False,
        num_processes: opt.NumProcesses = 1,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Sentence feature files: embeddings, hidden states and SAE activations per token.

        One batched forward pass per batch of sentences captures every chosen layer at every
        token; reruns resume where a crash stopped.
        """
        from tracekit.features import FeaturesConfig, extract_features

        cfg = build_config(ctx, FeaturesConfig, section="extract-features")
        launch_processes(["extract", "features"], cfg, num_processes, json_output)
        if not is_main_process():  # data-parallel: the main process shows progress and result
            extract_features(cfg)
            return
        with task_progress("extracting features", "sentences") as bar:
            result = extract_features(cfg, on_progress=bar.advance)
        if result.skipped and not result.written:
            err_console.print("all sentence files already exist; nothing to do (--force redoes)")
        show_result(result, json_output, _print_result)
