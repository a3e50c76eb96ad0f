"""The ``decode`` job: render every cached generation ``.npy`` under a tree as JSON / Markdown.

Finds ``*_completions.npy`` and ``*_full_texts.npy`` under ``base_dir`` (optionally only under
``base_dir/<model>``), reads each (an old cache's pickle through the restricted unpickler
unless pickle is allowed), and writes ``<same name>.json`` and/or ``.md`` in seed 001's shape
next to it. A file's renderings are built in memory before anything is written, and each is
written atomically, so a bad input leaves no partial output. A file that cannot be decoded is
reported and the job goes on with the others; the result says which failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tracekit.config.decode import DecodeConfig
from tracekit.errors import InputError, TracekitError
from tracekit.storage.atomic import write_text
from tracekit.storage.generation_cache import (
    KINDS,
    CacheFiles,
    Kind,
    check_same_length,
    kind_of,
    read_metadata,
    read_text_array,
    render,
)

logger = logging.getLogger(__name__)


Status = Literal["decoded", "skipped", "would-decode", "failed"]


@dataclass(frozen=True)
class DecodedFile:
    """What happened to one cache ``.npy`` file."""

    source: Path
    status: Status
    outputs: tuple[Path, ...] = ()
    items: int = 0
    total: int = 0
    error: str | None = None
    note: str | None = None
    """What the renderings could not say (a cache without metadata: model and time)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "source": str(self.source),
            "status": self.status,
            "outputs": [str(p) for p in self.outputs],
            "items": self.items,
            "total": self.total,
            "error": self.error,
            "note": self.note,
        }


@dataclass
class DecodeResult:
    """Per-file outcomes of a ``decode`` run, in the order the files were found."""

    files: list[DecodedFile] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def decoded(self) -> int:
        return self.count("decoded") + self.count("would-decode")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def total(self) -> int:
        return len(self.files)

    def summary(self) -> dict[str, int]:
        return {
            "decoded": self.decoded,
            "skipped": self.skipped,
            "failed": self.failed,
            "total": self.total,
        }


def _cache_model(source: Path) -> str | None:
    """The ``model`` a cache's metadata names (None without readable metadata)."""
    try:
        metadata = read_metadata(CacheFiles.of(source), missing_ok=True)
    except TracekitError:
        return None
    model = (metadata or {}).get("model")
    return str(model) if model else None


def _names_model(source: Path, base_dir: Path, model: str) -> bool:
    """Whether ``source`` is a cache of ``model``: the seed's layout names the model as the
    first folder under the base dir; tracekit's (``EXP/TRAIT/generations``) records it in
    the metadata, as a hub id or folder (``HuggingFaceTB/SmolLM2-135M-Instruct``) whose last
    part also matches."""
    if source.relative_to(base_dir).parts[0] == model:
        return True
    recorded = _cache_model(source)
    return recorded is not None and model in (recorded, recorded.rstrip("/").rsplit("/", 1)[-1])


def _experiments_dirs_near() -> list[str]:
    """Folders named ``experiments`` one level below the working folder (``demo/experiments``
    after ``make demo``): where a base dir that is not found may be."""
    return sorted(str(p) for p in Path().glob("*/experiments") if p.is_dir())


def find_cache_files(base_dir: Path, model: str | None = None) -> list[Path]:
    """Every cached ``*_completions.npy`` / ``*_full_texts.npy`` under ``base_dir``, sorted.

    ``model`` keeps the caches of that model (see :func:`_names_model`).
    """
    if not base_dir.is_dir():
        near = _experiments_dirs_near()
        raise InputError(
            f"base directory not found: {base_dir}",
            f"pass --base-dir {near[0]} (found here)"
            if near
            else "pass --base-dir: the --experiments-dir that 'tracekit generate' wrote to",
        )
    every = sorted(
        path
        for kind in KINDS
        for path in base_dir.rglob(f"*_{kind}.npy")
        if path.is_file() and not path.name.startswith(".tmp-")
    )
    found = [p for p in every if model is None or _names_model(p, base_dir, model)]
    if not found:
        where = f"{base_dir}" if model is None else f"{base_dir} for model '{model}'"
        models = sorted({m for m in map(_cache_model, every) if m})
        hint = (
            f"models of the caches there: {', '.join(models)}"
            if models
            else "generate first (tracekit generate writes EXP/TRAIT/generations), or point "
            "--base-dir at the --experiments-dir it wrote to"
        )
        raise InputError(
            f"no cached generations (*_completions.npy, *_full_texts.npy) under {where}", hint
        )
    return found


def decode_file(source: Path, config: DecodeConfig) -> DecodedFile:
    """Render one cache ``.npy`` file; raises a :class:`TracekitError` when it cannot."""
    kind = kind_of(source)
    files = CacheFiles.of(source)
    targets = [files.rendered(kind, ext) for ext in config.format.extensions]
    todo = targets if config.force else [p for p in targets if not p.exists()]
    if not todo:
        note = None
        if config.limit is not None:  # say that --limit was not applied, and how to apply it
            note = f"--force to rewrite them with the first {config.limit} items"
        return DecodedFile(source, "skipped", tuple(targets), note=note)
    # caches older than their metadata file (the seed's decode did not need one) are rendered
    # with the model and generation time shown as unknown
    metadata = read_metadata(files, missing_ok=True)
    note = None if metadata is not None else f"no {files.metadata.name}: model and time unknown"
    items, total = read_text_array(source, limit=config.limit, allow_pickle=config.allow_pickle)
    other: Kind = "full_texts" if kind == "completions" else "completions"
    try:  # the other file of the pair: unreadable, it fails on its own, and this one decodes
        _, other_total = read_text_array(
            files.npy(other), limit=0, allow_pickle=config.allow_pickle
        )
    except TracekitError:
        other_total = total
    lengths = {kind: total, other: other_total}
    check_same_length(files, lengths["full_texts"], lengths["completions"])
    # render everything before writing anything: a failure leaves no partial output
    rendered = {path: render(kind, path.suffix[1:], items, metadata, total) for path in todo}
    status: Status = "would-decode" if config.dry_run else "decoded"
    if not config.dry_run:
        for path, text in rendered.items():
            write_text(path, text)
        logger.debug("decoded %d of %d items of %s", len(items), total, source)
    return DecodedFile(source, status, tuple(todo), len(items), total, note=note)


def decode(
    config: DecodeConfig | None = None,
    *,
    on_file: Callable[[DecodedFile], None] | None = None,
) -> DecodeResult:
    """Decode every cache under ``config.base_dir`` (see the module docstring).

    ``on_file`` is called after each file (for progress output). Raises :class:`InputError`
    when there is nothing to decode; per-file problems are recorded as ``failed``.
    """
    config = config or DecodeConfig()
    sources = find_cache_files(config.base_dir, config.model)
    result = DecodeResult()
    for source in sources:
        try:
            outcome = decode_file(source, config)
        except TracekitError as exc:
            outcome = DecodedFile(source, "failed", error=str(exc))
            logger.debug("cannot decode %s: %s", source, exc)
        result.files.append(outcome)
        if on_file is not None:
            on_file(outcome)
    return result
