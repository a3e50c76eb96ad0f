"""``decode``'s configuration; the job is :mod:`tracekit.jobs.decode`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import DecodeFormat


class DecodeConfig(TracekitConfig):
    """Options of ``tracekit decode``."""

    base_dir: Path = Path("experiments")
    model: str | None = None
    limit: Annotated[int, Field(ge=1, description="items rendered per file")] | None = None
    format: DecodeFormat = DecodeFormat.both
    dry_run: bool = False
    force: bool = False
    allow_pickle: bool = False
