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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.actlog.prompts import (
    QARows,
    format_prompt,
    prompt_token_ids,
    read_qa_jsonl,
    render_chat,
)
from tracekit.config.log import LogConfig
from tracekit.distributed import (
    ProcessInfo,
    all_gather,
    barrier,
    process_info,
    process_model_config,
)
from tracekit.errors import ConfigError, StoreError
from tracekit.storage.activation_store import (
    ActivationStore,
    PendingEntry,
    check_store_provenance,
    describe_mismatch,
    nothing_committed,
)
from tracekit.storage.background import BackgroundWrites
from tracekit.storage.store_provenance import refuse_other_setup

if TYPE_CHECKING:
    from tracekit.actlog.logger import ActivationLogger
    from tracekit.engines.interface import GenerationParams
    from tracekit.models.loading import LoadedModel, ModelConfig

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


def _precheck_store(cfg: LogConfig, model_config: ModelConfig) -> None:
    """Refuse a store from another model, or from other weights of this model where they are
    known without loading them, before spending time on loading one."""
    if cfg.allow_mixed or not cfg.lmdb.exists():
        return
    if cfg.lmdb.is_dir() and (not any(cfg.lmdb.iterdir()) or nothing_committed(cfg.lmdb)):
        return
    from tracekit.models.embedded import EMBEDDED_MODEL_NAME
    from tracekit.models.loading import known_weights
    from tracekit.models.weights import weights_mismatch

    name = cfg.model or EMBEDDED_MODEL_NAME
    with ActivationStore(cfg.lmdb) as store:
        records = list(store.provenance.values())
    if records and all(r.get("model") != name for r in records):
        raise StoreError(
            f"store {cfg.lmdb} was written by another setup: "
            f"{describe_mismatch(records[0], {**records[0], 'model': name})}",
            "log into a new --lmdb path, or pass --allow-mixed to keep both in one store",
        )
    same_model = {str(i): r for i, r in enumerate(records) if r.get("model") == name}
    weights = known_weights(model_config) if same_model else {}
    if weights and all(weights_mismatch(r, weights) for r in same_model.values()):
        first = next(iter(same_model.values()))
        refuse_other_setup(cfg.lmdb, same_model, {**first, **weights})


def log_activations(cfg: LogConfig, on_batch: BatchCallback | None = None) -> LogResult:
    """Run the log job described by ``cfg`` (see the module docstring), holding the store's
    one-writer lock (the main process of a data-parallel run)."""
    import contextlib

    from tracekit.storage.atomic import output_lock

    with (
        output_lock(cfg.lmdb, folder=False) if process_info().is_main else contextlib.nullcontext()
    ):
        return _log_activations(cfg, on_batch)


@dataclass
class _Run:
    """What the steps of one log run share: its settings, inputs, model, engine and provenance."""

    cfg: LogConfig
    info: ProcessInfo
    qa: QARows
    loaded: LoadedModel
    layers: tuple[int, ...]
    prompts: list[str]
    """One formatted prompt per QA row."""
    params: GenerationParams
    provenance: dict[str, Any]
    engine: Any


@dataclass
class _Tally:
    """What this process logged: entries, batches, bytes written."""

    logged: int = 0
    batches: int = 0
    written: int = 0


