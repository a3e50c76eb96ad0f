"""Click's usage errors as tracekit's one line: what is wrong, the valid values, what to do.

Click reports a bad option value, a typo, a missing option or an unknown command as a usage
panel and a boxed message, missing options one at a time. :func:`usage_message` turns each
into one sentence in the same shape as tracekit's other errors (``--option: problem``), with
the values the option accepts, a "did you mean" for near misses and the help command to run;
all missing options of a command are named at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from typer._click import exceptions as click_errors
from typer._click.core import Context, Parameter
from typer.core import TyperArgument, TyperGroup, TyperOption


def _command_path(ctx: Context | None) -> str:
    return ctx.command_path if ctx is not None else "tracekit"


def _see_help(ctx: Context | None) -> str:
    return f"see '{_command_path(ctx)} --help'"


def _option_label(param: Parameter) -> str:
    if isinstance(param, TyperOption):
        longs = [opt for opt in param.opts if opt.startswith("--")]
        return (longs or param.opts)[0]
    return (param.name or "argument").upper()


def _close(word: str, candidates: Sequence[str]) -> list[str]:
    """Near misses of ``word``: candidates it starts (``gen`` -> ``generate``), then difflib's."""
    starts = [c for c in candidates if c.startswith(word)] if word else []
    return starts or difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)


def _choices(param: Parameter) -> list[str] | None:
    descriptor = getattr(param, "type_descriptor", None)
    choices = getattr(descriptor, "choices", None)
    if not choices:
        return None
    return [str(getattr(choice, "value", choice)) for choice in choices]


