"""The ``tracekit`` command: assembles the verbs and maps core errors to one line.

Nothing here does real work; each verb lives in its own module and calls one core function.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from tracekit import __version__
from tracekit.console import debug_enabled, err_console

from . import build_dataset, decode, extract, generate, judge, log, reconstruct
from ._common import SeedSpellingGroup


def normalize_token(token: str) -> str:
    """Accept the seeds' underscore spellings: ``--batch_size`` == ``--batch-size``."""
    return token.replace("_", "-")


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as one red line (plus a hint line); return the exit code."""
    from pydantic import ValidationError
    from rich.markup import escape

    from tracekit.config.base import format_validation_error
    from tracekit.errors import TracekitError

    # messages quote paths, shapes and user text: '[...]' in them is text, not rich markup;
    # soft_wrap: one line whatever the width (a terminal wraps it on screen; a log or a grep
    # gets the whole message on the line that starts with "error:")
    def line(message: str, hint: str | None = None) -> None:
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        if hint:
            err_console.print(f"  [dim]hint: {escape(hint)}[/]", highlight=False, soft_wrap=True)

    if isinstance(exc, TracekitError):
        line(exc.message, exc.hint)
        return exc.exit_code
    if isinstance(exc, ValidationError):
        line(format_validation_error(exc))
        return 2
    if isinstance(exc, KeyboardInterrupt):
        err_console.print(
            "[bold red]interrupted[/] (finished work is kept; rerun to resume)", soft_wrap=True
        )
        return 130
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line(f"unexpected {type(exc).__name__}: {message}", "set TRACEKIT_DEBUG=1 to see the traceback")
    return 1


class TracekitGroup(SeedSpellingGroup):
    """Root group: the one place where exceptions become a message and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except BrokenPipeError:
            # the reader went away (``tracekit ... --help | head``): click's own handling
            # silences the streams and exits 1, as it does for the root's help
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if debug_enabled():
                raise
            ctx.exit(report_error(exc))


app = typer.Typer(
    name="tracekit",
    cls=TracekitGroup,
    help="Turn a Hugging Face causal LM into interpretability data: trait generations, "
    "judge scores, activations, trait vectors, activation logs and classifier datasets.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={
        "token_normalize_func": normalize_token,
        "help_option_names": ["-h", "--help"],
    },
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tracekit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show the version and exit.",
            is_eager=True,
            callback=_version_callback,
        ),
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")
    ] = 0,
) -> None:
    """tracekit: interpretability data from causal language models."""
    from rich.logging import RichHandler

    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1 or debug_enabled():
        level = logging.DEBUG
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("tracekit").setLevel(level)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


generate.register(app)
judge.register(app)
extract.register(app)
log.register(app)
reconstruct.register(app)
decode.register(app)
build_dataset.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
