"""Every command path of the tracekit app, walked from the app itself (so verbs that other
changes add are covered by the tests that use it)."""

from __future__ import annotations

from typing import Any


def command_at(path: list[str]) -> Any:
    """The click command at ``path`` (``["extract", "vectors"]``; ``[]`` is the root)."""
    import typer

    from tracekit.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def every_command() -> list[list[str]]:
    """The root (``[]``) and every command path under it."""
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(command_at([]), [])
    return paths
