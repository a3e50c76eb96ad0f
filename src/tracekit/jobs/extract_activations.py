"""``tracekit.extract_activations``: stage 2, teacher-forced pooled activations for saved responses.

Reads ``responses/{pos,neg}.csv`` of a trait (written by ``generate`` or by anything else, e.g.
a vLLM run; see :data:`~tracekit.storage.experiment.REQUIRED_COLUMNS`), re-tokenizes each row as
``prompt`` ids + ``response`` ids and runs one batched forward per batch through
:func:`~tracekit.engines.teacher_forced.pooled_forward` (the same pooling code and
definitions as capture during generation). A row with an empty ``prompt`` gets one built from
``question`` and ``instruction`` with the model's chat template.

Re-tokenizing response *text* can split it differently from the ids the model generated;
activations then differ slightly from those captured during ``generate`` (which uses the ids).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.extract_activations import ExtractActivationsConfig
from tracekit.config.generate import RuntimeOptions
from tracekit.distributed import barrier, process_info
from tracekit.engines.interface import CaptureSpec
from tracekit.errors import ConfigError, InputError
from tracekit.jobs.generate import model_settings_for
from tracekit.storage import activation_slots as activations
from tracekit.storage import experiment as store
from tracekit.storage.atomic import atomic_npy_memmap, check_writable, output_lock, write_json
from tracekit.storage.experiment import POLARITIES, Polarity, TraitPaths

if TYPE_CHECKING:
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class ExtractActivationsResult:
    trait: str
    rows: dict[str, int]
    layers: tuple[int, ...]
    poolings: tuple[str, ...]
    seconds: float
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trait": self.trait,
            "rows": self.rows,
            "layers": list(self.layers),
            "poolings": list(self.poolings),
            "seconds": round(self.seconds, 3),
            "files": [str(f) for f in self.files],
        }


def _prompt_ids(loaded: LoadedModel, config: RuntimeOptions, row: dict[str, Any]) -> list[int]:
    from tracekit.models.templates import build_prompt, encode_prompt_text

    prompt = row.get("prompt") or ""
    if prompt:
        return encode_prompt_text(loaded.tokenizer, prompt)
    built = build_prompt(
        loaded.tokenizer,
        str(row["question"]),
        row.get("instruction") or None,
        config.chat_template,
        model_name=loaded.name,
    )
    return built.ids


def extract_activations(
    config: ExtractActivationsConfig,
    on_batch: Callable[[int, int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    loaded: LoadedModel | None = None,
) -> ExtractActivationsResult:
    """Teacher-forced activations for both polarities of one trait; see the module docstring.

    Holds the trait folder's one-writer lock (the main process of a data-parallel run)."""
    root = TraitPaths.of(config.experiments_dir, config.experiment, config.trait).root
    with output_lock(root) if process_info().is_main else contextlib.nullcontext():
        return _extract_activations(config, on_batch, on_total, loaded)


def _extract_activations(
    config: ExtractActivationsConfig,
    on_batch: Callable[[int, int], None] | None,
    on_total: Callable[[int], None] | None,
    loaded: LoadedModel | None,
) -> ExtractActivationsResult:
    from tracekit.models.loading import load_model

    started = time.perf_counter()
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    all_tables = {
        p: store.read_responses_csv(paths.responses_csv(p), ("question", "response"))
        for p in POLARITIES
    }
    poolings = tuple(p.value for p in config.pooling)
    check_writable(activations.activation_outputs(paths, POLARITIES, poolings), config.force)
    if not config.force:
        store.check_activation_metadata(paths)
    info = process_info()
    loaded = loaded or load_model(model_settings_for(config, info))
    try:
        layers = config.layers.resolve(loaded.n_layers)
    except ValueError as exc:
        raise ConfigError(f"--layers: {exc} for {loaded.name}") from None
    ordered = {p: sorted(rows, key=lambda r: int(r["id"])) for p, rows in all_tables.items()}
    if not any(ordered.values()):
        raise InputError(f"no responses in {paths.responses_dir}", "run 'tracekit generate' first")
    # data-parallel: each process takes a contiguous block of the rows (in id order)
    spans = {p: info.block_range(len(rows), config.batch_size) for p, rows in ordered.items()}
    if on_total is not None:
        on_total(sum(len(span) for span in spans.values()))
    counts = {p: len(rows) for p, rows in ordered.items()}
    row_shape = (len(layers), loaded.hidden_size)
    staged = _stage_files(paths, poolings, counts, row_shape, info.is_main)
    barrier(info)

    result = ExtractActivationsResult(config.trait, {}, layers, poolings, 0.0)
    capture = CaptureSpec(layers, config.pooling)
    try:
        for polarity, rows in ordered.items():
            result.rows[polarity] = len(rows)
            span = spans[polarity]  # this process's block
            mine = rows[span.start : span.stop]
            _extract_rows(loaded, config, mine, capture, polarity, span.start, staged, on_batch)
        barrier(info)  # every process's rows are written
    except BaseException:
        if not info.distributed:  # (a data-parallel run's next start recreates them)
            for path in staged.values():
                path.unlink(missing_ok=True)
        raise
    if info.is_main:
        _publish(loaded, config, paths, result, ordered, staged)
    result.seconds = time.perf_counter() - started
    return result