def _log_activations(cfg: LogConfig, on_batch: BatchCallback | None) -> LogResult:
    started = time.perf_counter()
    run = _start_run(cfg)
    info = run.info
    if info.distributed:
        # LMDB has one writer: each process logs into its own store, the main process merges
        # (first any shard stores a crashed run left, so their entries count as done)
        if info.is_main:
            _merge_shard_stores(cfg, run.provenance)
        barrier(info)
    with _open_logger(run) as act_log:
        todo = _unique_prompts(run.prompts)
        done = _logged_keys(run, act_log)
        already = sum(1 for key in todo if key in done)
        # this process's contiguous block of the unique prompts (batch-aligned, so its batches
        # are a single run's), less what its shard or the merged store already holds
        mine = info.block(list(todo.items()), multiple=cfg.batch_size)
        pending = [index for key, index in mine if key not in done]
        tally = _log_pending(run, act_log, pending, min(cfg.batch_size, len(todo)), on_batch)
    if info.distributed:
        counts = all_gather(info, (tally.logged, tally.batches, tally.written))
        barrier(info)  # every shard store is closed
        tally = _Tally(*(sum(c[i] for c in counts) for i in range(3)))
        if info.is_main:  # the first merge said whatever the store needed saying
            _merge_shard_stores(cfg, run.provenance, weights_notice=False)
    return LogResult(
        store=str(cfg.lmdb),
        model=run.loaded.name,
        model_label=run.loaded.label,
        layers=list(run.layers),
        qa_rows=len(run.qa.rows),
        unique_prompts=len(todo),
        already_logged=already,
        logged=tally.logged,
        bad_lines=len(run.qa.bad_lines),
        batches=tally.batches,
        bytes_written=tally.written,
        seconds=time.perf_counter() - started,
        bad_line_numbers=run.qa.bad_lines,
    )


def _start_run(cfg: LogConfig) -> _Run:
    """Read the QA file, check the store, load the model and engine: everything before the
    first batch."""
    from tracekit.engines.interface import GenerationParams, create_engine
    from tracekit.models.loading import ModelConfig, load_model

    info = process_info()
    qa = read_qa_jsonl(cfg.qa, cfg.question_field, cfg.skip_bad_lines)
    model_config = ModelConfig(
        model=cfg.model,
        revision=cfg.revision,
        dtype=cfg.model_dtype,
        device=cfg.device,
        device_map=cfg.device_map,
    )
    if info.is_main:
        _precheck_store(cfg, model_config)
    loaded = load_model(process_model_config(model_config, info))
    try:
        layers = (
            (loaded.n_layers - 1,) if cfg.layers is None else cfg.layers.resolve(loaded.n_layers)
        )
    except ValueError as exc:
        raise ConfigError(f"--layers: {exc} for {loaded.name}") from None
    prompts = [
        render_chat(loaded.tokenizer, q) if cfg.chat else format_prompt(cfg.prompt_template, q)
        for q in qa.questions
    ]
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0)
    provenance = _provenance(cfg, loaded, layers, params)
    if info.is_main and not cfg.allow_mixed:
        # the full check (the weights too) before the engine prepares or the model runs
        check_store_provenance(cfg.lmdb, provenance)
    return _Run(
        cfg=cfg,
        info=info,
        qa=qa,
        loaded=loaded,
        layers=layers,
        prompts=prompts,
        params=params,
        provenance=provenance,
        engine=create_engine(cfg.engine, loaded),
    )


