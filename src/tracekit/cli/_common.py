"""Shared CLI plumbing: options declared once, and building configs from the click context.

Options are ``Annotated`` aliases so help texts agree across commands. ``build_config``
is the single place where CLI > config file > defaults is applied: only options the user
actually typed (click's parameter source) override the file; parser defaults never do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tracekit.config.base import TracekitConfig, resolve_config

ConfigT = TypeVar("ConfigT", bound=TracekitConfig)

# names of click's ParameterSource members that mean "the user gave it"
_EXPLICIT = frozenset({"COMMANDLINE", "ENVIRONMENT", "PROMPT"})


def explicit_params(ctx: typer.Context) -> dict[str, Any]:
    """The parameters of ``ctx`` that the user gave (command line or environment)."""
    return {
        name: value
        for name, value in ctx.params.items()
        if getattr(ctx.get_parameter_source(name), "name", None) in _EXPLICIT
    }


def build_config(
    ctx: typer.Context, cls: type[ConfigT], section: str | None = None, **derived: Any
) -> ConfigT:
    """Config ``cls`` from explicit CLI options > ``--config`` file > ``cls`` defaults.

    ``derived`` holds values the command computed from explicit options (e.g. a parsed pair);
    they count as CLI values. The file section defaults to the command's name.
    """
    values = explicit_params(ctx)
    values.update(derived)
    config_file = ctx.params.get("config")
    return resolve_config(cls, values, config_file, section or ctx.info_name)


# --- options shared by several commands ----------------------------------------------------
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML, TOML or JSON file supplying any option of this command "
        "(a \\[command] table or flat keys); flags on the command line override it.",
        dir_okay=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "--gen-model",
        help="Hugging Face hub id or local model folder. Default: the embedded "
        "SmolLM2-135M-Instruct (no download).",
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Layers like '0-5', '2,5,10', '0-2,10,15-17' or 'all'. Layer 0 is the embedding "
        "output; layer i is the residual stream after decoder block i-1.",
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", help="Rows per forward pass (positive).", min=1)
]
PtOpt = Annotated[
    bool,
    typer.Option(
        "--pt/--no-pt",
        help="Also write each activation file as a .pt tensor (torch.load; a second full copy "
        "on disk). The .npy files are always written.",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Overwrite existing outputs / redo finished work.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show what would be done; write nothing.")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device: auto, cpu, cuda, cuda:N or mps.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="'auto' spreads a model too large for one device over all devices (accelerate).",
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
ExperimentOpt = Annotated[
    str | None,
    typer.Option(
        "--experiment",
        help="Experiment name: outputs go to experiments/EXP/. Required (here or in --config).",
    ),
]
"""Optional to the parser so that a ``--config`` file can supply it; the command's config
model requires it ("--experiment: Field required" when neither gives it)."""
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Generation engine: auto (cuda on a supported model on one NVIDIA GPU, else hf), "
        "hf (reference decode loop, any model and device) or cuda (static KV cache + CUDA graphs).",
    ),
]
ForwardEngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Teacher-forced forward: auto (cuda on a supported model on one NVIDIA GPU, else "
        "hf), hf (the model's own forward, any model and device) or cuda (compiled blocks, "
        "flash attention, right padding).",
    ),
]
NumProcessesOpt = Annotated[
    int,
    typer.Option(
        "--num-processes",
        min=1,
        help="Data-parallel: run N processes (one per GPU; gloo on CPU) through torchrun, rows "
        "sharded by id, one merge at the end. Same outputs as one process. See docs/multi-gpu.md.",
    ),
]
# options shared by generate and extract activations
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


# --- data-parallel runs and progress -----------------------------------------------------
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