def _stage_files(
    paths: TraitPaths,
    poolings: tuple[str, ...],
    counts: dict[Polarity, int],
    row_shape: tuple[int, int],
    create: bool,
) -> dict[tuple[Polarity, str], Path]:
    """The staged file of each polarity and pooling, which every process writes its rows
    straight into; ``create``: make them (the main process), ``counts[polarity]`` rows each."""
    staged = {
        (pol, pooling): _staged_file(paths, pol, pooling)
        for pol in POLARITIES
        for pooling in poolings
    }
    if create:
        for (pol, _), path in staged.items():
            _create_staged(path, (counts[pol], *row_shape))
    return staged


def _publish(
    loaded: LoadedModel,
    config: ExtractActivationsConfig,
    paths: TraitPaths,
    result: ExtractActivationsResult,
    ordered: dict[Polarity, list[dict[str, Any]]],
    staged: dict[tuple[Polarity, str], Path],
) -> None:
    """Move the staged files into place with their ids (and ``.pt`` copies), and write the
    activations' metadata (main process)."""
    for (polarity, pooling), path in staged.items():
        ids = [int(r["id"]) for r in ordered[polarity]]
        result.files += activations.publish_activation_file(
            paths, polarity, pooling, ids, config.pt, source=path
        )
    write_json(
        paths.activations_metadata,
        activations.activation_metadata(
            loaded,
            result.layers,
            list(result.poolings),
            result.rows,
            "teacher-forced",
            previous=paths.activations_metadata,
        ),
    )
    result.files.append(paths.activations_metadata)


def _staged_file(paths: TraitPaths, polarity: Polarity, pooling: str) -> Path:
    """Where one activation file is assembled before it replaces the old one."""
    return paths.activations_dir / f".tmp-{polarity}_{pooling}.npy.staged"


def _create_staged(path: Path, shape: tuple[int, ...]) -> None:
    """A float32 ``.npy`` of ``shape`` (sparse until rows are written), replacing one a crashed
    run left."""
    import numpy as np

    with atomic_npy_memmap(path, shape, np.float32):
        pass


def _extract_rows(
    loaded: LoadedModel,
    config: ExtractActivationsConfig,
    rows: list[dict[str, Any]],
    capture: CaptureSpec,
    polarity: Polarity,
    offset: int,
    staged: dict[tuple[Polarity, str], Path],
    on_batch: Callable[[int, int], None] | None,
) -> None:
    """Teacher-forced pooled activations of ``rows`` (this process's block, which starts at row
    ``offset`` of the polarity in id order), written into the staged files as batches finish."""
    import numpy as np

    from tracekit.engines.teacher_forced import pooled_batches

    if not rows:
        return
    prompts = [_prompt_ids(loaded, config, r) for r in rows]
    tokenize = loaded.tokenizer
    responses = [
        [int(t) for t in tokenize(str(r["response"] or ""), add_special_tokens=False)["input_ids"]]
        for r in rows
    ]
    targets = {
        pooling: np.load(staged[(polarity, pooling.value)], mmap_mode="r+", allow_pickle=False)
        for pooling in capture.poolings
    }
    for start, end, pooled in pooled_batches(
        loaded, prompts, responses, capture, config.batch_size, config.engine
    ):
        for pooling, tensor in pooled.items():
            targets[pooling][offset + start : offset + end] = tensor.numpy()
        if on_batch is not None:
            on_batch(end - start, sum(len(r) for r in responses[start:end]))
    for target in targets.values():
        target.flush()
