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
from typing import TYPE_CHECKING, Any

from pydantic import field_validator

from tracekit.config.types import BatchSize, LayerSpec
from tracekit.errors import ConfigError, InputError
from tracekit.generation.engine import CaptureSpec
from tracekit.generation.pooling import Pooling, Poolings
from tracekit.generation.run import RuntimeOptions, check_name
from tracekit.storage import experiment as store
from tracekit.storage.atomic import check_writable, write_json
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

    from tracekit.generation.teacher_forced import pooled_forward
    from tracekit.models.loading import load_model

    started = time.perf_counter()
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    tables = {
        p: store.read_responses_csv(paths.responses_csv(p), ("question", "response"))
        for p in POLARITIES
    }
    poolings = tuple(p.value for p in config.pooling)
    outputs = [paths.activation_file(pol, pooling) for pol in POLARITIES for pooling in poolings]
    check_writable(outputs, config.force)
    loaded = loaded or load_model(config.model_settings())
    try:
        layers = config.layers.resolve(loaded.n_layers)
    except ValueError as exc:
        raise ConfigError(f"--layers: {exc} for {loaded.name}") from None
    capture = CaptureSpec(layers, config.pooling)
    if on_total is not None:
        on_total(sum(len(rows) for rows in tables.values()))

    result = ExtractActivationsResult(config.trait, {}, layers, poolings, 0.0)
    for polarity, rows in tables.items():
        rows = sorted(rows, key=lambda r: int(r["id"]))
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
        for start in range(0, len(rows), config.batch_size):
            end = start + config.batch_size
            pooled = pooled_forward(loaded, prompts[start:end], responses[start:end], capture)
            for pooling, tensor in pooled.items():
                chunks[pooling.value].append(tensor.numpy())
            if on_batch is not None:
                on_batch(len(rows[start:end]), sum(len(r) for r in responses[start:end]))
        empty = np.zeros((0, len(layers), loaded.hidden_size), dtype=np.float32)
        arrays = {p: np.concatenate(c) if c else empty for p, c in chunks.items()}
        result.files += store.save_activations(
            paths, polarity, [int(r["id"]) for r in rows], arrays
        )
        result.rows[polarity] = len(rows)
    if not any(result.rows.values()):
        raise InputError(f"no responses in {paths.responses_dir}", "run 'tracekit generate' first")

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
