"""The ``tracekit reconstruct`` job: QA JSONL + activation store -> inference JSONL (seed 003).

Each raw question is formatted exactly as ``log`` formatted it (plain template or chat
template), hashed (SHA-256), and matched against the store's keys. Only metadata and the
activations *headers* are read. Output rows are the QA row plus ``generation``, ``model``,
``input_length``, ``timestamp``, ``messages`` and ``trim_position``; QA rows whose entry is
missing, has no activations, or is corrupt are left out, as the seed does. A corrupt entry is
counted and skipped, never fatal. With zero matches nothing is written, and the result carries
the first formatted QA prompt next to the closest stored prompt (the usual cause: another
template).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracekit.actlog.prompts import (
    DEFAULT_TEMPLATE,
    format_prompt,
    read_qa_jsonl,
    render_chat,
)
from tracekit.config.reconstruct import ReconstructConfig
from tracekit.storage.activation_store import prompt_key
from tracekit.storage.atomic import atomic_open, check_writable
from tracekit.storage.seed_store import open_any_store

logger = logging.getLogger(__name__)

OUTPUT_FIELDS = ("generation", "model", "input_length", "timestamp", "messages", "trim_position")
_CLOSEST_POOL = 5000  # stored prompts compared for the zero-match diagnostic (difflib is O(n*m))


@dataclass
class ReconstructResult:
    """Statistics of a reconstruct run (``output`` is None when nothing was written)."""

    output: str | None
    prompt_format: str
    qa_rows: int
    store_entries: int
    matched: int
    qa_unmatched: int
    store_unmatched: int
    corrupted: int
    without_activations: int
    bad_lines: int
    closest: tuple[str, str | None] | None = None
    """With zero matches: (first QA prompt as formatted, closest stored prompt or None)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _formatter(cfg: ReconstructConfig, provenance: dict[str, dict[str, Any]]) -> tuple[Any, str]:
    """(question -> prompt function, description) following cfg, then the store's record."""
    records = list(provenance.values())
    recorded_chat = bool(records) and records[0].get("prompt_format") == "chat"
    if cfg.prompt_template is not None:
        template = cfg.prompt_template
    elif cfg.chat or recorded_chat:
        from tracekit.models.loading import ModelConfig, load_tokenizer_only

        model_arg = (
            cfg.model
            if cfg.model is not None
            else (records[0].get("model_arg") if records else None)
        )
        name, tokenizer = load_tokenizer_only(ModelConfig(model=model_arg))
        return (lambda q: render_chat(tokenizer, q)), f"chat template of {name}"
    else:
        recorded = [str(r["prompt_template"]) for r in records if r.get("prompt_template")]
        template = recorded[0] if recorded else DEFAULT_TEMPLATE
    return (lambda q: format_prompt(template, q)), f"template {template!r}"


def reconstruct(cfg: ReconstructConfig) -> ReconstructResult:
    """Rebuild the inference JSONL described by ``cfg`` (see the module docstring)."""
    check_writable(cfg.output_path, cfg.force)
    qa = read_qa_jsonl(cfg.qa_output_path, cfg.question_field, cfg.skip_bad_lines)
    logger.info("loaded %d QA rows from %s", len(qa.rows), cfg.qa_output_path)
    with open_any_store(cfg.lmdb_path, cfg.allow_pickle) as store:
        fmt, described = _formatter(cfg, store.provenance)
        entries: dict[str, dict[str, Any]] = {}
        stored_prompts: list[str] = []
        corrupted = without_acts = total = 0
        for key, meta, status in store.iter_metadata():
            total += 1
            if (
                meta is None
                or status == "corrupt"
                or not _valid_meta(key, meta, store.needs_prompt)
            ):
                corrupted += 1
                logger.info("skipping corrupt store entry %s", key)
                continue
            if len(stored_prompts) < _CLOSEST_POOL and isinstance(meta.get("prompt"), str):
                stored_prompts.append(meta["prompt"])
            if status == "missing":
                without_acts += 1
                continue
            entries[key] = meta
    logger.info("store %s: %d entries (%d usable)", cfg.lmdb_path, total, len(entries))

    out_rows: list[dict[str, Any]] = []
    matched_keys: set[str] = set()
    first_prompt = None
    for number, (row, question) in enumerate(zip(qa.rows, qa.questions, strict=True)):
        prompt = fmt(question)
        first_prompt = first_prompt if first_prompt is not None else prompt
        key = prompt_key(prompt)
        if number < 3:
            logger.info("QA row %d: prompt %r -> key %s", number, prompt, key)
        meta = entries.get(key)
        if meta is None:
            continue
        matched_keys.add(key)
        out_rows.append({**row, **{name: meta.get(name) for name in OUTPUT_FIELDS}})

    result = ReconstructResult(
        output=None,
        prompt_format=described,
        qa_rows=len(qa.rows),
        store_entries=total,
        matched=len(out_rows),
        qa_unmatched=len(qa.rows) - len(out_rows),
        store_unmatched=len(entries) - len(matched_keys),
        corrupted=corrupted,
        without_activations=without_acts,
        bad_lines=len(qa.bad_lines),
    )
    if not out_rows:
        if first_prompt is not None:
            close = difflib.get_close_matches(first_prompt, stored_prompts, n=1, cutoff=0.0)
            result.closest = (first_prompt, close[0] if close else None)
        return result
    _write_jsonl(cfg.output_path, out_rows)
    result.output = str(cfg.output_path)
    return result


def _valid_meta(key: str, meta: dict[str, Any], needs_prompt: bool) -> bool:
    """Whether the prompt ``meta`` names hashes back to its key (tracekit's stores always name
    it; the seed's need not)."""
    prompt = meta.get("prompt")
    if prompt is None and not needs_prompt:
        return True
    return isinstance(prompt, str) and prompt_key(prompt) == key


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines atomically."""
    with atomic_open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
