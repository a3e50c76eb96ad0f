"""The ``tracekit log`` job: QA questions -> prompts -> batched generation -> activation store.

Per batch: greedy generation through the engine interface (:mod:`tracekit.engines`), then
one teacher-forced forward over ``[left-padded prompt | response]`` under an
:class:`~tracekit.actlog.logger.ActivationLogger`, then one store transaction, on a background
thread while the next batch generates (one batch in flight). Prompts whose key
is already in the store are skipped before generation, so a run killed at any point (SIGKILL
included) and restarted logs every prompt exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekit.actlog.prompts import (
    format_prompt,
    prompt_token_ids,
    read_qa_jsonl,
    render_chat,
)
from tracekit.config.log import LogConfig
from tracekit.distributed import all_gather, barrier, process_info, process_model_config
from tracekit.errors import ConfigError, StoreError
from tracekit.storage.activation_store import (
    ActivationStore,
    PendingEntry,
    describe_mismatch,
    nothing_committed,
)
from tracekit.storage.background import BackgroundWrites

logger = logging.getLogger(__name__)


@dataclass
class LogResult:
    """What a log run did."""

    store: str
    model: str
    layers: list[int]
    qa_rows: int
    unique_prompts: int
    already_logged: int
    logged: int
    bad_lines: int
    batches: int
    bytes_written: int
    seconds: float
    bad_line_numbers: list[int] = field(default_factory=list)
    model_label: str = ""
    """The model with its quantization and short weights hash, for the summary."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "bad_line_numbers"}


BatchCallback = Callable[[int, int, int], None]
"""``(entries in this batch, bytes written, entries this run will log)``: called once with
``(0, 0, total)`` before the first batch, then after each committed batch."""


def _precheck_store(cfg: LogConfig) -> None:
    """Refuse a store from another model before spending time on loading one."""
    if cfg.allow_mixed or not cfg.lmdb.exists():
        return
    if cfg.lmdb.is_dir() and (not any(cfg.lmdb.iterdir()) or nothing_committed(cfg.lmdb)):
        return
    from tracekit.models.embedded import EMBEDDED_MODEL_NAME

    name = cfg.model or EMBEDDED_MODEL_NAME
    with ActivationStore(cfg.lmdb) as store:
        records = list(store.provenance.values())
    if records and all(r.get("model") != name for r in records):
        raise StoreError(
            f"store {cfg.lmdb} was written by another setup: "
            f"{describe_mismatch(records[0], {**records[0], 'model': name})}",
            "log into a new --lmdb path, or pass --allow-mixed to keep both in one store",
        )


def log_activations(cfg: LogConfig, on_batch: BatchCallback | None = None) -> LogResult:
    """Run the log job described by ``cfg`` (see the module docstring), holding the store's
    one-writer lock (the main process of a data-parallel run)."""
    import contextlib

    from tracekit.storage.atomic import output_lock

    with (
        output_lock(cfg.lmdb, folder=False) if process_info().is_main else contextlib.nullcontext()
    ):
        return _log_activations(cfg, on_batch)


def _log_activations(cfg: LogConfig, on_batch: BatchCallback | None) -> LogResult:
    from tracekit.actlog.logger import ActivationLogger, build_provenance
    from tracekit.engines.interface import GenerationParams, create_engine
    from tracekit.models.loading import ModelConfig, load_model
    from tracekit.storage.activation_store import prompt_key

    started = time.perf_counter()
    info = process_info()
    qa = read_qa_jsonl(cfg.qa, cfg.question_field, cfg.skip_bad_lines)
    if info.is_main:
        _precheck_store(cfg)
    loaded = load_model(
        process_model_config(
            ModelConfig(
                model=cfg.model,
                revision=cfg.revision,
                dtype=cfg.model_dtype,
                device=cfg.device,
                device_map=cfg.device_map,
            ),
            info,
        )
    )
    try:
        layers = (
            (loaded.n_layers - 1,) if cfg.layers is None else cfg.layers.resolve(loaded.n_layers)
        )
    except ValueError as exc:
        raise ConfigError(f"--layers: {exc} for {loaded.name}") from None
    tokenizer = loaded.tokenizer
    prompts = [
        render_chat(tokenizer, q) if cfg.chat else format_prompt(cfg.prompt_template, q)
        for q in qa.questions
    ]
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0)
    provenance = build_provenance(
        loaded.model,
        tokenizer,
        layers=layers,
        sequence_mode=cfg.sequence_mode,
        dtype=cfg.dtype,
        model_name=loaded.name,
        revision=cfg.revision,
        model_arg=cfg.model,
        weights=loaded.provenance(),
        prompt_template=None if cfg.chat else cfg.prompt_template,
        chat=cfg.chat,
        generation=params.model_dump(),
    )
    engine = create_engine(cfg.engine, loaded)

    if info.distributed:
        # LMDB has one writer: each process logs into its own store, the main process merges
        # (first any shard stores a crashed run left, so their entries count as done)
        if info.is_main:
            _merge_shard_stores(cfg, provenance)
        barrier(info)
    store_path = shard_store_path(cfg.lmdb, info.rank) if info.distributed else cfg.lmdb
    logged = batches = written = 0
    with ActivationLogger(
        store_path,
        loaded.model,
        tokenizer,
        layers=layers,
        sequence_mode=cfg.sequence_mode,
        dtype=cfg.dtype,
        provenance=provenance,
        allow_mixed=cfg.allow_mixed,
    ) as act_log:
        done = act_log.existing_keys()
        if info.distributed:
            with ActivationStore(cfg.lmdb) as merged:
                done |= set(merged.keys())
        todo: dict[str, int] = {}  # key -> first QA row with that prompt (duplicates log once)
        for index, prompt in enumerate(prompts):
            todo.setdefault(prompt_key(prompt), index)
        unique = len(todo)
        already = sum(1 for key in todo if key in done)
        # this process's contiguous block of the unique prompts (batch-aligned, so its batches
        # are a single run's), less what its shard or the merged store already holds
        mine = info.block(list(todo.items()), multiple=cfg.batch_size)
        pending = [index for key, index in mine if key not in done]
        if on_batch is not None:
            on_batch(0, 0, len(pending))

        def write(entries: list[PendingEntry]) -> tuple[int, int]:
            return len(entries), act_log.write(entries)

        def written_batch(result: tuple[int, int] | None) -> None:
            nonlocal logged, batches, written
            if result is None:
                return
            logged += result[0]
            batches += 1
            written += result[1]
            if on_batch is not None:
                on_batch(result[0], result[1], len(pending))

        # each batch's store transaction runs on a background thread while the next batch
        # generates; at most one batch is not yet written, and it is written before the job
        # ends or fails (a rerun skips it)
        writes = BackgroundWrites("tracekit-log")
        try:
            for start in range(0, len(pending), cfg.batch_size):
                rows = pending[start : start + cfg.batch_size]
                texts = [prompts[i] for i in rows]
                questions = [qa.questions[i] for i in rows]
                entries = _log_batch(
                    loaded, engine, act_log, params, cfg, texts, questions,
                    min(cfg.batch_size, unique),
                )  # fmt: skip
                written_batch(writes.submit(write, entries))
        finally:
            written_batch(writes.close())
    if info.distributed:
        counts = all_gather(info, (logged, batches, written))
        barrier(info)  # every shard store is closed
        logged, batches, written = (sum(c[i] for c in counts) for i in range(3))
        if info.is_main:
            _merge_shard_stores(cfg, provenance)
    return LogResult(
        store=str(cfg.lmdb),
        model=loaded.name,
        model_label=loaded.label,
        layers=list(layers),
        qa_rows=len(qa.rows),
        unique_prompts=unique,
        already_logged=already,
        logged=logged,
        bad_lines=len(qa.bad_lines),
        batches=batches,
        bytes_written=written,
        seconds=time.perf_counter() - started,
        bad_line_numbers=qa.bad_lines,
    )


