"""``tracekit.generate``: contrastive trait responses with captured activations, resumably.

For each trait, row ``k`` of each polarity asks question ``k mod n_questions`` under
instruction pair ``(k div n_questions) mod n_pairs`` (pos or neg side), so pos row ``k`` and neg
row ``k`` pair by id. Rows are generated in batches through a
:class:`~tracekit.engines.interface.GenerationEngine`; every finished batch is journaled
(:mod:`tracekit.storage.experiment`) before the next starts, so a killed run resumes where it
stopped. On CUDA out-of-memory the batch size halves and the batch is retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.generate import GenerateConfig, RuntimeOptions
from tracekit.distributed import (
    ProcessInfo,
    all_gather,
    barrier,
    process_info,
    process_model_config,
)
from tracekit.engines.batching import Batcher
from tracekit.engines.interface import CaptureSpec, GenerationEngine, create_engine
from tracekit.errors import ConfigError
from tracekit.jobs.generate_outputs import SetRun, TraitResult, finalize
from tracekit.models.loading import ModelConfig
from tracekit.storage import experiment as store
from tracekit.storage.atomic import output_lock
from tracekit.storage.background import BackgroundWrites
from tracekit.storage.experiment import Polarity, TraitPaths
from tracekit.traits import TraitDefinition, load_trait

if TYPE_CHECKING:
    from tracekit.engines.steering import SteeringSet
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """What :func:`generate` did, for the final table and ``--json``."""

    model: str
    traits: list[TraitResult]
    seconds: float
    tokens: int
    batch_size: int
    """Batch size at the end (smaller than asked if out-of-memory halved it)."""
    generation_seconds: float = 0.0
    """From the first batch (every process started) to the merged outputs: ``seconds`` less
    loading the model and planning."""
    processes: list[dict[str, Any]] = field(default_factory=list)
    """Per process (rank order): its device, rows, new tokens, seconds in the engine and,
    of those, one-time engine setup (kernel choice, compilation, graph capture) and waiting
    for journal writes; seconds loading the model and in its share of the final merge."""

    model_weights: dict[str, str | None] = field(default_factory=dict)
    """``quantization`` and ``weights_sha256`` of the model (tracekit.models.weights)."""

    @property
    def model_label(self) -> str:
        from tracekit.models.weights import short_weights

        detail = short_weights(self.model_weights)
        return f"{self.model} ({detail})" if detail else self.model

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.model_weights,
            "seconds": round(self.seconds, 3),
            "generation_seconds": round(self.generation_seconds, 3),
            "processes": self.processes,
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "traits": [
                {
                    "trait": t.trait,
                    "dir": str(t.root),
                    "rows": t.rows,
                    "generated": t.generated,
                    "tokens": t.tokens,
                    "passing": t.passing,
                    "steering": t.steering,
                    "files": [str(f) for f in t.files],
                }
                for t in self.traits
            ],
        }


BatchHook = Callable[[int, int], None]
"""Called after each batch with (rows, new tokens)."""


@dataclass(frozen=True)
class PlannedRow:
    id: int
    question: str
    instruction: str


def plan_rows(trait: TraitDefinition, polarity: Polarity, n_examples: int) -> list[PlannedRow]:
    """The rows of one polarity; pos and neg row ``k`` share question and instruction pair."""
    n_q = len(trait.questions)
    rows = []
    for k in range(n_examples):
        pair = trait.instruction[(k // n_q) % len(trait.instruction)]
        text = {"pos": pair.pos, "neg": pair.neg}.get(polarity, "")
        rows.append(PlannedRow(id=k, question=trait.questions[k % n_q], instruction=text))
    return rows


def row_seed(seed: int, polarity: Polarity, row_id: int) -> int:
    """Per-row sampling seed: independent of batch size, order and resume (and of the
    coefficient of a steering sweep, so each coefficient samples with the same seeds)."""
    return (seed * 1_000_003 + row_id * 2 + (0 if polarity == "pos" else 1)) % (2**62)


def run_settings(
    config: GenerateConfig,
    loaded: LoadedModel,
    layers: tuple[int, ...],
    trait: TraitDefinition,
    steer: SteeringSet | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the journal."""
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "layers": list(layers) if config.extract_activations else None,
        **settings_before_load(config, trait, steer),
    }


