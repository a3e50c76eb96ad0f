"""The seeds' boolean spellings (seed 002: ``--extract_activations False|True``) reach click as
its flags, for every boolean option of every command."""

import pytest
import typer

from tracekit.cli import app, normalize_token
from tracekit.cli._common import seed_boolean_args


def _command(*path: str):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--extract_activations", "False"], ["--no-extract-activations"]),
        (["--extract_activations", "True"], ["--extract-activations"]),
        (["--extract_activations=False"], ["--no-extract-activations"]),
        (["--extract-activations=true"], ["--extract-activations"]),
        (["--extract_activations"], ["--extract_activations"]),
        (["--generation_cache", "false"], ["--no-generation-cache"]),
        (["--no-extract-activations", "False"], ["--extract-activations"]),
        (["--force", "True"], ["--force"]),
        (["--force", "False"], []),
        (["--force=0"], []),
        # a value option's value is never taken for a flag's
        (["--experiment", "--force", "--trait", "t"], ["--experiment", "--force", "--trait", "t"]),
        (["--trait", "True", "--pt", "False"], ["--trait", "True", "--no-pt"]),
        (["--", "--force", "True"], ["--", "--force", "True"]),
    ],
)
def test_generate_flags_take_the_seed_spellings(given, expected):
    assert seed_boolean_args(_command("generate"), given, normalize_token) == expected


def test_a_word_that_is_no_boolean_is_left_for_click_to_report(cli):
    result = cli("generate", "--experiment", "e", "--trait", "t", "--extract_activations=maybe")
    assert result.exit_code == 2
    assert "does not take a value" in result.output


def test_nested_commands_take_them_too():
    command = _command("extract", "activations")
    assert seed_boolean_args(command, ["--pt", "True", "--force=False"], normalize_token) == [
        "--pt"
    ]


def test_the_seed_debugging_command_parses(cli, tmp_path):
    """Seed 002's debugging command (trait unknown here, so it stops before any model load):
    the flag and its value parse, and the error is about the trait, not the syntax."""
    result = cli(
        "generate", "--experiment", "test_exp", "--trait", "test_trait", "--batch_size", "1",
        "--n_examples", "5", "--extract_activations", "False",
        "--experiments-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code != 0
    assert "unknown trait 'test_trait'" in " ".join(result.output.split())
    assert "unexpected extra argument" not in result.output.lower()


def test_a_group_leaves_its_subcommands_arguments_alone():
    log = _command("log")
    args = ["stats", "--allow_pickle", "True", "--json"]
    assert seed_boolean_args(log, args, normalize_token) == args  # for 'stats' to rewrite
    stats = log.commands["stats"]  # type: ignore[attr-defined]
    assert seed_boolean_args(stats, args[1:], normalize_token) == ["--allow-pickle", "--json"]
