"""Shared CLI plumbing: building configs from the click context, and the steps of a command.

``build_config`` is the single place where CLI > config file > defaults is applied: only
options the user actually typed (click's parameter source) override the file; parser defaults
never do. The steps every command body takes (results as JSON or tables, data-parallel
launches, progress bars) are here too; the shared options are in :mod:`._options`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:  # pydantic is imported only when a command runs, never for --help / TAB
    from tracekit.config.base import TracekitConfig

ConfigT = TypeVar("ConfigT", bound="TracekitConfig")
ResultT = TypeVar("ResultT")

# names of click's ParameterSource members that mean "the user gave it"
_EXPLICIT = frozenset({"COMMANDLINE", "ENVIRONMENT", "PROMPT"})


def explicit_params(ctx: typer.Context) -> dict[str, Any]:
    """The parameters of ``ctx`` that the user gave (command line or environment)."""
    return {
        name: value
        for name, value in ctx.params.items()
        if getattr(ctx.get_parameter_source(name), "name", None) in _EXPLICIT
    }


FOLDER_CONFIG = Path("tracekit.toml")
"""Read, when no ``--config`` is given, by commands run in the folder that holds it (the demo
writes one): its ``[command]`` table supplies options the command line does not give."""


def _folder_config(section: str | None) -> Path | None:
    """``./tracekit.toml`` when it has a table for ``section`` (said on stderr), else None."""
    if section is None or not FOLDER_CONFIG.is_file():
        return None
    from tracekit.config.base import read_config_file
    from tracekit.console import err_console

    tables = read_config_file(FOLDER_CONFIG)
    if not any(isinstance(tables.get(k), dict) for k in {section, section.replace("-", "_")}):
        return None
    if is_main_process():
        err_console.print(f"options from ./{FOLDER_CONFIG} [{section}]", style="dim", markup=False)
    return FOLDER_CONFIG


def build_config(
    ctx: typer.Context,
    cls: type[ConfigT],
    section: str | None = None,
    *,
    given_as: Mapping[str, str] | None = None,
    **derived: Any,
) -> ConfigT:
    """Config ``cls`` from explicit CLI options > ``--config`` file > ``cls`` defaults.

    ``derived`` holds values the command computed from explicit options (e.g. a parsed pair);
    they count as CLI values. The file section defaults to the command's name. ``given_as``
    names the options of a derived field in a missing-option message (``{"--traits":
    "--trait (or --traits for several)"}``).
    """
    from tracekit.config.base import resolve_config
    from tracekit.errors import ConfigError

    values = explicit_params(ctx)
    values.update(derived)
    config_file = ctx.params.get("config") or _folder_config(section or ctx.info_name)
    try:
        return resolve_config(cls, values, config_file, section or ctx.info_name)
    except ConfigError as exc:
        if exc.hint is not None:
            raise
        from ._usage import with_valid_values

        # the same line as click's usage errors: what is wrong, then where the options are
        message = with_valid_values(exc.message, ctx.command, given_as)
        raise ConfigError(f"{message} (see '{ctx.command_path} --help')") from None


# --- the steps of a command body ----------------------------------------------------------
def show_result(
    result: ResultT,
    json_output: bool,
    render: Callable[[ResultT], None],
    payload: Mapping[str, Any] | None = None,
) -> None:
    """``result`` as JSON on stdout with ``--json`` (``payload``, by default its ``to_dict()``),
    else as ``render`` shows it (tables)."""
    if not json_output:
        render(result)
        return
    import json

    from tracekit.console import out_console

    data = payload if payload is not None else cast(Any, result).to_dict()
    out_console.print_json(json.dumps(data))


class TaskBar:
    """One bar of a rich progress display, fed by a core function's progress hook."""

    def __init__(self, progress: Any, description: str, unit: str) -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=None, unit=unit)

    def completed(self, done: int, total: int) -> None:
        """A hook that reports how many are done so far."""
        self._progress.update(self._task, completed=done, total=total)

    def advance(self, count: int, total: int) -> None:
        """A hook that reports how many more are done."""
        self._progress.update(self._task, advance=count, total=total)


@contextmanager
def task_progress(description: str, unit: str, transient: bool = False) -> Iterator[TaskBar]:
    """A progress bar on stderr for one task, counted in ``unit``."""
    from tracekit.console import progress_bar

    with progress_bar(transient=transient) as progress:
        yield TaskBar(progress, description, unit)


# --- data-parallel runs and progress -----------------------------------------------------
def is_main_process() -> bool:
    """False in the non-main processes of a data-parallel run (they print nothing)."""
    from tracekit.distributed import process_info

    return process_info().is_main


def launch_processes(
    command: list[str], config: TracekitConfig, num_processes: int, json_output: bool
) -> None:
    """With ``--num-processes`` N > 1: run ``command`` as N data-parallel processes (the
    config file that :func:`tracekit.distributed.launch` writes carries every option) and exit
    with their status; with 1, nothing (the command runs here)."""
    if num_processes <= 1:
        return
    from tracekit.distributed import launch

    raise typer.Exit(launch(command, config, num_processes, ["--json"] if json_output else []))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


LONG_ON_CPU_TOKENS = 10_000
"""A job of more new tokens than this on a CPU is announced as long before it starts."""


def note_long_cpu_job(device: str, rows: int, max_new_tokens: int) -> None:
    """Say, before its first batch, when a generation job of ``rows`` responses is large for
    a CPU."""
    if device not in ("auto", "cpu"):
        return
    tokens = rows * max_new_tokens
    if tokens <= LONG_ON_CPU_TOKENS or not is_main_process():
        return
    import torch

    if device == "auto" and torch.cuda.is_available():
        return
    from tracekit.console import err_console

    err_console.print(
        f"[yellow]note:[/] on CPU: {rows:,} responses of up to {max_new_tokens} new tokens "
        f"({tokens:,} tokens at most) can take an hour or more (hours with a large model); "
        "--n-examples 10 --max-new-tokens 32 gives a first look in minutes",
        highlight=False,
        soft_wrap=True,
    )


