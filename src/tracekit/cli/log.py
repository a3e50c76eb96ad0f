"""`tracekit log` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(
        app,
        "log",
        "Log activations to an LMDB store (keyed by prompt hash) while generating.",
    )