def shard_store_path(store: Path, rank: int) -> Path:
    """Where process ``rank`` of a data-parallel run logs (a sibling of the final store)."""
    return store.with_name(f"{store.name}.rank{rank}")


def _merge_shard_stores(cfg: LogConfig, provenance: dict[str, Any]) -> None:
    """Copy every shard store's entries into ``cfg.lmdb`` and delete the shard stores."""
    import shutil

    from tracekit.storage.activation_store import ActivationStoreWriter

    shards = sorted(cfg.lmdb.parent.glob(f"{cfg.lmdb.name}.rank*"))
    with ActivationStoreWriter(cfg.lmdb, provenance, cfg.allow_mixed) as writer:
        for shard in shards:
            if (shard / "data.mdb").is_file():
                copied = writer.merge_from(shard, allow_mixed=cfg.allow_mixed)
                logger.info("merged %d entries from %s", copied, shard)
    for shard in shards:
        shutil.rmtree(shard)


def _log_batch(
    loaded: Any,
    engine: Any,
    act_log: Any,
    params: Any,
    cfg: LogConfig,
    texts: list[str],
    questions: list[str],
    pad_to: int,
) -> list[PendingEntry]:
    """Generate for one batch, teacher-force prompt + response under ``act_log``; returns the
    batch's store entries (:meth:`ActivationLogger.collect`), not yet written.

    The forward runs over ``[left-padded prompt | right-padded response]`` with position ids
    from the mask, so each row's states equal an unpadded forward, and the layout is the one
    :meth:`ActivationLogger.log` expects (response positions start at the prompt width).
    """
    import torch

    from tracekit.engines.hf import forward_kwargs, input_device
    from tracekit.engines.interface import left_pad, position_ids_from_mask

    tokenizer = loaded.tokenizer
    device = input_device(loaded)
    pad_id = int(tokenizer.pad_token_id)
    ids = [prompt_token_ids(tokenizer, t) for t in texts]
    with act_log.paused():
        out = engine.generate(ids, params, pad_to=pad_to)
    prompt_ids, prompt_mask = left_pad(ids, pad_id, device)
    full_ids, full_mask = prompt_ids, prompt_mask
    if cfg.sequence_mode != "prompt" and max(len(r) for r in out.response_ids) > 0:
        resp_ids, resp_mask = _right_pad(out.response_ids, pad_id, device)
        full_ids = torch.cat([prompt_ids, resp_ids], dim=1)
        full_mask = torch.cat([prompt_mask, resp_mask], dim=1)
    with torch.inference_mode():
        loaded.model(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=position_ids_from_mask(full_mask),
            use_cache=False,
            **forward_kwargs(loaded.model),
        )
    metadata = [
        {
            "question": question,
            "messages": [{"role": "user", "content": question}] if cfg.chat else None,
            # where the response was cut at eos (in response tokens); None: hit max_new_tokens
            "trim_position": len(response) if reason == "eos" else None,
            "finish_reason": reason,
        }
        for question, response, reason in zip(
            questions, out.response_ids, out.finish_reasons, strict=True
        )
    ]
    return act_log.collect(texts, prompt_mask, out.response_ids, out.texts, metadata)


def _right_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """``(ids, mask)`` with padding on the right (responses follow the left-padded prompts)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)
