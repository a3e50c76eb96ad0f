"""`tracekit generate`: contrastive trait responses with activation capture (seed 002)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tracekit.console import out_console

from ._common import (
    BatchSizeOpt,
    ConfigOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    ExperimentOpt,
    ForceOpt,
    JsonOpt,
    LayersOpt,
    ModelOpt,
    NumProcessesOpt,
    SeedOpt,
    build_config,
)

if TYPE_CHECKING:
    from tracekit.generation.run import GenerateResult

# options declared once for generate and extract activations
ExperimentsDirOpt = Annotated[
    Path,
    typer.Option("--experiments-dir", help="Folder holding experiments.", file_okay=False),
]
PoolingOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--pooling",
        help="response_avg (mean over response tokens), prompt_last, prompt_avg; repeat or "
        "comma-separate for several. Default: response_avg.",
    ),
]
ChatTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Wrap prompts in the tokenizer's chat template (instruction as system prompt); "
        "--no-chat-template for base models.",
    ),
]


def _print_result(result: GenerateResult) -> None:
    from rich.table import Table

    table = Table(title=f"generate · {result.model}")
    for column, justify in (
        ("trait", "left"),
        ("pos rows", "right"),
        ("neg rows", "right"),
        ("new rows", "right"),
        ("new tokens", "right"),
        ("judged pos>=T / neg<T", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for trait in result.traits:
        table.add_row(
            trait.trait,
            str(trait.rows.get("pos", 0)),
            str(trait.rows.get("neg", 0)),
            str(trait.generated),
            f"{trait.tokens:,}",
            "-"
            if trait.passing is None
            else f"{trait.passing.get('pos', 0)} / {trait.passing.get('neg', 0)}",
        )
    rate = result.tokens / result.seconds if result.seconds > 0 else 0.0
    table.caption = (
        f"{result.tokens:,} new tokens in {result.seconds:.1f} s ({rate:,.1f} tok/s), "
        f"final batch size {result.batch_size}"
    )
    out_console.print(table)
    for trait in result.traits:
        out_console.print(f"{trait.trait}: {trait.root}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_command(
        ctx: typer.Context,
        experiment: ExperimentOpt,
        trait: Annotated[
            str | None,
            typer.Option("--trait", help="Trait name (shipped or in the experiment) or JSON path."),
        ] = None,
        traits: Annotated[
            str | None, typer.Option("--traits", help="Several traits: 'refusal,verbosity'.")
        ] = None,
        experiments_dir: ExperimentsDirOpt = Path("experiments"),
        model: ModelOpt = None,
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        device_map: DeviceMapOpt = None,
        chat_template: ChatTemplateOpt = True,
        engine: EngineOpt = "auto",
        batch_size: BatchSizeOpt = 8,
        n_examples: Annotated[
            int, typer.Option("--n-examples", min=1, help="Rows per polarity.")
        ] = 100,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 150,
        temperature: Annotated[
            float, typer.Option("--temperature", min=0.0, help="0 = greedy.")
        ] = 1.0,
        top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
        seed: SeedOpt = None,
        layers: LayersOpt = None,
        pooling: PoolingOpt = None,
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
        force: ForceOpt = False,
        num_processes: NumProcessesOpt = 1,
        json_output: JsonOpt = False,
        config: ConfigOpt = None,
    ) -> None:
        """Generate positive/negative trait responses with activation capture."""
        from tracekit.errors import ConfigError
        from tracekit.generation.run import GenerateConfig, generate

        derived = {}
        if trait is not None and traits is not None:
            raise ConfigError("give --trait or --traits, not both")
        if trait is not None or traits is not None:
            derived["traits"] = trait if trait is not None else traits
        if trait is None and traits is None and config is None:
            raise ConfigError("missing option --trait (or --traits a,b,c)")
        cfg = build_config(ctx, GenerateConfig, **derived)
        if num_processes > 1:
            # the config file carries every option but the ones the parser requires
            args = ["--experiment", cfg.experiment] + (["--json"] if json_output else [])
            raise typer.Exit(launch_processes(["generate"], cfg, num_processes, args))
        with batch_progress() as (on_total, on_batch):
            result = generate(cfg, on_batch=on_batch, on_total=on_total)
        if not is_main_process():
            return  # the main process reports the merged result
        if json_output:
            out_console.print_json(json.dumps(result.to_dict()))
        else:
            _print_result(result)


def launch_processes(verb: list[str], cfg: Any, num_processes: int, args: list[str]) -> int:
    """Run ``tracekit VERB ARGS`` with ``cfg`` in ``num_processes`` processes; their exit code."""
    from tracekit.distributed import launch

    return launch(verb, cfg, num_processes, args)


def is_main_process() -> bool:
    """False in the non-main processes of a data-parallel run (they print nothing)."""
    from tracekit.distributed import process_info

    return process_info().is_main


@contextmanager
def batch_progress() -> Iterator[tuple[Callable[[int], None], Callable[[int, int], None]]]:
    """Rows and tokens/s bars on stderr, fed by the core's ``on_total``/``on_batch`` hooks."""
    from tracekit.console import progress_bar

    if not is_main_process():  # one set of bars per data-parallel run: the main process's
        yield (lambda total: None), (lambda n_rows, n_tokens: None)
        return
    with progress_bar() as progress:
        rows = progress.add_task("rows", total=None, unit="rows")
        tokens = progress.add_task("new tokens", total=None, unit="tok")

        def on_total(total: int) -> None:
            progress.update(rows, total=total)

        def on_batch(n_rows: int, n_tokens: int) -> None:
            progress.advance(rows, n_rows)
            progress.advance(tokens, n_tokens)

        yield on_total, on_batch
