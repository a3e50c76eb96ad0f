"""`tracekit extract`: a group of stage-2/3 commands, each defined in its own module."""

from __future__ import annotations

import typer

from . import extract_activations, extract_features, extract_import, extract_projections
from ._common import SeedSpellingGroup


def register(app: typer.Typer) -> None:
    extract_app = typer.Typer(
        cls=SeedSpellingGroup,
        help="Activations for saved responses, trait vectors and projections on them, "
        "sentence feature files, and the seeds' activations imported.",
        no_args_is_help=True,
    )
    extract_activations.register(extract_app)
    extract_features.register(extract_app)
    extract_projections.register(extract_app)
    extract_import.register(extract_app)
    app.add_typer(extract_app, name="extract")