def settings_before_load(
    config: GenerateConfig, trait: TraitDefinition, steer: SteeringSet | None = None
) -> dict[str, Any]:
    """The part of :func:`run_settings` known before the model loads (a rerun that differs
    here is refused without loading it)."""
    return {
        "chat_template": config.chat_template,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "pooling": [p.value for p in config.pooling] if config.extract_activations else None,
        "trait": trait.model_dump(mode="json"),
        **({"steering": _steer_settings(steer)} if steer is not None else {}),
    }


def _steer_settings(steer: SteeringSet) -> dict[str, Any]:
    """The steering a resumed set must share (the vector by content, not by path)."""
    return {k: v for k, v in steer.describe().items() if k != "vector_file"}


def generate(
    config: GenerateConfig,
    on_batch: BatchHook | None = None,
    on_total: Callable[[int], None] | None = None,
    loaded: LoadedModel | None = None,
) -> GenerateResult:
    """Generate pos/neg responses (and activations) for each trait of ``config``; with
    ``steer_vector``, one steered output set per coefficient (and control direction) under
    each trait's ``steering/`` folder.

    ``loaded`` reuses an already loaded model (it must match ``config``'s model options).
    """
    started = time.perf_counter()
    info = process_info()
    traits = [load_trait(t, config.experiment, config.experiments_dir) for t in config.traits]
    judge_config = _judge_config(config)  # bad judge options fail before any generation
    sets = _steering_sets(config)  # a bad vector file fails before the model loads
    with contextlib.ExitStack() as locks:
        if info.is_main:  # one writer per trait folder (the processes of one run are one)
            for trait in traits:
                root = TraitPaths.of(config.experiments_dir, config.experiment, trait.name).root
                locks.enter_context(output_lock(root))
        if not sets:
            return _generate(
                config, traits, judge_config, info, started, on_batch, on_total, loaded
            )
        return _generate_sweep(config, traits, judge_config, info, sets, on_batch, on_total, loaded)


def _steering_sets(config: GenerateConfig) -> list[SteeringSet]:
    """The output sets of a steering sweep (none without ``steer_vector``)."""
    if config.steer_vector is None:
        return []
    from tracekit.engines.steering import steering_sets

    assert config.steer_layer is not None  # the config's validator makes sure
    return steering_sets(
        config.steer_vector,
        config.steer_layer,
        config.steer_coef,
        config.steer_positions,
        config.steer_control,
        config.steer_control_seed,
    )


def _generate_sweep(
    config: GenerateConfig,
    traits: list[TraitDefinition],
    judge_config: Any,
    info: ProcessInfo,
    sets: list[SteeringSet],
    on_batch: BatchHook | None,
    on_total: Callable[[int], None] | None,
    loaded: LoadedModel | None,
) -> GenerateResult:
    """One output set per steering set, on one loaded model; the results merged. Every set is
    checked and planned before the first one generates, so the job's size is known (and said)
    once, and a set that would be refused is refused before any generation."""
    from tracekit.engines.steering import check_fits
    from tracekit.models.loading import load_model

    load_started = time.perf_counter()
    loaded = loaded or load_model(model_settings_for(config, info))
    load_seconds = time.perf_counter() - load_started
    for steer in sets:
        check_fits(loaded.handles, steer.steering, loaded.name)
    # one engine for every set: the steered value is an input of its step, so the cuda
    # engine compiles and captures the step once for the whole sweep
    engine = create_engine(config.engine, loaded, steering=True)
    planned = [
        _plan_set(config, traits, judge_config, info, loaded, steer, engine) for steer in sets
    ]
    rows = sum(p.own_rows for p in planned)
    if on_total is not None:
        on_total(rows)
    results = [_run_set(p, on_batch, job_rows=rows) for p in planned]
    return GenerateResult(
        model=loaded.name,
        traits=[t for r in results for t in r.traits],
        seconds=sum(r.seconds for r in results),
        tokens=sum(r.tokens for r in results),
        batch_size=results[-1].batch_size,
        generation_seconds=sum(r.generation_seconds for r in results),
        processes=_sweep_processes([r.processes for r in results], load_seconds),
        model_weights=results[-1].model_weights,
    )


def _sweep_processes(per_set: list[list[dict[str, Any]]], load_seconds: float) -> list[dict]:
    """Each process's report over a whole sweep: its numbers summed over the sets, and the
    model's loading (done once, before the first set) as its ``load_seconds``."""
    merged = []
    for reports in zip(*per_set, strict=True):
        total = dict(reports[0])
        for report in reports[1:]:
            for key, value in report.items():
                if key == "setup_parts":
                    parts = dict(total[key])
                    for name, seconds in value.items():
                        parts[name] = round(parts.get(name, 0.0) + seconds, 3)
                    total[key] = parts
                elif key not in ("rank", "device"):
                    total[key] = round(total[key] + value, 3)
        total["load_seconds"] = round(load_seconds, 3)
        merged.append(total)
    return merged


