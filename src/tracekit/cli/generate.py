"""`tracekit generate`: contrastive trait responses with activation capture (seed 002)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tracekit.config.choices import DtypeName, SteerControl, SteerPositions, SteerPrompts
from tracekit.console import out_console

from . import _options as opt
from ._common import batch_progress, build_config, is_main_process, launch_processes, show_result

if TYPE_CHECKING:
    from tracekit.jobs.generate import GenerateResult


def _print_result(result: GenerateResult) -> None:
    from rich.table import Table

    table = Table(title=f"generate · {result.model_label}")
    steered = any(t.steering is not None for t in result.traits)
    polarities = list(dict.fromkeys(p for t in result.traits for p in t.rows)) or ["pos", "neg"]
    names = ["trait", *(["steering"] if steered else []), *(f"{p} rows" for p in polarities)]
    for column in [*names, "new rows", "new tokens", "judged pos>=T / neg<T"]:
        table.add_column(column, justify="left" if column in ("trait", "steering") else "right")
    for trait in result.traits:
        steering = trait.steering or {}
        table.add_row(
            trait.trait,
            *(
                (f"L{steering['layer']} {steering['direction']} {steering['coef']:+g}",)
                if steered
                else ()
            ),
            *(str(trait.rows.get(p, 0)) for p in polarities),
            str(trait.generated),
            f"{trait.tokens:,}",
            "-"
            if trait.passing is None
            else f"{trait.passing.get('pos', 0)} / {trait.passing.get('neg', 0)}",
        )
    generation = result.generation_seconds
    rate = result.tokens / generation if generation > 0 else 0.0
    load = max((float(p.get("load_seconds", 0.0)) for p in result.processes), default=0.0)
    table.caption = (
        f"{result.tokens:,} new tokens in {generation:.1f} s of generation ({rate:,.1f} tok/s); "
        f"model load {load:.1f} s; {result.seconds:.1f} s in all; "
        f"final batch size {result.batch_size}"
    )
    out_console.print(table)
    for trait in result.traits[:1] if steered else result.traits:
        root = trait.root.parent.parent.parent if steered else trait.root
        out_console.print(f"{trait.trait}: {root}", markup=False, highlight=False)


_TRAIT_OPTIONS = {"--traits": "--trait (or --traits for several)"}
"""The config's ``traits`` field comes from ``--trait`` or ``--traits``: a missing-option
message names the one-trait spelling first."""


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_command(
        ctx: typer.Context,
        experiment: opt.Experiment = None,
        trait: Annotated[
            str | None,
            typer.Option("--trait", help="Trait name (shipped or in the experiment) or JSON path."),
        ] = None,
        traits: Annotated[
            str | None, typer.Option("--traits", help="Several traits: 'refusal,verbosity'.")
        ] = None,
        experiments_dir: opt.ExperimentsDir = Path("experiments"),
        model: opt.Model = None,
        dtype: opt.Dtype = DtypeName.auto,
        device: opt.Device = "auto",
        device_map: opt.DeviceMap = None,
        chat_template: opt.ChatTemplate = True,
        engine: opt.Engine = "auto",
        batch_size: opt.BatchSize = 8,
        n_examples: Annotated[
            int, typer.Option("--n-examples", min=1, help="Rows per polarity.")
        ] = 100,
        max_new_tokens: opt.MaxNewTokens = 150,
        temperature: Annotated[
            float, typer.Option("--temperature", min=0.0, help="0 = greedy.")
        ] = 1.0,
        top_p: Annotated[
            float,
            typer.Option(
                "--top-p",
                help="Nucleus sampling: sample from the most likely tokens whose "
                "probabilities sum to P (1.0 = all tokens).",
            ),
        ] = 1.0,
        seed: opt.Seed = 0,
        layers: opt.Layers = None,
        pooling: opt.Pooling = None,
        extract_activations: Annotated[
            bool,
            typer.Option(
                "--extract-activations/--no-extract-activations",
                help="Capture pooled activations during generation.",
            ),
        ] = True,
        judge_model: Annotated[
            str | None,
            typer.Option(
                "--judge-model",
                help="Score each response with this judge (API model name, or a local model "
                "when no --judge-base-url / OPENAI_BASE_URL is set). See 'tracekit judge'.",
            ),
        ] = None,
        judge_metrics: Annotated[
            str | None,
            typer.Option("--judge-metrics", help="trait and/or coherence (default: trait)."),
        ] = None,
        judge_base_url: Annotated[
            str | None,
            typer.Option("--judge-base-url", help="OpenAI-compatible server for the judge."),
        ] = None,
        judge_min_mass: Annotated[
            float,
            typer.Option(
                "--judge-min-mass",
                min=0.0,
                max=1.0,
                help="Leave a score empty (low_mass) when the judge puts less probability than "
                "this on number tokens. The embedded 135M judge needs 0 (plumbing only).",
            ),
        ] = 0.25,
        threshold: Annotated[
            float, typer.Option("--threshold", help="Judge score threshold (0-100).")
        ] = 50.0,
        generation_cache: Annotated[
            bool,
            typer.Option(
                "--generation-cache/--no-generation-cache",
                help="Also write a generation cache that 'tracekit decode' reads.",
            ),
        ] = True,
        pt: opt.Pt = False,
        steer_vector: Annotated[
            Path | None,
            typer.Option(
                "--steer-vector",
                dir_okay=False,
                help="Steer: add COEF x this vector to the residual stream while generating "
                "(a vectors .npy/.pt as 'extract vectors' writes it, [layers, hidden], or one "
                "[hidden] vector). Outputs go to TRAIT/steering/. See docs/steering.md.",
            ),
        ] = None,
        steer_layer: Annotated[
            int | None,
            typer.Option(
                "--steer-layer",
                min=0,
                help="Layer to steer at (tracekit numbering: added where layer L is read, i.e. "
                "to the output of block L-1).",
            ),
        ] = None,
        steer_coef: Annotated[
            str | None,
            typer.Option(
                "--steer-coef",
                help="Coefficients, e.g. -4,-2,0,2,4: one output set each.",
            ),
        ] = None,
        steer_positions: Annotated[
            SteerPositions,
            typer.Option(
                "--steer-positions",
                help="response (default: the last prompt position and every generated "
                "token, as persona_vectors), prompt, or all.",
            ),
        ] = SteerPositions.response,
        steer_control: Annotated[
            SteerControl | None,
            typer.Option(
                "--steer-control",
                help="random: also run the sweep along a seeded random direction of the same "
                "norm (its own output sets).",
            ),
        ] = None,
        steer_control_seed: Annotated[
            int, typer.Option("--steer-control-seed", help="Seed of the random control.")
        ] = 0,
        steer_prompts: Annotated[
            SteerPrompts,
            typer.Option(
                "--steer-prompts",
                help="neutral (default: the questions without instruction, one neutral.csv) "
                "or trait (the pos/neg instructed rows).",
            ),
        ] = SteerPrompts.neutral,
        force: opt.Force = False,
        num_processes: opt.NumProcesses = 1,
        json_output: opt.Json = False,
        config: opt.Config = None,
    ) -> None:
        """Generate positive/negative trait responses with activation capture."""
        from tracekit.config.generate import GenerateConfig
        from tracekit.errors import ConfigError
        from tracekit.jobs.generate import generate

        derived = {}
        if trait is not None and traits is not None:
            raise ConfigError("give --trait or --traits, not both")
        if trait is not None or traits is not None:
            derived["traits"] = trait if trait is not None else traits
        cfg = build_config(ctx, GenerateConfig, given_as=_TRAIT_OPTIONS, **derived)
        launch_processes(["generate"], cfg, num_processes, json_output)
        with batch_progress(cfg.max_new_tokens, cfg.device) as (on_total, on_batch):
            result = generate(cfg, on_batch=on_batch, on_total=on_total)
        if is_main_process():  # (it reports the merged result)
            show_result(result, json_output, _print_result)
