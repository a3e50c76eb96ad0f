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
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tracekit.config.base import TracekitConfig
from tracekit.config.types import BatchSize, LayerSpec
from tracekit.distributed import (
    ProcessInfo,
    all_gather,
    barrier,
    process_info,
    process_model_config,
)
from tracekit.engines.interface import CaptureSpec, GenerationParams, create_engine
from tracekit.engines.pooling import Pooling, Poolings
from tracekit.engines.steering import SteerControl, SteerPositions
from tracekit.errors import ConfigError, ModelError
from tracekit.models.loading import DtypeName, ModelConfig
from tracekit.storage import experiment as store
from tracekit.storage.atomic import output_lock, write_json
from tracekit.storage.background import BackgroundWrites
from tracekit.storage.experiment import POLARITIES, Polarity, TraitPaths
from tracekit.traits import TraitDefinition, load_trait

if TYPE_CHECKING:
    from tracekit.engines.interface import GenerationEngine
    from tracekit.engines.steering import Steering, SteeringSet
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)

_NAME_HINT = "use letters, digits, '_', '-' or '.'"


def check_name(value: str, what: str) -> str:
    value = value.strip()
    if not value or "/" in value or "\\" in value or value.startswith("."):
        raise ValueError(f"invalid {what} name '{value}': {_NAME_HINT}")
    return value


class RuntimeOptions(TracekitConfig):
    """Model selection options shared by generate and extract."""

    model: str | None = None
    revision: str | None = None
    dtype: DtypeName = "auto"
    device: str = "auto"
    device_map: Literal["auto"] | None = None
    chat_template: bool = True
    """Use the tokenizer's chat template (instruction as system prompt); False for base models."""

    def model_settings(self) -> ModelConfig:
        return ModelConfig(
            model=self.model,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
        )


