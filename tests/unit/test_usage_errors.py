"""Usage errors are one red line (what is wrong, valid values, did you mean, where to look),
every missing option at once, exit 2; ``--help`` and TAB completion do not import pydantic."""

import os
import subprocess
import sys
from enum import EnumType
from pathlib import Path
from typing import get_args

import pytest

from cli_commands import command_at, every_command

HEAVY = ("pydantic", "torch", "transformers", "numpy", "pandas", "matplotlib", "sklearn")


def _lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["generate", "--experiment", "x", "--trait", "refusal", "--batch-size", "0"],
            "error: --batch-size 0: must be an integer >= 1 (see 'tracekit generate --help')",
        ),
        (
            ["generate", "--experiment", "x", "--trait", "refusal", "--temperature", "-1"],
            "error: --temperature -1: must be a number >= 0.0 (see 'tracekit generate --help')",
        ),
        (
            ["build-dataset", "--normalize", "zscore"],
            "error: --normalize zscore: not one of standardize, minmax, none "
            "(see 'tracekit build-dataset --help')",
        ),
        (
            ["build-dataset", "--normalize", "minmx"],
            "error: --normalize minmx: not one of standardize, minmax, none; did you mean "
            "minmax? (see 'tracekit build-dataset --help')",
        ),
        (
            ["decode", "--limit", "-3"],
            "error: --limit -3: must be an integer >= 1 (see 'tracekit decode --help')",
        ),
        (
            ["decode", "--limit=abc"],
            "error: --limit abc: must be an integer >= 1 (see 'tracekit decode --help')",
        ),
        (
            ["generate", "--batchsize", "3"],
            "error: no such option --batchsize; did you mean --batch-size? "
            "(see 'tracekit generate --help' for the options)",
        ),
        (
            ["generate", "--batch-size"],
            "error: --batch-size needs a value: an integer >= 1 (see 'tracekit generate --help')",
        ),
        (["log", "stats"], "error: missing argument PATH (see 'tracekit log stats --help')"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_usage_error_is_one_line_exit_2(cli, args, expected):
    result = cli(*args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert _lines(result) == [expected]


@pytest.mark.parametrize(
    ("args", "group", "guess"),
    [(["gen"], [], "generate"), (["extract", "vectorz"], ["extract"], "vectors")],
)
def test_unknown_command_lists_the_commands_and_guesses(cli, args, group, guess):
    command = command_at(group)
    names = ", ".join(sorted(command.commands))
    result = cli(*args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert _lines(result) == [
        f"error: no such command '{args[-1]}'; did you mean {guess}? (commands: {names})"
    ]


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["generate"], "--experiment, --trait (or --traits for several)"),
        (
            ["build-dataset"],
            "--strategy (one of embedding-to-feature, hidden-to-feature, hidden-to-concept), "
            "--input, --output",
        ),
        (["extract", "activations"], "--experiment, --trait"),
        (["log"], "--qa, --lmdb"),
        (["reconstruct"], "--qa-output-path, --lmdb-path, --output-path"),
    ],
)
def test_all_missing_options_at_once_in_one_wording(cli, args, missing):
    result = cli(*args, terminal_width=200)
    assert result.exit_code == 2, result.output
    command = " ".join(["tracekit", *args])
    assert _lines(result) == [f"error: missing options {missing} (see '{command} --help')"]


def test_one_missing_option_is_singular(cli):
    result = cli("generate", "--trait", "refusal", terminal_width=200)
    assert result.exit_code == 2
    assert _lines(result) == ["error: missing option --experiment (see 'tracekit generate --help')"]


