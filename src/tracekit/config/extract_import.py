"""``extract import``'s configuration; the job is :mod:`tracekit.jobs.extract_import`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tracekit.config.base import TracekitConfig
from tracekit.config.types import FolderName


class ImportActivationsConfig(TracekitConfig):
    """Options of ``tracekit extract import``."""

    experiment: FolderName
    trait: FolderName
    experiments_dir: Path = Path("experiments")
    pooling: Literal["response_avg", "prompt_last", "prompt_avg"] = "response_avg"
    """The pooling the seed's rows were made with (the files are named after it)."""
    first_layer: int = Field(default=0, ge=0)
    """Layer number of the file's first entry (0: HF ``output_hidden_states``; 1: block
    outputs only)."""
    force: bool = False
