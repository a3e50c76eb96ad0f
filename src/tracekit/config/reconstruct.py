"""``reconstruct``'s configuration; the job is :mod:`tracekit.jobs.reconstruct`."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from tracekit.actlog.prompts import (
    check_template,
)
from tracekit.config import TracekitConfig


class ReconstructConfig(TracekitConfig):
    """Options of ``tracekit reconstruct`` (the seed's flag names)."""

    qa_output_path: Path
    lmdb_path: Path
    output_path: Path
    prompt_template: str | None = None
    """None: the template recorded in the store (``log`` wrote it), else the seed's default."""
    chat: bool = False
    """Format with the chat template of ``model`` (default: the model recorded in the store)."""
    model: str | None = None
    question_field: str = "prompt"
    skip_bad_lines: bool = False
    force: bool = False
    verbose: bool = False
    allow_pickle: bool = False
    """Read a seed store's pickled values with :mod:`pickle` itself (runs code from the store)
    instead of the restricted unpickler."""

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)
