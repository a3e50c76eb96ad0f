"""--help at 80 columns names every option in full, flags without a type; the docs' options
tables are the ones generated from the app (``python -m tracekit.cli._docs``)."""

from pathlib import Path

import pytest

from cli_commands import command_at, every_command
from tracekit.cli import _docs

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("path", every_command(), ids=" ".join)
def test_help_at_80_columns_names_every_option_in_full(cli, path):
    result = cli(*path, "--help", terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert max(len(line) for line in out.splitlines()) <= 80
    for param in command_at(path).params:
        for opt in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())):
            if opt.startswith("-"):
                assert opt in out.split() or f"{opt}," in out.split(), (opt, out)
    assert "…" not in out and "<bool>" not in out and "<str>" not in out


def test_docs_tables_are_current():
    stale = [
        page.name
        for page in sorted(DOCS.glob("*.md"))
        if _docs.render(text := page.read_text(encoding="utf-8")) != text
    ]
    assert stale == [], f"stale options tables in {stale}: run python -m tracekit.cli._docs"


def test_every_command_has_a_docs_table():
    documented = {
        m["command"] for page in DOCS.glob("*.md") for m in _docs.START.finditer(page.read_text())
    }
    # groups without options of their own (the root, extract, report) need no table
    commands = {
        " ".join(["tracekit", *p])
        for p in every_command()
        if p and (command_at(p).params or not hasattr(command_at(p), "commands"))
    }
    assert commands - documented == set()


def test_a_changed_option_makes_the_table_stale():
    page = (DOCS / "decode.md").read_text(encoding="utf-8")
    edited = page.replace("Render only the first N items", "Render the first N items", 1)
    assert edited != page
    assert _docs.render(edited) == page  # regenerating restores the app's help text


MEANS_OTHER_THINGS = {
    "--allow-pickle": "decode loads old generation caches; log stats and reconstruct, stores",
    "--chat": "reconstruct takes the store's model's template when --model is not given",
    "--dtype": "log's is the dtype of the stored activations (--model-dtype is the model's)",
    "--engine": "extract activations runs a teacher-forced forward, not a decode loop",
    "--experiment": "judge only looks --trait up in the experiment; it writes nothing there",
    "--input": "build-dataset reads a folder of NPZ files; judge, one CSV/JSONL table",
    "--judge-model": "in generate it turns judging on; judge has a default model per backend",
    "--layer": "build-dataset's input layer; report steering's steered layer",
    "--method": "extract vectors computes by it; extract projections picks a vectors file by it",
    "--model": "decode filters caches by the model recorded; the others load the model",
    "--output": "a dataset .npz, a folder of sentence files, a judged table or a PNG",
    "--plot": "each command draws its own figure",
    "--pooling": "poolings to capture, the one pooling to read, or the seed file's pooling",
    "--seed": "build-dataset's train/test split; generate's sampling",
    "--threshold": "generate counts neg < T; extract vectors applies --neg-rule",
    "--trait": "generate and judge also take a shipped trait or a trait JSON path",
    "--verbose": "tracekit's counts log levels (-v, -vv); reconstruct's logs its matching",
}
"""Option spellings that mean different things in different commands, and how. Every other
spelling has one help text in every command that takes it (an ``opt.*`` alias of
cli/_options.py), so the same option never reads two ways."""


def test_an_option_spelled_alike_reads_alike_in_every_command():
    helps: dict[str, set[str]] = {}
    for path in every_command():
        for param in command_at(path).params:
            for opt in getattr(param, "opts", ()):  # (a --no- spelling shares its help)
                if opt.startswith("--") and opt != "--help":
                    helps.setdefault(opt, set()).add(param.help or "")
    differing = {opt for opt, texts in helps.items() if len(texts) > 1}
    assert sorted(differing - MEANS_OTHER_THINGS.keys()) == []  # use the opt.* alias
    assert sorted(MEANS_OTHER_THINGS.keys() - differing) == []  # one text now: drop the entry


def test_dtype_help_names_the_values_of_its_enum():
    """The dtype options' help is built from the enums that hold the values (so a value added
    there shows up in the help), and a model's dtype reads alike under both its spellings."""
    from enum import StrEnum

    from tracekit.cli import _options as opt
    from tracekit.config.choices import DtypeName, StoreDtype

    class Two(StrEnum):
        a = "a"
        b = "b"

    class One(StrEnum):
        a = "a"

    assert (opt.one_of(Two), opt.one_of(One)) == ("a or b", "a")
    assert opt.one_of(DtypeName) == "auto, float32, bfloat16 or float16"
    model_dtype = {
        param.help
        for path in every_command()
        for param in command_at(path).params
        if "--model-dtype" in getattr(param, "opts", ())
        or ("--dtype" in getattr(param, "opts", ()) and path != ["log"])
    }
    assert model_dtype == {opt.MODEL_DTYPE_HELP}
    assert opt.one_of(DtypeName) in opt.MODEL_DTYPE_HELP
    (store_dtype,) = [p for p in command_at(["log"]).params if "--dtype" in p.opts]
    assert store_dtype.help == f"dtype of the stored activations: {opt.one_of(StoreDtype)}."
