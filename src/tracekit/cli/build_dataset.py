"""`tracekit build-dataset` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(
        app,
        "build-dataset",
        "Build classifier datasets (X, y, metadata) from sentence feature NPZ files.",
    )