@dataclass(frozen=True)
class _TraitPlan:
    """One trait's rows still to generate, by polarity."""

    trait: TraitDefinition
    paths: TraitPaths
    todo: dict[Polarity, list[PlannedRow]]
    """This process's rows: contiguous blocks of those left, as a single process runs them."""
    run_rows: dict[Polarity, int]
    """Rows left in the whole run (every process)."""


@dataclass(frozen=True)
class _PlannedSet:
    """An output set ready to generate: its folders checked and prepared, its rows planned."""

    run: SetRun
    engine: GenerationEngine
    traits: list[_TraitPlan]
    load_seconds: float
    plan_seconds: float
    """Seconds it took to plan the set, loading the model included."""

    @property
    def own_rows(self) -> int:
        """Rows this process generates."""
        return sum(len(rows) for t in self.traits for rows in t.todo.values())


@dataclass
class _Tally:
    """This process's counts over one output set's generation, for its report."""

    rows: int = 0
    """Rows this process generated."""
    tokens: int = 0
    """New tokens of those rows."""
    engine_seconds: float = 0.0
    """Seconds in the engine's batches (setup included)."""
    merge_seconds: float = 0.0
    """Seconds merging the journal into the outputs (judging included)."""


def _generate(
    config: GenerateConfig,
    traits: list[TraitDefinition],
    judge_config: Any,
    info: ProcessInfo,
    started: float,
    on_batch: BatchHook | None,
    on_total: Callable[[int], None] | None,
    loaded: LoadedModel | None,
) -> GenerateResult:
    """Each trait's own output set."""
    planned = _plan_set(config, traits, judge_config, info, loaded)
    if on_total is not None:
        on_total(planned.own_rows)
    result = _run_set(planned, on_batch)
    result.seconds = time.perf_counter() - started
    return result


def _plan_set(
    config: GenerateConfig,
    traits: list[TraitDefinition],
    judge_config: Any,
    info: ProcessInfo,
    loaded: LoadedModel | None,
    steer: SteeringSet | None = None,
    engine: GenerationEngine | None = None,
) -> _PlannedSet:
    """Check and prepare the folders of one output set (the traits' own, or ``steer``'s) and
    plan its rows, loading the model unless ``loaded`` is given and creating the engine
    unless ``engine`` is given: everything that can be refused is refused here, before any
    generation."""
    from tracekit.engines.interface import check_steering
    from tracekit.models.loading import load_model

    started = time.perf_counter()
    subdir = steer.subdir if steer is not None else None
    all_paths = [_trait_paths(config, t.name, subdir) for t in traits]
    if not config.force:  # outputs of other tools (the seed's scripts), and an earlier run
        # with other settings, are refused before the model loads
        for trait, paths in zip(traits, all_paths, strict=True):
            store.check_unjournaled_outputs(paths)
            early = settings_before_load(config, trait, steer)
            store.check_run_settings(paths, early, force=False, partial=True)
    load_started = time.perf_counter()
    loaded = loaded or load_model(model_settings_for(config, info))
    load_seconds = time.perf_counter() - load_started
    try:
        layers = config.layers.resolve(loaded.n_layers)
    except ValueError as exc:
        raise ConfigError(f"--layers: {exc} for {loaded.name}") from None
    run = SetRun(
        config=config,
        loaded=loaded,
        info=info,
        layers=layers,
        capture=CaptureSpec(layers, config.pooling) if config.extract_activations else None,
        params=config.generation_params(),
        template=_template_kind(loaded, config),  # no chat template: fails before any write
        judge_config=judge_config,
        steer=steer,
    )
    engine = engine or create_engine(config.engine, loaded, steering=steer is not None)
    if steer is not None:
        check_steering(engine)
    # every trait is checked first, so bad state is reported before any generation
    _prepare_folders(run, traits, all_paths)
    plans = [_plan_trait(run, t, paths) for t, paths in zip(traits, all_paths, strict=True)]
    return _PlannedSet(run, engine, plans, load_seconds, time.perf_counter() - started)


