"""The options several commands share, declared once so their names and help texts agree.

Each is an ``Annotated`` alias that a command uses as ``model: opt.Model = None`` (``from .
import _options as opt``); the default stays in the command. Only typer and the standard
library are imported here: ``--help`` and TAB completion read these.

Typer has no option groups, so a command lists every shared alias it takes, one line each,
as huggingface_hub's commands list ``repo_id: RepoIdArg, repo_type: RepoTypeOpt, ...``: the
commands that work in a trait folder repeat ``--experiment/--trait/--experiments-dir``, those
that load a model ``--model/--dtype/--device/...``. Those lines declare; the meaning lives here
once. (Options are not generated from the pydantic configs: that would import pydantic for
``--help``.) An option that means another thing in another command keeps its own declaration
there; tests/unit/test_help_and_docs.py lists those.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tracekit.config.choices import DeviceMapName, DtypeName


def one_of(choices: type[StrEnum]) -> str:
    """``"a, b or c"``: the values of ``choices`` for a help text, so it names what the option
    takes (the enum is where the values live)."""
    values = [choice.value for choice in choices]
    return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]


MODEL_DTYPE_HELP = f"Model dtype: {one_of(DtypeName)} (auto: bf16 on GPU, fp32 on CPU)."
"""``--dtype`` of the commands that load a model, and ``log --model-dtype``."""

Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML, TOML or JSON file supplying any option of this command "
        "(a [command] table or flat keys); flags on the command line override it.",
        dir_okay=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "--gen-model",
        help="Hugging Face hub id or local model folder. Default: the embedded "
        "SmolLM2-135M-Instruct (no download).",
    ),
]
Layers = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Layers like '0-5', '2,5,10', '0-2,10,15-17' or 'all'. Layer 0 is the embedding "
        "output; layer i is the residual stream after decoder block i-1.",
    ),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", help="Rows per forward pass (positive).", min=1)
]
Pt = Annotated[
    bool,
    typer.Option(
        "--pt/--no-pt",
        help="Also write each activation file as a .pt tensor (torch.load; a second full copy "
        "on disk). The .npy files are always written.",
    ),
]
Force = Annotated[
    bool, typer.Option("--force", help="Overwrite existing outputs / redo finished work.")
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; write nothing.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")
]
Dtype = Annotated[
    DtypeName,
    typer.Option(
        "--dtype",
        help=MODEL_DTYPE_HELP,
    ),
]
Device = Annotated[str, typer.Option("--device", help="Device: auto, cpu, cuda, cuda:N or mps.")]
DeviceMap = Annotated[
    DeviceMapName | None,
    typer.Option(
        "--device-map",
        help="'auto' spreads a model too large for one device over all devices (accelerate).",
    ),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
Experiment = Annotated[
    str | None,
    typer.Option(
        "--experiment",
        help="Experiment name: outputs go to experiments/EXP/. Required (here or in --config).",
    ),
]
"""Optional to the parser so that a ``--config`` file can supply it; the command's config
model requires it ("--experiment: Field required" when neither gives it)."""
Engine = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Generation engine: auto (cuda on a supported model on one NVIDIA GPU, else hf), "
        "hf (reference decode loop, any model and device) or cuda (static KV cache + CUDA graphs).",
    ),
]
ForwardEngine = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Teacher-forced forward: auto (cuda on a supported model on one NVIDIA GPU, else "
        "hf), hf (the model's own forward, any model and device) or cuda (compiled blocks, "
        "flash attention, right padding).",
    ),
]
NumProcesses = Annotated[
    int,
    typer.Option(
        "--num-processes",
        min=1,
        help="Data-parallel: run N processes (one per GPU; gloo on CPU) through torchrun, rows "
        "sharded by id, one merge at the end. Same outputs as one process. See docs/multi-gpu.md.",
    ),
]
ExperimentsDir = Annotated[
    Path,
    typer.Option("--experiments-dir", help="Folder holding experiments.", file_okay=False),
]
Pooling = Annotated[
    list[str] | None,
    typer.Option(
        "--pooling",
        help="response_avg (mean over response tokens), prompt_last, prompt_avg; repeat or "
        "comma-separate for several. Default: response_avg.",
    ),
]
SavedPooling = Annotated[str, typer.Option("--pooling", help="Which saved activations to use.")]
"""One pooling of the activations a trait folder holds (``{pos,neg}_POOLING.npy``)."""
MaxNewTokens = Annotated[
    int,
    typer.Option("--max-new-tokens", min=1, help="Most tokens per response (each stops at eos)."),
]
ChatTemplate = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Wrap prompts in the tokenizer's chat template (instruction as system prompt); "
        "--no-chat-template for base models.",
    ),
]


Trait = Annotated[
    str | None,
    typer.Option(
        "--trait", help="Trait folder name inside the experiment. Required (here or in --config)."
    ),
]
PromptTemplate = Annotated[
    str | None,
    typer.Option(
        "--prompt-template",
        help="How a raw question becomes the prompt; must contain {question}. Default: "
        "'user: Answer in one sentence. Q:{question}\\n A:' (the seed's format).",
    ),
]
SkipBadLines = Annotated[
    bool,
    typer.Option("--skip-bad-lines", help="Skip malformed QA lines (counted) instead of stopping."),
]
StorePickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="A seed store's pickled values holding more than containers, strings, numbers "
        "and numpy arrays (e.g. torch tensors): load them with pickle, which EXECUTES CODE "
        "from the store. Use only on stores you made yourself.",
    ),
]
QuestionField = Annotated[
    str, typer.Option("--question-field", help="QA field holding the raw question.")
]
