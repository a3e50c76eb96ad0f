"""The options tables of ``docs/*.md``, generated from the Typer app (as ``hf``'s CLI reference
is), so the pages cannot drift from ``--help``.

A page holds one table per command between markers::

    <!-- options: tracekit extract activations -->
    | option | takes | default | meaning |
    ...
    <!-- /options -->

``python -m tracekit.cli._docs`` rewrites every table between such markers in ``docs/*.md``;
``--check`` only reports the stale ones (exit 1), as the test suite does. Run it after adding
or changing an option.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from typer._click.core import Context
from typer.core import TyperArgument, TyperOption

START = re.compile(r"<!-- options: (?P<command>tracekit[\w\- ]*?) -->\n")
END = "<!-- /options -->"


def _command(path: list[str]) -> tuple[Any, Context]:
    """The click command at ``path`` (``["extract", "vectors"]``) and a context for it."""
    import typer

    from tracekit.cli import app

    from . import _finish_help

    command: Any = typer.main.get_command(app)
    ctx = Context(command, info_name="tracekit")
    _finish_help(command)  # the metavars --help shows
    for name in path:
        command = command.commands[name]
        ctx = Context(command, info_name=name, parent=ctx)
    return command, ctx


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _names(param: Any) -> str:
    if isinstance(param, TyperArgument):
        return f"`{(param.name or '').upper()}` (argument)"
    names = ", ".join(f"`{opt}`" for opt in param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(f"`{opt}`" for opt in param.secondary_opts)
    return names


def _takes(param: Any) -> str:
    from ._usage import valid_values

    if isinstance(param, TyperOption) and (param.is_flag or param.count):
        return "repeatable flag" if param.count else "flag"
    described = valid_values(param)
    if described:
        return _cell(described)
    return f"`{param.metavar}`" if param.metavar else ""


def _default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if isinstance(param, TyperOption) and param.is_flag:
        if param.secondary_opts:
            return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
        return ""
    if default is None or default == [] or (isinstance(param, TyperOption) and param.count):
        return ""
    return f"`{getattr(default, 'value', default)}`"


def options_table(command_line: str) -> str:
    """The markdown table of every option of ``command_line`` (``"tracekit decode"``)."""
    command, ctx = _command(command_line.split()[1:])
    rows = ["| option | takes | default | meaning |", "|---|---|---|---|"]
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        meaning = _cell(getattr(param, "help", None) or "")
        rows.append(f"| {_names(param)} | {_takes(param)} | {_default(param)} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """``text`` with every marked table regenerated."""
    out, position = [], 0
    for match in START.finditer(text):
        end = text.index(END, match.end())
        out += [text[position : match.end()], options_table(match["command"])]
        position = end
    out.append(text[position:])
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the options tables in docs/*.md.")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="the docs folder")
    parser.add_argument("--check", action="store_true", help="report stale tables; write none")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted(args.docs.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    verb = "stale" if args.check else "rewritten"
    for page in stale:
        sys.stdout.write(f"{verb}: {page}\n")
    if args.check and stale:
        sys.stderr.write("run: python -m tracekit.cli._docs\n")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
