"""`tracekit judge` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(
        app,
        "judge",
        "Score responses 0-100 with an LLM judge (OpenAI-compatible API or local model).",
    )
