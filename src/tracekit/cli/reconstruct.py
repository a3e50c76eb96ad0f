"""`tracekit reconstruct` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(
        app,
        "reconstruct",
        "Rebuild an inference JSONL from QA data and an activation store.",
    )
