"""``tracekit.extract_activations``: stage 2, teacher-forced pooled activations for saved responses.

Reads ``responses/{pos,neg}.csv`` of a trait (written by ``generate`` or by anything else, e.g.
a vLLM run; see :data:`~tracekit.storage.experiment.REQUIRED_COLUMNS`), re-tokenizes each row as
``prompt`` ids + ``response`` ids and runs one batched forward per batch through
:func:`~tracekit.generation.teacher_forced.pooled_forward` (the same pooling code and
definitions as capture during generation). A row with an empty ``prompt`` gets one built from
``question`` and ``instruction`` with the model's chat template.

Re-tokenizing response *text* can split it differently from the ids the model generated;
activations then differ slightly from those captured during ``generate`` (which uses the ids).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator

from tracekit.config.types import BatchSize, LayerSpec
from tracekit.distributed import barrier, process_info
from tracekit.errors import ConfigError, InputError
from tracekit.generation.engine import CaptureSpec
from tracekit.generation.pooling import Pooling, Poolings
from tracekit.generation.run import RuntimeOptions, check_name, model_settings_for
from tracekit.storage import experiment as store
from tracekit.storage.atomic import check_writable, save_npz, write_json
from tracekit.storage.experiment import POLARITIES, TraitPaths

if TYPE_CHECKING:
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)


class ExtractActivationsConfig(RuntimeOptions):
    """Options of ``tracekit extract activations``."""

    experiment: str
    trait: str
    experiments_dir: Path = Path("experiments")
    batch_size: BatchSize = 8
    layers: LayerSpec = LayerSpec(None)
    pooling: Poolings = (Pooling.response_avg,)
    engine: Literal["auto", "hf", "cuda"] = "auto"
    """Teacher-forced forward: ``cuda`` = compiled blocks + flash attention
    (:mod:`tracekit.generation.cuda_forward`), ``hf`` = the model's own forward."""
    pt: bool = False
    """Also write each activation file as a ``.pt`` tensor (a second full copy on disk)."""
    force: bool = False

    @field_validator("experiment", "trait")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_name(value, "experiment or trait")


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
    """Teacher-forced activations for both polarities of one trait; see the module docstring."""
    import numpy as np

    from tracekit.generation.teacher_forced import pooled_batches
    from tracekit.models.loading import load_model

    started = time.perf_counter()
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    all_tables = {
        p: store.read_responses_csv(paths.responses_csv(p), ("question", "response"))
        for p in POLARITIES
    }
    poolings = tuple(p.value for p in config.pooling)
    outputs = [paths.activation_file(pol, pooling) for pol in POLARITIES for pooling in poolings]
    check_writable(outputs, config.force)
    info = process_info()
    loaded = loaded or load_model(model_settings_for(config, info))
    try:
        layers = config.layers.resolve(loaded.n_layers)
    except ValueError as exc:
        raise ConfigError(f"--layers: {exc} for {loaded.name}") from None
    capture = CaptureSpec(layers, config.pooling)
    # data-parallel: each process takes a contiguous block of the rows (in id order)
    tables = {
        p: info.block(sorted(rows, key=lambda r: int(r["id"])), multiple=config.batch_size)
        for p, rows in all_tables.items()
    }
    if on_total is not None:
        on_total(sum(len(rows) for rows in tables.values()))

    result = ExtractActivationsResult(config.trait, {}, layers, poolings, 0.0)
    shards = paths.activations_dir / "shards"
    for polarity, rows in tables.items():
        prompts = [_prompt_ids(loaded, config, r) for r in rows]
        responses = [
            [
                int(t)
                for t in loaded.tokenizer(str(r["response"] or ""), add_special_tokens=False)[
                    "input_ids"
                ]
            ]
            for r in rows
        ]
        chunks: dict[str, list[Any]] = {p: [] for p in poolings}
        for start, end, pooled in pooled_batches(
            loaded, prompts, responses, capture, config.batch_size, config.engine
        ):
            for pooling, tensor in pooled.items():
                chunks[pooling.value].append(tensor.numpy())
            if on_batch is not None:
                on_batch(end - start, sum(len(r) for r in responses[start:end]))
        empty = np.zeros((0, len(layers), loaded.hidden_size), dtype=np.float32)
        arrays = {p: np.concatenate(c) if c else empty for p, c in chunks.items()}
        ids = [int(r["id"]) for r in rows]
        result.rows[polarity] = len(all_tables[polarity])
        if info.distributed:
            shard: dict[str, Any] = {"ids": np.asarray(ids, dtype=np.int64), **arrays}
            save_npz(shards / f"{polarity}-rank{info.rank}.npz", **shard)
        else:
            result.files += store.save_activations(paths, polarity, ids, arrays, config.pt)
    if not any(result.rows.values()):
        raise InputError(f"no responses in {paths.responses_dir}", "run 'tracekit generate' first")
    if info.distributed:
        barrier(info)  # every shard file is written
        if not info.is_main:
            result.seconds = time.perf_counter() - started
            return result
        result.files += _merge_shards(paths, shards, info.world_size, poolings, config.pt)

    from tracekit.generation.run import activation_metadata

    write_json(
        paths.activations_metadata,
        activation_metadata(
            loaded,
            layers,
            list(poolings),
            result.rows,
            "teacher-forced",
            previous=paths.activations_metadata,
        ),
    )
    result.files.append(paths.activations_metadata)
    result.seconds = time.perf_counter() - started
    return result


def _merge_shards(
    paths: TraitPaths,
    shards: Path,
    world_size: int,
    poolings: tuple[str, ...],
    write_pt: bool = False,
) -> list[Path]:
    """Merge the processes' shard files into the single-process activation files (rows by id)."""
    import shutil

    import numpy as np

    files: list[Path] = []
    for polarity in POLARITIES:
        ids: list[np.ndarray] = []
        arrays: dict[str, list[np.ndarray]] = {p: [] for p in poolings}
        for rank in range(world_size):
            with np.load(shards / f"{polarity}-rank{rank}.npz", allow_pickle=False) as data:
                ids.append(data["ids"])
                for pooling in poolings:
                    arrays[pooling].append(data[pooling])
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        merged = {p: np.concatenate(a)[order] for p, a in arrays.items()}
        files += store.save_activations(paths, polarity, all_ids[order].tolist(), merged, write_pt)
    shutil.rmtree(shards)
    return files