def _imported_by(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Run the tracekit console script's code with ``args`` in a fresh interpreter; return the
    heavy modules it imported."""
    code = (
        "import sys\n"
        f"sys.argv = ['tracekit', *{args!r}]\n"
        "from tracekit.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert done.stdout.strip(), done.stderr  # help or completions were printed
    return done.stderr.split()


@pytest.mark.parametrize("args", [[*p, "--help"] for p in every_command()], ids=" ".join)
def test_help_imports_no_pydantic_or_torch(args):
    assert _imported_by(args) == []


@pytest.mark.parametrize(
    "words", ["tracekit ge", "tracekit generate --ba", "tracekit build-dataset --normalize "]
)
def test_completion_imports_no_pydantic(words):
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_TRACEKIT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    assert _imported_by([], env) == []


def test_completion_still_completes_values_after_other_options():
    """Completion keeps values uncoerced; it must still find the command and the option."""
    exe = str(Path(sys.executable).parent / "tracekit")
    words = "tracekit build-dataset --test-fraction 0.2 --normalize m"
    env = {
        **os.environ,
        "_TRACEKIT_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    done = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["minmax"]


def test_judge_backend_completes_and_refuses_other_values(cli):
    exe = str(Path(sys.executable).parent / "tracekit")
    words = "tracekit judge --backend "
    env = {
        **os.environ,
        "_TRACEKIT_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split())),
    }
    done = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == ["openai", "local"]
    result = cli("judge", "--input", "x.csv", "--backend", "anthropic", terminal_width=200)
    assert result.exit_code == 2
    assert _lines(result) == [
        "error: --backend anthropic: not one of openai, local (see 'tracekit judge --help')"
    ]


def test_a_folder_tracekit_toml_supplies_its_commands_options(cli, tmp_path, monkeypatch):
    """The demo folder's tracekit.toml makes 'tracekit build-dataset --layers 0-2,10' complete
    there; the command line and --config still win, and a command without a table there
    ignores the file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tracekit.toml").write_text(
        '[build-dataset]\nstrategy = "hidden-to-concept"\ninput = "nope"\noutput = "x.npz"\n'
    )
    result = cli("build-dataset", "--layers", "0-2,10", terminal_width=200)
    # the file's options were taken: the input folder it names is what is missing now
    assert "options from ./tracekit.toml [build-dataset]" in result.output
    assert "missing option" not in result.output and "nope" in result.output
    flag = cli("build-dataset", "--layers", "0-2,10", "--input", "elsewhere", terminal_width=200)
    assert "elsewhere" in flag.output and "nope" not in flag.output
    (tmp_path / "other.toml").write_text("[build-dataset]\nstrategy = 'hidden-to-concept'\n")
    other = cli("build-dataset", "--config", "other.toml", terminal_width=200)
    assert _lines(other)[-1].startswith("error: missing options --input, --output")
    decode = cli("decode", terminal_width=200)  # no [decode] table: the file is not read
    assert "tracekit.toml" not in decode.output


@pytest.mark.parametrize("verb", [["generate", "--experiment", "e", "--trait", "t"], ["log"]])
def test_an_unknown_engine_is_refused_by_the_config(cli, tmp_path, verb):
    """Before any model loads (it was refused by create_engine, after the load)."""
    extra = ["--qa", tmp_path / "qa.jsonl", "--lmdb", tmp_path / "store"] if verb == ["log"] else []
    result = cli(*verb, *extra, "--engine", "fast", terminal_width=200)
    assert result.exit_code == 2, result.output
    assert _lines(result)[0].startswith("error: --engine: unknown engine 'fast': use auto, ")
    assert not (tmp_path / "store").exists()


_MODEL_DTYPES = ["auto", "float32", "bfloat16", "float16"]


