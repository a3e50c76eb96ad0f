"""`tracekit decode` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(app, "decode", "Decode cached generation .npy files into JSON and Markdown.")
