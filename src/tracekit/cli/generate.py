"""`tracekit generate` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(
        app,
        "generate",
        "Generate positive/negative trait responses with activation capture.",
    )
