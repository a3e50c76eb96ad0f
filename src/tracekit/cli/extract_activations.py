"""`tracekit extract activations` and `extract vectors` (placeholders until their issue lands)."""

from __future__ import annotations

import typer

from ._stub import stub_command


def register(app: typer.Typer) -> None:
    stub_command(app, "activations", "Stage 2: teacher-forced activations for saved responses.")
    stub_command(app, "vectors", "Stage 3: per-layer trait vectors (mean difference pos - neg).")
