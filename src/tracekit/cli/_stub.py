"""Placeholder commands for verbs whose issues have not landed yet (exit 2, clear message)."""

from __future__ import annotations

import typer

from tracekit.errors import NotImplementedYetError

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def stub_command(app: typer.Typer, name: str, help_text: str) -> None:
    """Register ``name`` on ``app``: ``--help`` works, running it says it is not built yet."""

    def command(ctx: typer.Context) -> None:
        raise NotImplementedYetError(
            f"'tracekit {ctx.command_path.split(' ', 1)[-1]}' is not implemented yet",
            "see the CHANGELOG for what is available",
        )

    command.__doc__ = help_text
    app.command(name, context_settings=_PASS_THROUGH, help=help_text)(command)