def _provenance(
    cfg: LogConfig, loaded: LoadedModel, layers: Sequence[int], params: GenerationParams
) -> dict[str, Any]:
    """The provenance record of the store's entries (what must match to log into it)."""
    from tracekit.actlog.logger import build_provenance

    return build_provenance(
        loaded.model,
        loaded.tokenizer,
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


def _open_logger(run: _Run) -> ActivationLogger:
    """The logger over this process's store (its shard store in a data-parallel run)."""
    from tracekit.actlog.logger import ActivationLogger

    cfg = run.cfg
    return ActivationLogger(
        shard_store_path(cfg.lmdb, run.info.rank) if run.info.distributed else cfg.lmdb,
        run.loaded,
        layers=run.layers,
        sequence_mode=cfg.sequence_mode,
        dtype=cfg.dtype,
        provenance=run.provenance,
        allow_mixed=cfg.allow_mixed,
    )


def _unique_prompts(prompts: list[str]) -> dict[str, int]:
    """Store key -> the first QA row with that prompt (duplicates log once)."""
    from tracekit.storage.activation_store import prompt_key

    todo: dict[str, int] = {}
    for index, prompt in enumerate(prompts):
        todo.setdefault(prompt_key(prompt), index)
    return todo


def _logged_keys(run: _Run, act_log: ActivationLogger) -> set[str]:
    """The keys already logged: in this process's store, and in a data-parallel run also in
    the merged store."""
    done = act_log.existing_keys()
    if run.info.distributed:
        with ActivationStore(run.cfg.lmdb) as merged:
            done |= set(merged.keys())
    return done


def _log_pending(
    run: _Run,
    act_log: ActivationLogger,
    pending: list[int],
    pad_to: int,
    on_batch: BatchCallback | None,
) -> _Tally:
    """Log the QA rows ``pending`` in batches of ``cfg.batch_size``; ``pad_to`` is the batch
    size the engine is told (so a short last batch reuses the steps it prepared)."""
    tally = _Tally()
    if on_batch is not None:
        on_batch(0, 0, len(pending))

    def write(entries: list[PendingEntry]) -> tuple[int, int]:
        return len(entries), act_log.write(entries)

    def written_batch(result: tuple[int, int] | None) -> None:
        if result is None:
            return
        tally.logged += result[0]
        tally.batches += 1
        tally.written += result[1]
        if on_batch is not None:
            on_batch(result[0], result[1], len(pending))

    # each batch's store transaction runs on a background thread while the next batch
    # generates; at most one batch is not yet written, and it is written before the job
    # ends or fails (a rerun skips it)
    writes = BackgroundWrites("tracekit-log")
    try:
        for start in range(0, len(pending), run.cfg.batch_size):
            entries = _log_batch(run, act_log, pending[start : start + run.cfg.batch_size], pad_to)
            written_batch(writes.submit(write, entries))
    finally:
        written_batch(writes.close())
    return tally


def shard_store_path(store: Path, rank: int) -> Path:
    """Where process ``rank`` of a data-parallel run logs (a sibling of the final store)."""
    return store.with_name(f"{store.name}.rank{rank}")


def _merge_shard_stores(
    cfg: LogConfig, provenance: dict[str, Any], weights_notice: bool = True
) -> None:
    """Copy every shard store's entries into ``cfg.lmdb`` and delete the shard stores;
    ``weights_notice``: see :class:`ActivationStoreWriter`."""
    import shutil

    from tracekit.storage.activation_store import ActivationStoreWriter

    shards = sorted(cfg.lmdb.parent.glob(f"{cfg.lmdb.name}.rank*"))
    with ActivationStoreWriter(
        cfg.lmdb, provenance, cfg.allow_mixed, weights_notice=weights_notice
    ) as writer:
        for shard in shards:
            if (shard / "data.mdb").is_file():
                copied = writer.merge_from(shard, allow_mixed=cfg.allow_mixed)
                logger.info("merged %d entries from %s", copied, shard)
    for shard in shards:
        shutil.rmtree(shard)


def _log_batch(
    run: _Run, act_log: ActivationLogger, rows: list[int], pad_to: int
) -> list[PendingEntry]:
    """Generate for the QA ``rows``, teacher-force prompt + response under ``act_log``; returns the
    batch's store entries (:meth:`ActivationLogger.collect`), not yet written.

    The forward runs over ``[left-padded prompt | right-padded response]`` with position ids
    from the mask, so each row's states equal an unpadded forward, and the layout is the one
    :meth:`ActivationLogger.log` expects (response positions start at the prompt width).
    """
    import torch

    from tracekit.engines.hf import forward_kwargs, input_device
    from tracekit.engines.interface import left_pad, position_ids_from_mask

    loaded, cfg = run.loaded, run.cfg
    texts = [run.prompts[i] for i in rows]
    questions = [run.qa.questions[i] for i in rows]
    tokenizer = loaded.tokenizer
    device = input_device(loaded)
    pad_id = int(tokenizer.pad_token_id)
    ids = [prompt_token_ids(tokenizer, t) for t in texts]
    with act_log.paused():
        out = run.engine.generate(ids, run.params, pad_to=pad_to)
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