@contextmanager
def batch_progress(
    max_new_tokens: int | None = None, device: str | None = None
) -> Iterator[tuple[Callable[[int], None], Callable[[int, int], None]]]:
    """Rows and tokens/s bars on stderr, fed by the core's ``on_total``/``on_batch`` hooks.

    When the job's size is known (``on_total``, after every check, before the first batch) a
    line says it, with :func:`note_long_cpu_job`'s warning for a generation job on ``device``;
    after the first batch a line gives its speed and an estimate of the time left, so a slow
    job does not look hung behind a bar at 0. A later ``on_total`` (the size changed mid-run)
    moves the bar's total and keeps its timing: the rate and time left go on from the rows
    done so far (rich's ``update(total=...)`` would forget them).
    """
    import time

    from tracekit.console import progress_bar

    if not is_main_process():  # one set of bars per data-parallel run: the main process's
        yield (lambda total: None), (lambda n_rows, n_tokens: None)
        return
    with progress_bar() as progress:
        rows = progress.add_task("rows", total=None, unit="rows")
        tokens = progress.add_task("new tokens", total=None, unit="tok")
        state = {"total": 0, "done": 0, "started": 0.0}

        def say(text: str) -> None:
            progress.console.print(text, highlight=False, soft_wrap=True)

        def on_total(total: int) -> None:
            if state["started"]:  # a new size mid-run: same timer, same speed samples
                task = next(task for task in progress.tasks if task.id == rows)
                task.total = total
                if task.completed < total:  # not finished after all: the clock runs on
                    task.finished_time = task.finished_speed = None
                progress.refresh()
                say(f"{total:,} rows to run in all now (was {state['total']:,})")
                state["total"] = total
                return
            if device is not None and max_new_tokens is not None:
                note_long_cpu_job(device, total, max_new_tokens)
            progress.update(rows, total=total)
            state.update(total=total, started=time.perf_counter())
            each = f" of up to {max_new_tokens} new tokens" if max_new_tokens else ""
            say(f"{total:,} rows to run{each}; the first batch sets the estimate")

        def on_batch(n_rows: int, n_tokens: int) -> None:
            progress.advance(rows, n_rows)
            progress.advance(tokens, n_tokens)
            first = state["done"] == 0
            state["done"] += n_rows
            if first and state["started"] and state["done"] < state["total"]:
                seconds = time.perf_counter() - state["started"]
                left = state["total"] - state["done"]
                estimate = seconds / n_rows * left if n_rows else 0.0
                say(
                    f"first batch: {n_rows} rows, {n_tokens:,} new tokens in {seconds:.1f} s "
                    f"({n_tokens / max(seconds, 1e-9):,.1f} tok/s); about "
                    f"{_duration(estimate)} for the {left:,} rows left"
                )

        yield on_total, on_batch


# --- the seeds' boolean spellings -----------------------------------------------------------
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_SPACED_WORDS = frozenset({"true", "false"})
"""Words taken as a flag's value when they follow it as a separate argument (the seeds'
``--extract_activations False``); after ``=`` all of ``_TRUE_WORDS``/``_FALSE_WORDS`` count."""


def seed_boolean_args(
    command: Any, args: list[str], normalize: Callable[[str], str] | None = None
) -> list[str]:
    """``args`` for ``command`` with the seeds' boolean spellings turned into click's flags.

    ``--extract_activations False`` and ``--extract-activations=false`` become
    ``--no-extract-activations``; ``... True`` becomes ``--extract-activations``. An on-only
    flag given False (``--force False``) is dropped: the default (or the config file's value)
    stands. Values of options that take one are skipped, and nothing after ``--`` (or, for a
    group, after its subcommand's name) is touched.
    """
    norm = normalize or (lambda token: token)
    flags: dict[str, tuple[str, str | None]] = {}  # spelling -> (on, off)
    takes_value: set[str] = set()
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", None) != "option":  # (typer vendors click)
            continue
        if param.is_bool_flag and param.opts:
            on, off = param.opts[0], (param.secondary_opts or [None])[0]
            flags.update(dict.fromkeys(param.opts, (on, off)))
            if off is not None:
                flags.update(dict.fromkeys(param.secondary_opts, (off, on)))
        elif not param.is_flag and not param.count:
            takes_value.update(param.opts)
    is_group = hasattr(command, "commands")
    out: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--" or (is_group and not token.startswith("-")):
            out += args[index - 1 :]  # (a group's subcommand parses the rest itself)
            break
        name, eq, value = token.partition("=")
        name = norm(name) if name.startswith("--") else name
        if name in takes_value and not eq:
            out.append(token)
            if index < len(args):
                out.append(args[index])
                index += 1
            continue
        if name not in flags:
            out.append(token)
            continue
        on, off = flags[name]
        if not eq and index < len(args) and args[index].lower() in _SPACED_WORDS:
            value, eq = args[index], "="
            index += 1
        if not eq:
            out.append(token)
        elif value.lower() in _TRUE_WORDS:
            out.append(on)
        elif value.lower() in _FALSE_WORDS:
            if off is not None:
                out.append(off)
        else:
            out.append(token)  # click reports the value it does not take
    return out


class SeedSpellingGroup(TyperGroup):
    """A command group whose commands take the seeds' boolean spellings
    (:func:`seed_boolean_args`)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            rest = seed_boolean_args(command, rest, ctx.token_normalize_func)
        return name, command, rest