@pytest.mark.parametrize(
    ("command", "option", "config", "values"),
    [
        ("log", "--sequence-mode", "LogConfig", ["all", "prompt", "response"]),
        ("log", "--dtype", "LogConfig", ["float16", "bfloat16", "float32"]),
        ("log", "--model-dtype", "LogConfig", _MODEL_DTYPES),
        ("generate", "--dtype", "GenerateConfig", _MODEL_DTYPES),
        ("extract activations", "--dtype", "ExtractActivationsConfig", _MODEL_DTYPES),
        ("extract features", "--dtype", "FeaturesConfig", _MODEL_DTYPES),
        ("extract features", "--sae-storage", "FeaturesConfig", ["dense", "sparse"]),
        ("judge", "--dtype", "JudgeJobConfig", _MODEL_DTYPES),
        ("log", "--device-map", "LogConfig", ["auto"]),
        ("generate", "--device-map", "GenerateConfig", ["auto"]),
        ("extract activations", "--device-map", "ExtractActivationsConfig", ["auto"]),
    ],
)
def test_choice_options_complete_refuse_and_match_the_config(cli, command, option, config, values):
    """TAB after the option offers its values, the parser refuses another in one line naming
    them, and the config takes exactly those (one set, in tracekit.config.choices)."""
    from tracekit.config.base import resolve_config
    from tracekit.config.extract_activations import ExtractActivationsConfig
    from tracekit.config.features import FeaturesConfig
    from tracekit.config.generate import GenerateConfig
    from tracekit.config.log import LogConfig
    from tracekit.errors import ConfigError
    from tracekit.judge import JudgeJobConfig

    exe = str(Path(sys.executable).parent / "tracekit")
    words = f"tracekit {command} {option} "
    env = {
        **os.environ,
        "_TRACEKIT_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split())),
    }
    done = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == values, done.stderr

    result = cli(*command.split(), option, "fp8", terminal_width=200)
    assert result.exit_code == 2
    assert _lines(result) == [
        f"error: {option} fp8: not one of {', '.join(values)} (see 'tracekit {command} --help')"
    ]

    cls, required = {
        "LogConfig": (LogConfig, {"qa": "q.jsonl", "lmdb": "store"}),
        "GenerateConfig": (GenerateConfig, {"experiment": "e", "traits": "t"}),
        "ExtractActivationsConfig": (ExtractActivationsConfig, {"experiment": "e", "trait": "t"}),
        "FeaturesConfig": (FeaturesConfig, {"sentences": "s.jsonl", "output": "out"}),
        "JudgeJobConfig": (JudgeJobConfig, {"input": "r.csv"}),
    }[config]
    field = option.removeprefix("--").replace("-", "_")
    for value in values:
        resolved = getattr(resolve_config(cls, {**required, field: value}), field)
        assert resolved == value and str(resolved) == value and f"{resolved}" == value
    with pytest.raises(ConfigError, match=option):
        resolve_config(cls, {**required, field: "fp8"})
    annotation = cls.model_fields[field].annotation
    enums = [t for t in (annotation, *get_args(annotation)) if isinstance(t, EnumType)]
    assert [enums[0].__module__, [e.value for e in enums[0]]] == ["tracekit.config.choices", values]


def test_every_model_dtype_name_is_a_torch_dtype():
    """The --dtype set is what loading accepts: each name but auto is a torch dtype."""
    import torch

    from tracekit.config.choices import DtypeName
    from tracekit.models.loading import resolve_dtype

    assert resolve_dtype(DtypeName.auto, "cpu") == torch.float32
    for name in DtypeName:
        if name is not DtypeName.auto:
            assert resolve_dtype(name, "cpu") == getattr(torch, name.value)


def test_a_hub_tokenizer_out_of_reach_is_one_clear_error():
    """``reconstruct --chat`` loads only a tokenizer: a hub id that is neither cached nor
    reachable gives tracekit's one-line model error, not an unexpected ``OSError`` (run
    offline in a fresh interpreter, so nothing waits on the network)."""
    code = (
        "from tracekit.errors import ModelError\n"
        "from tracekit.models.loading import ModelConfig, load_tokenizer_only\n"
        "try:\n"
        "    load_tokenizer_only(ModelConfig(model='nobody/no-such-model'))\n"
        "except ModelError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "cannot load the tokenizer of model 'nobody/no-such-model'" in done.stdout