def valid_values(param: Parameter) -> str | None:
    """What ``param`` accepts, in words ("an integer >= 1", "one of json, md, both")."""
    choices = _choices(param)
    if choices:
        return "one of " + ", ".join(choices)
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if isinstance(param, TyperOption) and param.is_flag:
        return None
    if annotation is int:
        kind = "an integer"
    elif annotation is float:
        kind = "a number"
    else:
        return None
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} >= {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind


def _given_value(param: Parameter, args: Sequence[str]) -> str | None:
    """The text the user typed for ``param`` (last occurrence wins, as click does)."""
    names = set(getattr(param, "opts", ())) | set(getattr(param, "secondary_opts", ()))
    value = None
    for i, token in enumerate(args):
        name, eq, rest = token.partition("=")
        name = name.replace("_", "-")
        if name in names:
            if eq:
                value = rest
            elif i + 1 < len(args):
                value = args[i + 1]
    return value


def _bad_parameter(exc: click_errors.BadParameter, args: Sequence[str]) -> str:
    param = exc.param
    if param is None:
        return f"invalid value: {exc.message}; {_see_help(exc.ctx)}"
    label = _option_label(param)
    given = _given_value(param, args)
    shown = f"{label} {given}" if given is not None else label
    choices = _choices(param)
    if choices and given is not None:
        matches = _close(given, choices)
        guess = f"; did you mean {matches[0]}?" if matches else ""
        return f"{shown}: not one of {', '.join(choices)}{guess} ({_see_help(exc.ctx)})"
    accepted = valid_values(param)
    if accepted:
        return f"{shown}: must be {accepted} ({_see_help(exc.ctx)})"
    reason = exc.message.removeprefix("Value error, ").rstrip(".")
    return f"{shown}: {reason[:1].lower()}{reason[1:]} ({_see_help(exc.ctx)})"


def missing_params(ctx: Context | None, args: Sequence[str]) -> list[Parameter]:
    """Every required parameter of ``ctx``'s command that ``args`` does not give."""
    if ctx is None:
        return []
    given = {token.partition("=")[0].replace("_", "-") for token in args}
    positional = [token for token in args if not token.startswith("-")]
    missing: list[Parameter] = []
    n_arguments = 0
    for param in ctx.command.get_params(ctx):
        if not param.required:
            continue
        if isinstance(param, TyperArgument):
            n_arguments += 1
            if len(positional) < n_arguments:
                missing.append(param)
        elif not (set(param.opts) | set(param.secondary_opts)) & given:
            missing.append(param)
    return missing


def _missing(exc: click_errors.MissingParameter, args: Sequence[str]) -> str:
    missing = missing_params(exc.ctx, args) or ([exc.param] if exc.param else [])
    labels = [_option_label(p) for p in missing]
    noun = "argument" if all(isinstance(p, TyperArgument) for p in missing) else "option"
    plural = "s" if len(labels) > 1 else ""
    return f"missing {noun}{plural} {', '.join(labels)} ({_see_help(exc.ctx)})"


def _no_such_option(exc: click_errors.NoSuchOption) -> str:
    name = exc.option_name
    candidates: list[str] = []
    if exc.ctx is not None:
        for param in exc.ctx.command.get_params(exc.ctx):
            candidates += [o for o in (*param.opts, *param.secondary_opts) if o.startswith("-")]
    matches = list(exc.possibilities or ()) or _close(name, candidates)
    guess = f"; did you mean {' or '.join(sorted(matches)[:3])}?" if matches else ""
    return f"no such option {name}{guess} ({_see_help(exc.ctx)} for the options)"


def _no_such_command(exc: click_errors.UsageError) -> str | None:
    ctx = exc.ctx
    if ctx is None or not isinstance(ctx.command, TyperGroup):
        return None
    names = sorted(ctx.command.list_commands(ctx))
    message = exc.message
    if not message.startswith("No such command"):
        return None
    typed = message.split("'")[1] if message.count("'") >= 2 else ""
    matches = _close(typed, names)
    guess = f"; did you mean {' or '.join(matches)}?" if matches else ""
    return f"no such command '{typed}'{guess} (commands: {', '.join(names)})"


def usage_message(exc: click_errors.ClickException, args: Sequence[str], root: TyperGroup) -> str:
    """One line for click exception ``exc`` raised while ``root`` parsed ``args``."""
    if isinstance(exc, click_errors.MissingParameter):
        return _missing(exc, args)
    if isinstance(exc, click_errors.BadParameter):
        return _bad_parameter(exc, args)
    if isinstance(exc, click_errors.NoSuchOption):
        return _no_such_option(exc)
    if isinstance(exc, click_errors.BadOptionUsage) and "requires an argument" in exc.message:
        path, command = _command_in(root, args)
        param = _param_named(command, exc.option_name)
        accepted = valid_values(param) if param is not None else None
        what = f": {accepted}" if accepted else ""
        return f"{exc.option_name} needs a value{what} (see '{path} --help')"
    if isinstance(exc, click_errors.UsageError):
        line = _no_such_command(exc)
        if line is not None:
            return line
        text = exc.format_message().rstrip(".")
        return f"{text[:1].lower()}{text[1:]} ({_see_help(exc.ctx)})"
    return exc.format_message()


def _command_in(root: TyperGroup, args: Sequence[str]) -> tuple[str, Any]:
    """The (sub)command that ``args`` names, and its command path."""
    path, command = root.name or "tracekit", root
    for token in args:
        sub = getattr(command, "commands", {}).get(token)
        if sub is None:
            break
        path, command = f"{path} {token}", sub
    return path, command


def _param_named(command: Any, option: str) -> Parameter | None:
    for param in command.params:
        if option in (*param.opts, *param.secondary_opts):
            return param
    return None


def with_valid_values(message: str, command: Any, given_as: Mapping[str, str] | None = None) -> str:
    """``missing options --strategy, --input`` -> ``missing options --strategy (one of
    embedding-to-feature, ...), --input``: a missing option that takes one of a few values
    names them. ``given_as`` names the options that give a config field whose option has
    another name (generate's ``traits`` field: ``--trait`` or ``--traits``)."""
    head, sep, rest = message.partition("; ")
    prefix = next((p for p in ("missing options ", "missing option ") if head.startswith(p)), "")
    if not prefix:
        return message
    names = []
    for name in head.removeprefix(prefix).split(", "):
        if given_as and name in given_as:
            names.append(given_as[name])
            continue
        param = _param_named(command, name)
        choices = _choices(param) if param is not None else None
        names.append(f"{name} (one of {', '.join(choices)})" if choices else name)
    return prefix + ", ".join(names) + sep + rest
