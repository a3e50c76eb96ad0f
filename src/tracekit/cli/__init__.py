"""The ``tracekit`` command: assembles the verbs and maps core errors to one line.

Nothing here does real work; each verb lives in its own module and calls one core function.
"""

from __future__ import annotations

import logging
import sys
import typing
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_errors
from typer._coercion import RuntimeParam
from typer.core import TyperOption, _TyperParameter

from tracekit import __version__
from tracekit.console import debug_enabled, err_console

from . import build_dataset, decode, extract, generate, judge, log, reconstruct, report
from ._common import SeedSpellingGroup


def normalize_token(token: str) -> str:
    """Accept the seeds' underscore spellings: ``--batch_size`` == ``--batch-size``."""
    return token.replace("_", "-")


def line(message: str, hint: str | None = None) -> None:
    """The error line (red) and an optional hint line, on stderr."""
    from rich.markup import escape

    from tracekit.errors import redact_keys

    # messages quote paths, shapes and user text: '[...]' in them is text, not rich markup;
    # soft_wrap: one line whatever the width (a terminal wraps it on screen; a log or a grep
    # gets the whole message on the line that starts with "error:")
    message = redact_keys(message)  # a key typed into the wrong option is never echoed
    hint = redact_keys(hint) if hint else hint
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        err_console.print(f"  [dim]hint: {escape(hint)}[/]", highlight=False, soft_wrap=True)


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as one red line (plus a hint line); return the exit code."""
    from pydantic import ValidationError

    from tracekit.config.base import format_validation_error
    from tracekit.errors import TracekitError

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


class _AsParsed(RuntimeParam):
    """Keeps a parsed value as it is (typer would build a pydantic adapter to coerce it)."""

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        return value


def _metavar(param: Any) -> str | None:
    """Click's names for what an option takes (TEXT, INTEGER, [a|b|c], PATH, ...), instead of
    typer's ``<str>``/``<int range>``/``<list[str]>``; None for flags and counts."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    descriptor = param.type_descriptor
    if descriptor.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in descriptor.choices) + "]"
    annotation = descriptor.annotation
    if descriptor.is_list:
        (annotation,) = typing.get_args(annotation) or (str,)
    if descriptor.is_path:
        info = descriptor.parameter_info
        return "DIR" if not info.file_okay else "FILE" if not info.dir_okay else "PATH"
    return {int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}.get(annotation, "TEXT")


def _finish_help(command: Any) -> None:
    """Metavars (see :func:`_metavar`) for the options of ``command`` and those under it."""
    for param in command.params:
        if isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = _metavar(param)
    for sub in getattr(command, "commands", {}).values():
        _finish_help(sub)


def _keep_as_parsed(command: Any, ctx: Any, every_param: bool, group_params: bool) -> None:
    """Help options (all of them: of groups and verbs), with ``group_params`` the options of
    groups too, and with ``every_param`` all parameters, of ``command`` and the commands under
    it keep their parsed values: typer would coerce each through a pydantic adapter, importing
    pydantic."""
    is_group = hasattr(command, "commands")
    own = command.params if every_param or (group_params and is_group) else ()
    for param in [command.get_help_option(ctx), *own]:
        if isinstance(param, _TyperParameter):
            param._runtime_param = _AsParsed(param.type_descriptor.parameter_info, object)
    for sub in getattr(command, "commands", {}).values():
        _keep_as_parsed(sub, ctx, every_param, group_params)


class TracekitGroup(SeedSpellingGroup):
    """Root group: the one place where exceptions become a message and an exit code."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # '--help' must not import pydantic: a help option's value is a flag already, and the
        # root's own options (parsed before a verb's '--help') are flags and a count; a group's
        # options (log's) are parsed before its subcommand's '--help' and go unused then. TAB
        # completion parses (resiliently) values it never uses: all of them stay as parsed.
        asks_help = any(arg in ctx.help_option_names for arg in args)
        _keep_as_parsed(self, ctx, bool(ctx.resilient_parsing), group_params=asks_help)
        _finish_help(self)
        for param in self.params:
            if isinstance(param, _TyperParameter):
                param._runtime_param = _AsParsed(param.type_descriptor.parameter_info, object)
        return super().parse_args(ctx, args)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        """Click's usage errors as one line (see ``_usage``) instead of click's usage panel."""
        expand = windows_expand_args
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, expand, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, prog_name, complete_var, False, expand, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()  # bare 'tracekit': the help, as '--help' prints it
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            from ._usage import usage_message

            line(usage_message(exc, argv, self))
            sys.exit(exc.exit_code)
        except typer.Abort:
            err_console.print("[bold red]aborted[/]")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

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
    rich_markup_mode=None,
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
report.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