def _prepare_folders(
    run: SetRun, traits: list[TraitDefinition], all_paths: list[TraitPaths]
) -> None:
    """Clear the folders (``--force``), write or check the trait definitions and run
    settings. When data-parallel, the main process clears and writes, the others then only
    check (one writer per file)."""
    info, config = run.info, run.config
    if not info.is_main:
        barrier(info)  # wait for the main process to prepare the folders
    force = config.force and info.is_main
    for trait, paths in zip(traits, all_paths, strict=True):
        if force:
            store.clear_outputs(paths)
        store.ensure_trait_definition(paths, trait, force)
        settings = run_settings(config, run.loaded, run.layers, trait, run.steer)
        store.check_run_settings(paths, settings, force)
    if info.is_main:
        barrier(info)  # (no-op for a single process)


def _plan_trait(run: SetRun, trait: TraitDefinition, paths: TraitPaths) -> _TraitPlan:
    """The rows of ``trait`` the journal does not hold yet, and (main process) the slot
    files their activations are written into."""
    from tracekit.storage.activation_slots import prepare_slots

    config, info, capture = run.config, run.info, run.capture
    todo, run_rows = {}, {}
    for polarity in config.polarities:
        done = store.read_parts(paths, polarity)
        planned = plan_rows(trait, polarity, config.n_examples)
        remaining = [r for r in planned if r.id not in done]
        run_rows[polarity] = len(remaining)
        if remaining and capture is not None and info.is_main:
            # (before the barrier that starts the generation)
            for pooling in capture.poolings:
                prepare_slots(
                    paths, polarity, pooling.value, config.n_examples,
                    (len(run.layers), run.loaded.hidden_size), list(done),
                )  # fmt: skip
        todo[polarity] = info.block(remaining, multiple=config.batch_size)
    return _TraitPlan(trait, paths, todo, run_rows)


def _run_set(
    planned: _PlannedSet, on_batch: BatchHook | None, job_rows: int | None = None
) -> GenerateResult:
    """Generate a planned output set, trait by trait, and merge each trait's outputs;
    ``job_rows``: this process's rows in the whole job the set is part of (a sweep's sets
    share one engine), by default the set's own."""
    started = time.perf_counter()
    run, engine = planned.run, planned.engine
    batcher = Batcher(engine, run.config.batch_size)
    plan_job = getattr(engine, "plan_job", None)
    if plan_job is not None:  # the fast engine times its kernels only where the job repays it
        rows = planned.own_rows if job_rows is None else job_rows
        plan_job(rows, run.params.max_new_tokens, batcher.batch_size)
    setup_before = _setup_parts(engine)  # a shared engine's earlier sets are not this set's
    # every process starts generating together, once the slot files exist (no-op for one process)
    barrier(run.info)
    generation_started = time.perf_counter()
    tally = _Tally()
    journal = BackgroundWrites("tracekit-journal")
    results = [
        _generate_trait(run, plan, batcher, journal, on_batch, tally) for plan in planned.traits
    ]
    journal.close()
    setup = {k: v - setup_before.get(k, 0.0) for k, v in _setup_parts(engine).items()}
    report = _process_report(run, setup, tally, planned.load_seconds, journal.wait_seconds)
    return GenerateResult(
        model=run.loaded.name,
        model_weights={k: v for k, v in run.loaded.provenance().items() if k != "model"},
        traits=results,
        seconds=planned.plan_seconds + time.perf_counter() - started,
        tokens=sum(r.tokens for r in results),
        batch_size=batcher.batch_size,
        generation_seconds=time.perf_counter() - generation_started,
        processes=all_gather(run.info, report),
    )


def _generate_trait(
    run: SetRun,
    plan: _TraitPlan,
    batcher: Batcher,
    journal: BackgroundWrites,
    on_batch: BatchHook | None,
    tally: _Tally,
) -> TraitResult:
    """One trait's rows, journaled batch by batch, then its outputs merged (every process
    of a data-parallel run merges once all of them journaled their shards)."""
    result = TraitResult(trait=plan.trait.name, root=plan.paths.root, rows={})
    if run.steer is not None:
        result.steering = run.steer.describe()
    for polarity in run.config.polarities:
        _generate_polarity(run, plan, polarity, batcher, journal, result, on_batch, tally)
    tally.tokens += result.tokens
    if run.info.distributed:
        # returns once every process journaled its shard: then all of them merge
        counts = all_gather(run.info, (result.generated, result.tokens))
        result.generated = sum(c[0] for c in counts)
        result.tokens = sum(c[1] for c in counts)
    finalize_started = time.perf_counter()
    finalize(run, plan.trait, plan.paths, result)
    tally.merge_seconds += time.perf_counter() - finalize_started
    return result


