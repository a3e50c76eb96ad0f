"""The CLI shell: every verb has help, errors are one line, seed spellings work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracekit import __version__

VERBS = [
    ["generate"],
    ["judge"],
    ["extract"],
    ["extract", "activations"],
    ["extract", "vectors"],
    ["extract", "features"],
    ["extract", "import"],
    ["log"],
    ["reconstruct"],
    ["decode"],
    ["build-dataset"],
]


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_every_verb_has_help(cli, verb):
    result = cli(*verb, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: tracekit " + " ".join(verb) in " ".join(result.output.split())


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"tracekit {__version__}"


def test_underscore_spellings_reach_the_same_command(cli):
    hyphen = cli("build-dataset", "--help")
    underscore = cli("build_dataset", "--help")
    assert underscore.exit_code == 0 and underscore.output == hyphen.output


def test_unknown_command_is_a_usage_error(cli):
    result = cli("no-such-verb")
    assert result.exit_code == 2
    assert "no such command 'no-such-verb'" in result.output


def test_help_and_import_do_not_load_torch():
    code = (
        "import sys; from tracekit.cli import app; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("verb", [[], ["build-dataset"]], ids=["root", "verb"])
def test_output_into_a_pipe_closed_early_ends_quietly(verb):
    """``tracekit ... --help | head``: the reader leaves after the first lines while the help
    is still being written. No traceback and no 'unexpected' error line: click's quiet exit
    (before, a verb's help reported "unexpected BrokenPipeError")."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracekit", *verb, "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(20):  # as `| head -20` reads: the first panel is out, more is to come
        proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) in (0, 1)  # 0 when the help was all written before the close
    assert stderr == ""


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "tracekit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"tracekit {__version__}"


def test_shell_completion_script_and_completions():
    exe = str(Path(sys.executable).parent / "tracekit")
    script = subprocess.run(
        [exe, "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _tracekit_completion tracekit" in script.stdout
    # what the installed script asks for when a user types `tracekit bui<TAB>`
    env = {
        **os.environ,
        "_TRACEKIT_COMPLETE": "complete_bash",
        "COMP_WORDS": "tracekit bui",
        "COMP_CWORD": "1",
    }
    completed = subprocess.run([exe], capture_output=True, text=True, env=env)
    assert completed.stdout.split() == ["build-dataset"]