class GenerateConfig(RuntimeOptions):
    """Options of ``tracekit generate`` (and of :func:`generate`)."""

    experiment: str
    traits: tuple[str, ...] = Field(min_length=1)
    experiments_dir: Path = Path("experiments")
    engine: str = "auto"
    batch_size: BatchSize = 8
    n_examples: int = Field(default=100, ge=1, le=1_000_000)
    max_new_tokens: int = Field(default=150, ge=1, le=100_000)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    layers: LayerSpec = LayerSpec(None)
    pooling: Poolings = (Pooling.response_avg,)
    extract_activations: bool = True
    judge_model: str | None = None
    """Judge each response with this model (tracekit.judge; backend from the options below)."""
    judge_metrics: tuple[Literal["trait", "coherence"], ...] = ("trait",)
    judge_base_url: str | None = None
    judge_min_mass: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    """OpenAI-compatible server; None: ``OPENAI_BASE_URL``, else the local backend."""
    threshold: float = Field(default=50.0, ge=0.0, le=100.0)
    generation_cache: bool = True
    pt: bool = False
    """Also write each activation file as a ``.pt`` tensor (a second full copy on disk)."""
    force: bool = False
    steer_vector: Path | None = None
    """Steer: add ``coef * vector`` to the residual stream (:mod:`tracekit.engines.steering`);
    a vectors file as ``extract vectors`` writes it (``[layers, hidden]``) or one ``[hidden]``."""
    steer_layer: int | None = Field(default=None, ge=0)
    steer_coef: tuple[float, ...] = ()
    """One output set per coefficient (a sweep)."""
    steer_positions: SteerPositions = "response"
    steer_control: SteerControl | None = None
    """``random``: also the same sweep along a seeded random direction of the vector's norm."""
    steer_control_seed: int = 0
    steer_prompts: Literal["neutral", "trait"] = "neutral"
    """Steered runs ask the trait's questions without instruction (``neutral``, one CSV) or
    with its pos/neg instructions (``trait``)."""

    @field_validator("steer_coef", mode="before")
    @classmethod
    def _split_coefs(cls, value: Any) -> Any:
        if isinstance(value, (int, float)):
            return (value,)
        if isinstance(value, str):
            try:
                return tuple(float(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"'{value}' is not a list of numbers (e.g. -4,-2,0,2,4)") from None
        return value

    @field_validator("steer_coef")
    @classmethod
    def _unique_coefs(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        import math

        if any(not math.isfinite(v) for v in value):
            raise ValueError("coefficients must be finite numbers")
        return tuple(dict.fromkeys(v + 0.0 for v in value))

    @model_validator(mode="after")
    def _steering_complete(self) -> GenerateConfig:
        if self.steer_vector is None:
            given = [
                name
                for name in ("steer_layer", "steer_coef", "steer_control")
                if getattr(self, name) not in (None, ())
            ]
            if given:
                option = "--" + given[0].replace("_", "-")
                raise ValueError(f"{option} needs --steer-vector FILE")
        elif self.steer_layer is None:
            raise ValueError("--steer-vector needs --steer-layer L (the layer to add it at)")
        elif not self.steer_coef:
            raise ValueError("--steer-vector needs --steer-coef (e.g. -4,-2,0,2,4)")
        return self

    @property
    def polarities(self) -> tuple[Polarity, ...]:
        """The row sets a run generates: pos and neg, or only neutral rows when steering."""
        if self.steer_vector is not None and self.steer_prompts == "neutral":
            return ("neutral",)
        return POLARITIES

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        return check_name(value, "experiment")

    @field_validator("judge_metrics", mode="before")
    @classmethod
    def _split_metrics(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("traits", mode="before")
    @classmethod
    def _split_traits(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",")]
        if isinstance(value, (list, tuple)):
            items = [str(v).strip() for v in value]
            if any(not v for v in items):
                raise ValueError("empty trait name in the trait list (look for ',,')")
            return tuple(dict.fromkeys(items))
        return value

    def generation_params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )


@dataclass
class TraitResult:
    """What one trait's run did."""

    trait: str
    root: Path
    rows: dict[str, int]
    """Finished rows per polarity after the run."""
    generated: int = 0
    """Rows generated by this run (the rest were resumed)."""
    tokens: int = 0
    files: list[Path] = field(default_factory=list)
    passing: dict[str, int] | None = None
    """With a judge: pos rows scoring >= threshold and neg rows scoring < threshold."""
    steering: dict[str, Any] | None = None
    """A steered run's set (:meth:`~tracekit.engines.steering.SteeringSet.describe`)."""


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


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class _Batcher:
    """Runs rows through the engine in batches, halving the batch size on out-of-memory."""

    def __init__(self, engine: GenerationEngine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._warned = False

    def run(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        params: GenerationParams,
        capture: CaptureSpec | None,
        on_output: Callable[[int, int, Any], None],
        run_rows: int | None = None,
        steering: Steering | None = None,
    ) -> None:
        """``run_rows``: rows of this polarity in the whole run (all processes); short batches
        are padded (by engines that pad) to the batch size, or to ``run_rows`` if fewer, so a
        run smaller than one batch is not padded and every process pads alike.

        Each batch is started before the previous one's output is taken (engines with
        ``start``, see :func:`~tracekit.engines.interface.start_generation`), so the host
        builds one batch's records while the device generates the next. A finished batch is
        handed to ``on_output`` before an error of the next one is raised or handled."""
        from tracekit.engines.interface import start_generation

        pending: tuple[int, int, Any] | None = None

        def take_pending() -> None:
            nonlocal pending
            if pending is not None:
                first, last, launched = pending
                pending = None
                on_output(first, last, launched.result())

        start = 0
        while start < len(prompts):
            end = min(start + self.batch_size, len(prompts))
            try:
                pad_to = min(self.batch_size, run_rows or self.batch_size)
                launched = start_generation(
                    self.engine,
                    prompts[start:end],
                    params,
                    capture,
                    seeds[start:end],
                    pad_to=pad_to,
                    steering=steering,
                )
            except BaseException as exc:  # an interrupt too: the batch before is done, keep it
                take_pending()
                if not is_out_of_memory(exc):
                    raise
                if self.batch_size == 1:
                    raise ModelError(
                        "out of memory even at batch size 1",
                        "use a smaller --max-new-tokens, a smaller dtype or --device-map auto",
                    ) from exc
                self._halve()
                continue
            take_pending()
            pending = (start, end, launched)
            start = end
        take_pending()

    def _halve(self) -> None:
        import torch

        self.batch_size = max(1, self.batch_size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self._warned:
            logger.warning("out of memory: continuing with batch size %d", self.batch_size)
            self._warned = True
        else:
            logger.info("out of memory again: batch size %d", self.batch_size)


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
    """One :func:`_generate` per steering set, on one loaded model; the results merged."""
    from tracekit.engines.steering import check_fits
    from tracekit.models.loading import load_model

    loaded = loaded or load_model(model_settings_for(config, info))
    for steer in sets:
        check_fits(loaded.handles, steer.steering, loaded.name)
    done_rows = 0

    def set_total(total: int) -> None:
        if on_total is not None:
            on_total(done_rows + total)

    results = []
    for steer in sets:
        started = time.perf_counter()
        results.append(
            _generate(
                config, traits, judge_config, info, started, on_batch, set_total, loaded, steer
            )
        )
        done_rows += sum(t.generated for t in results[-1].traits)
    return GenerateResult(
        model=loaded.name,
        traits=[t for r in results for t in r.traits],
        seconds=sum(r.seconds for r in results),
        tokens=sum(r.tokens for r in results),
        batch_size=results[-1].batch_size,
        generation_seconds=sum(r.generation_seconds for r in results),
        processes=results[-1].processes,
    )


def _generate(
    config: GenerateConfig,
    traits: list[TraitDefinition],
    judge_config: Any,
    info: ProcessInfo,
    started: float,
    on_batch: BatchHook | None,
    on_total: Callable[[int], None] | None,
    loaded: LoadedModel | None,
    steer: SteeringSet | None = None,
) -> GenerateResult:
    """One output set per trait: the trait's own, or one steering set's (``steer``)."""
    from tracekit.engines.interface import check_steering
    from tracekit.models.loading import load_model
    from tracekit.storage.activation_slots import prepare_slots

    all_paths = [
        _trait_paths(config, t.name, steer.subdir if steer is not None else None) for t in traits
    ]
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
    capture = CaptureSpec(layers, config.pooling) if config.extract_activations else None
    template = _template_kind(loaded, config)  # a missing chat template fails before any write
    engine = create_engine(config.engine, loaded, steering=steer is not None)
    if steer is not None:
        check_steering(engine)
    params = config.generation_params()

    # plan every trait first, so bad state is reported before any generation; when
    # data-parallel, the main process clears (--force) and writes the run settings, the others
    # then only check them (one writer per file)
    if not info.is_main:
        barrier(info)  # wait for the main process to prepare the folders
    force = config.force and info.is_main
    for trait, paths in zip(traits, all_paths, strict=True):
        if force:
            store.clear_outputs(paths)
        store.ensure_trait_definition(paths, trait.to_json(), force)
        settings = run_settings(config, loaded, layers, trait, steer)
        store.check_run_settings(paths, settings, force)
    if info.is_main:
        barrier(info)  # (no-op for a single process)
    plans = []
    for trait, paths in zip(traits, all_paths, strict=True):
        todo, run_rows = {}, {}
        for polarity in config.polarities:
            done = store.read_parts(paths, polarity)
            planned = plan_rows(trait, polarity, config.n_examples)
            remaining = [r for r in planned if r.id not in done]
            run_rows[polarity] = len(remaining)
            if remaining and capture is not None and info.is_main:
                # the slot files this run's batches write into (before the barrier below)
                for pooling in capture.poolings:
                    prepare_slots(
                        paths, polarity, pooling.value, config.n_examples,
                        (len(layers), loaded.hidden_size), list(done),
                    )  # fmt: skip
            # contiguous blocks of the rows still to do (batches as a single process runs them)
            todo[polarity] = info.block(remaining, multiple=config.batch_size)
        plans.append((trait, paths, todo, run_rows))
    if on_total is not None:
        on_total(sum(len(rows) for _, _, todo, _ in plans for rows in todo.values()))

    batcher = _Batcher(engine, config.batch_size)
    results = []
    total_tokens = 0
    # every process starts generating together, once the slot files exist (no-op for one process)
    barrier(info)
    generation_started = time.perf_counter()
    engine_seconds, merge_seconds, own_rows, own_tokens = 0.0, 0.0, 0, 0
    journal = BackgroundWrites("tracekit-journal")
    for trait, paths, todo, run_rows in plans:
        result = TraitResult(trait=trait.name, root=paths.root, rows={})
        if steer is not None:
            result.steering = steer.describe()
        for polarity in config.polarities:
            rows = todo[polarity]
            built = [_build(loaded, config, row.question, row.instruction) for row in rows]

            def on_output(
                start: int,
                end: int,
                out: Any,
                *,
                _rows=rows,
                _built=built,
                _polarity=polarity,
                _paths=paths,
                _result=result,
            ) -> None:
                records = []
                for i, row in enumerate(_rows[start:end]):
                    records.append(
                        {
                            "id": row.id,
                            "question": row.question,
                            "instruction": row.instruction,
                            "prompt": _built[start + i].text,
                            "response": out.texts[i],
                            "finish_reason": out.finish_reasons[i],
                            "n_tokens": len(out.response_ids[i]),
                        }
                    )
                pooled = {p.value: t.numpy() for p, t in out.pooled.items()}
                journal.submit(
                    store.write_batch_part,
                    _paths,
                    _polarity,
                    records,
                    pooled or None,
                    tag=info.part_tag(),
                )
                _result.generated += len(records)
                _result.tokens += out.n_new_tokens
                if on_batch is not None:
                    on_batch(len(records), out.n_new_tokens)

            batch_started = time.perf_counter()
            try:
                batcher.run(
                    [b.ids for b in built],
                    [row_seed(config.seed, polarity, row.id) for row in rows],
                    params,
                    capture,
                    on_output,
                    run_rows[polarity],
                    steering=steer.steering if steer is not None else None,
                )
            finally:
                journal.drain()  # every finished batch on disk, also when the run failed
            engine_seconds += time.perf_counter() - batch_started
            own_rows += len(rows)
        own_tokens += result.tokens
        if info.distributed:
            # returns once every process journaled its shard: then all of them merge
            counts = all_gather(info, (result.generated, result.tokens))
            result.generated = sum(c[0] for c in counts)
            result.tokens = sum(c[1] for c in counts)
        total_tokens += result.tokens
        finalize_started = time.perf_counter()
        _finalize(config, loaded, trait, paths, layers, result, template, judge_config, info, steer)
        merge_seconds += time.perf_counter() - finalize_started
        results.append(result)
    journal.close()
    processes = all_gather(
        info,
        {
            "rank": info.rank,
            "device": _device_label(loaded),
            "rows": own_rows,
            "tokens": own_tokens,
            "engine_seconds": round(engine_seconds, 3),
            "setup_seconds": round(float(getattr(engine, "setup_seconds", 0.0)), 3),
            "setup_parts": {
                name: round(float(seconds), 3)
                for name, seconds in getattr(engine, "setup_parts", {}).items()
            },
            "load_seconds": round(load_seconds, 3),
            "merge_seconds": round(merge_seconds, 3),
            "journal_wait_seconds": round(journal.wait_seconds, 3),
        },
    )
    return GenerateResult(
        model=loaded.name,
        model_weights={k: v for k, v in loaded.provenance().items() if k != "model"},
        traits=results,
        seconds=time.perf_counter() - started,
        tokens=total_tokens,
        batch_size=batcher.batch_size,
        generation_seconds=time.perf_counter() - generation_started,
        processes=processes,
    )


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


def _finalize(
    config: GenerateConfig,
    loaded: LoadedModel,
    trait: TraitDefinition,
    paths: TraitPaths,
    layers: tuple[int, ...],
    result: TraitResult,
    template: str,
    judge_config: Any = None,
    info: ProcessInfo | None = None,
    steer: SteeringSet | None = None,
) -> None:
    """Rebuild the CSVs, activation files, metadata and generation cache from the journal;
    judge the rows when a judge is configured.

    Called by every process of a data-parallel run once all shards are journaled. The main
    process writes the CSVs, judges, and writes the cache and metadata; the activation files
    (one ``.npy``/``_ids.npy`` set per polarity and pooling, and ``.pt`` with ``--pt``:
    hundreds of MB to GBs each with every layer captured) are shared out between the
    processes. A complete run's ``.npy`` files are its slot files, renamed.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tracekit.storage.activation_slots import finalize_activation_file

    info = info or ProcessInfo()
    wanted = set(range(config.n_examples))
    polarities = config.polarities
    journal = {polarity: store.read_parts(paths, polarity) for polarity in polarities}
    ids: dict[str, list[int]] = {}
    for polarity in polarities:
        ids[polarity] = sorted(i for i in journal[polarity] if i in wanted)
        result.rows[polarity] = len(ids[polarity])
    skip = False
    if info.is_main:
        complete = all(paths.responses_csv(p).is_file() for p in polarities)
        if judge_config is not None:
            complete = complete and all(
                _has_scores(paths.responses_csv(p), config.judge_metrics) for p in polarities
            )
        skip = result.generated == 0 and complete and paths.metadata.is_file()
    if all_gather(info, skip)[0]:  # the main process decides for all
        if info.is_main:
            logger.info("%s: all %d rows per polarity already done", trait.name, config.n_examples)
            result.files = _existing_files(paths, polarities)
        return

    # activation files: job k (a polarity and a pooling) is process k % N's, a few at a time
    poolings = [p.value for p in config.pooling] if config.extract_activations else []
    jobs = [(polarity, pooling) for polarity in polarities for pooling in poolings]
    mine = jobs[info.rank :: info.world_size]
    row_shape = (len(layers), loaded.hidden_size)
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, len(mine))))
    futures = [
        pool.submit(finalize_activation_file, paths, pol, pooling, ids[pol], row_shape, config.pt)
        for pol, pooling in mine
    ]
    files: list[Path] = []
    failure: Exception | None = None
    try:
        if info.is_main:
            rows = {p: [journal[p][i] for i in ids[p]] for p in polarities}
            files += _write_rows(config, loaded, trait, paths, result, judge_config, rows)
    except Exception as exc:  # every process learns of a failure below, then all stop
        failure = exc
    for future in futures:
        try:
            future.result()
        except Exception as exc:
            failure = failure or exc
    pool.shutdown(wait=True)
    failures = all_gather(info, None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if any(failures):
        raise ModelError(
            f"another process failed to merge activation files: {next(f for f in failures if f)}",
            "run again to resume (the journal is kept), or pass --force to regenerate",
        )
    if not info.is_main:
        return
    for polarity, pooling in jobs:
        files += [paths.ids_file(polarity, pooling), paths.activation_file(polarity, pooling)]
        if config.pt:
            files.append(paths.activation_file(polarity, pooling, ".pt"))
    if config.extract_activations:
        store.write_json(
            paths.activations_metadata,
            activation_metadata(
                loaded, layers, poolings, result.rows, "generate",
                previous=paths.activations_metadata,
            ),
        )  # fmt: skip
        files.append(paths.activations_metadata)
    metadata = _metadata(config, loaded, trait, layers, result, template)
    if steer is not None:
        metadata["steering"] = steer.describe()
        metadata["prompts"] = config.steer_prompts
    write_json(paths.metadata, metadata)
    files.append(paths.metadata)
    result.files = files


def _write_rows(
    config: GenerateConfig,
    loaded: LoadedModel,
    trait: TraitDefinition,
    paths: TraitPaths,
    result: TraitResult,
    judge_config: Any,
    journal_rows: dict[Polarity, list[dict[str, Any]]],
) -> list[Path]:
    """The main process's part of the merge: CSVs (judged when a judge is set) and caches,
    from the journal's rows of this run (by polarity, in id order)."""
    files: list[Path] = []
    for polarity in config.polarities:
        rows = _carry_extra_columns(paths.responses_csv(polarity), journal_rows[polarity])
        store.write_responses_csv(paths.responses_csv(polarity), rows)
        if judge_config is not None and rows:
            rows = _judge(judge_config, trait, rows, loaded, config)
            store.write_responses_csv(paths.responses_csv(polarity), rows)
            passing = result.passing if result.passing is not None else {}
            passing[polarity] = sum(
                1
                for r in rows
                if r.get("trait_score") is not None
                and (r["trait_score"] >= config.threshold) == (polarity == "pos")
            )
            result.passing = passing
        files.append(paths.responses_csv(polarity))
        if config.generation_cache:
            files += _save_cache(config, loaded, trait, paths, polarity, rows)
    return files


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


def _judge(
    judge_config: Any,
    trait: TraitDefinition,
    rows: list[dict[str, Any]],
    loaded: LoadedModel,
    config: GenerateConfig,
) -> list[dict[str, Any]]:
    """Rows with the judge's columns (``trait_score``, ...); cached answers are not re-asked."""
    from tracekit.judge import judge_rows

    # a local judge that is the generation model itself reuses the loaded weights
    lend = loaded if config.judge_model in (config.model, loaded.name) else None
    judged = judge_rows(rows, judge_config, trait_prompt=trait.eval_prompt, model=lend)
    return [dict(r) for r in judged.rows]


def _has_scores(csv_path: Path, metrics: tuple[str, ...]) -> bool:
    """Whether every row of a responses CSV has a score column for each metric."""
    if not csv_path.is_file():
        return False
    rows = store.read_responses_csv(csv_path, ())
    return all(f"{m}_score" in r for r in rows for m in metrics)


def _existing_files(paths: TraitPaths, polarities: tuple[Polarity, ...]) -> list[Path]:
    found = [paths.responses_csv(p) for p in polarities]
    if paths.activations_dir.is_dir():
        found += sorted(paths.activations_dir.glob("*.npy"))
    return [p for p in found if p.exists()] + [paths.metadata]


def _carry_extra_columns(csv_path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep columns added to an earlier CSV (e.g. judge scores) for rows that still exist:
    same id and same response text, so a score never lands on a response it did not judge."""
    if not csv_path.is_file():
        return rows
    try:
        old = {
            (int(r["id"]), str(r.get("response", ""))): r
            for r in store.read_responses_csv(csv_path, ())
        }
    except Exception:  # an unreadable old CSV is rebuilt from the journal, which is the truth
        return rows
    merged = []
    for row in rows:
        extra = {
            k: v
            for k, v in old.get((int(row["id"]), str(row["response"])), {}).items()
            if k not in row and k not in store.RESPONSE_COLUMNS
        }
        merged.append({**row, **extra})
    return merged


def activation_metadata(
    loaded: LoadedModel,
    layers: tuple[int, ...],
    poolings: list[str],
    rows: dict[str, int],
    source: str,
    previous: Path | None = None,
) -> dict[str, Any]:
    """``activations/metadata.json``: what each pooling's files hold and how they were made.

    Entries for poolings not written now are kept from ``previous`` (an earlier metadata
    file), since their files stay; each pooling records its own layers and source.
    """
    import json

    entries: dict[str, Any] = {}
    if previous is not None and previous.is_file():
        try:
            entries = dict(json.loads(previous.read_text(encoding="utf-8")).get("poolings", {}))
        except (OSError, ValueError, AttributeError):
            entries = {}
    for pooling in poolings:
        entries[pooling] = {
            "source": source,
            "layers": list(layers),
            "shape": {p: [n, len(layers), loaded.hidden_size] for p, n in rows.items()},
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    return {
        **loaded.provenance(),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "layer_indexing": "0 = embedding output; i = residual stream after decoder block i-1 "
        "(before the final norm)",
        "files": {
            "activations": "{polarity}_{pooling}.npy and .pt (float32 [n_rows, n_layers, hidden])",
            "ids": "{polarity}_{pooling}_ids.npy (int64 row ids; pos and neg pair by id)",
        },
        "poolings": entries,
    }


def _metadata(
    config: GenerateConfig,
    loaded: LoadedModel,
    trait: TraitDefinition,
    layers: tuple[int, ...],
    result: TraitResult,
    template: str,
) -> dict[str, Any]:
    from tracekit import __version__

    return {
        **loaded.describe(),
        "tracekit_version": __version__,
        "experiment": config.experiment,
        "trait": trait.name,
        "template": template,
        "engine": config.engine,
        "generation": config.generation_params().model_dump(mode="json"),
        "n_examples": config.n_examples,
        "rows": result.rows,
        "extract_activations": config.extract_activations,
        "layers": list(layers) if config.extract_activations else None,
        "pooling": [p.value for p in config.pooling] if config.extract_activations else None,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _save_cache(
    config: GenerateConfig,
    loaded: LoadedModel,
    trait: TraitDefinition,
    paths: TraitPaths,
    polarity: Polarity,
    rows: list[dict[str, Any]],
) -> list[Path]:
    from tracekit.storage.generation_cache import save_generations_to_cache

    stem = (
        paths.root
        / "generations"
        / f"{polarity}_n{len(rows)}_t{config.temperature}_maxtok{config.max_new_tokens}"
    )
    files = save_generations_to_cache(
        stem,
        [str(r["prompt"]) + str(r["response"]) for r in rows],
        [str(r["response"]) for r in rows],
        {
            **loaded.provenance(),
            "trait": trait.name,
            "polarity": polarity,
            "experiment": config.experiment,
            "temperature": config.temperature,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
        },
        formats=("json",),  # as the seed cached; Markdown (and --limit) is decode's job
    )
    return [files.npy("completions"), files.metadata]