def _generate_polarity(
    run: SetRun,
    plan: _TraitPlan,
    polarity: Polarity,
    batcher: Batcher,
    journal: BackgroundWrites,
    result: TraitResult,
    on_batch: BatchHook | None,
    tally: _Tally,
) -> None:
    """This process's rows of one polarity, each finished batch handed to the journal."""
    config, rows = run.config, plan.todo[polarity]
    built = [_build(run.loaded, config, row.question, row.instruction) for row in rows]

    def on_output(start: int, end: int, out: Any) -> None:
        records = [
            {
                "id": row.id,
                "question": row.question,
                "instruction": row.instruction,
                "prompt": built[start + i].text,
                "response": out.texts[i],
                "finish_reason": out.finish_reasons[i],
                "n_tokens": len(out.response_ids[i]),
            }
            for i, row in enumerate(rows[start:end])
        ]
        pooled = {p.value: t.numpy() for p, t in out.pooled.items()}
        tag = run.info.part_tag()
        journal.submit(
            store.write_batch_part, plan.paths, polarity, records, pooled or None, tag=tag
        )
        result.generated += len(records)
        result.tokens += out.n_new_tokens
        if on_batch is not None:
            on_batch(len(records), out.n_new_tokens)

    started = time.perf_counter()
    try:
        batcher.run(
            [b.ids for b in built],
            [row_seed(config.seed, polarity, row.id) for row in rows],
            run.params,
            run.capture,
            on_output,
            plan.run_rows[polarity],
            steering=run.steer.steering if run.steer is not None else None,
        )
    finally:
        journal.drain()  # every finished batch on disk, also when the run failed
    tally.engine_seconds += time.perf_counter() - started
    tally.rows += len(rows)


def _setup_parts(engine: GenerationEngine) -> dict[str, float]:
    """The engine's one-time work so far, by part (none for an engine that reports none)."""
    return {name: float(sec) for name, sec in getattr(engine, "setup_parts", {}).items()}


def _process_report(
    run: SetRun,
    setup: dict[str, float],
    tally: _Tally,
    load_seconds: float,
    journal_wait_seconds: float,
) -> dict[str, Any]:
    """This process's part of :attr:`GenerateResult.processes`; ``setup``: the engine's
    one-time work during this set, by part."""
    return {
        "rank": run.info.rank,
        "device": _device_label(run.loaded),
        "rows": tally.rows,
        "tokens": tally.tokens,
        "engine_seconds": round(tally.engine_seconds, 3),
        "setup_seconds": round(sum(setup.values()), 3),
        "setup_parts": {name: round(seconds, 3) for name, seconds in setup.items()},
        "load_seconds": round(load_seconds, 3),
        "merge_seconds": round(tally.merge_seconds, 3),
        "journal_wait_seconds": round(journal_wait_seconds, 3),
    }


def _device_label(loaded: LoadedModel) -> str:
    """``cuda:0``, with the physical GPU when each process sees only its own."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if loaded.device.type == "cuda" and visible is not None and "," not in visible:
        return f"{loaded.device} (GPU {visible})"
    return str(loaded.device)


def _trait_paths(config: GenerateConfig, trait: str, subdir: Path | None) -> TraitPaths:
    """A trait's folder, or a steered set's folder inside it."""
    paths = TraitPaths.of(config.experiments_dir, config.experiment, trait)
    return paths if subdir is None else TraitPaths(paths.root / subdir)


def model_settings_for(config: RuntimeOptions, info: ProcessInfo) -> ModelConfig:
    """The model options of ``config`` for this process (its own GPU when data-parallel)."""
    return process_model_config(config.model_settings(), info)


def _build(loaded: LoadedModel, config: RuntimeOptions, question: str, instruction: str) -> Any:
    from tracekit.models.templates import build_prompt

    return build_prompt(
        loaded.tokenizer, question, instruction, config.chat_template, model_name=loaded.name
    )


def _template_kind(loaded: LoadedModel, config: RuntimeOptions) -> str:
    return _build(loaded, config, "?", "!").template


def _judge_config(config: GenerateConfig) -> Any:
    """The judge's config for ``--judge-model``, or None without a judge."""
    if config.judge_model is None:
        return None
    from pydantic import ValidationError

    from tracekit.config.base import format_validation_error
    from tracekit.judge import JudgeConfig

    try:
        return JudgeConfig(
            judge_model=config.judge_model,
            metrics=config.judge_metrics,
            base_url=config.judge_base_url,
            min_mass=config.judge_min_mass,
            device=config.device,
        )
    except ValidationError as exc:
        raise ConfigError(f"judge options: {format_validation_error(exc)}") from None
