"""The ``build-dataset`` job: classifier datasets (X, y, metadata) from sentence feature files.

Strategies (seed 004): ``embedding-to-feature`` (X = embedding output, y = one SAE feature),
``hidden-to-feature`` (X = hidden state of the target layer, y = that layer's SAE feature) and
``hidden-to-concept`` (X = hidden states of one or more layers, concatenated; y = the concept
strength label). Samples are final tokens (``is_final_token``).

Unlike the seed, normalization statistics are fitted on the training rows only when a
train/test split is asked for, and inputs are read per file and sliced (see
:mod:`tracekit.storage.sentences`), so peak memory stays near the size of the output.

Files from other weights (``model``, ``quantization``, ``weights_sha256``) are refused before
any large read, and the dataset records the weights its inputs came from (``meta_model``, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.build_dataset import BuildDatasetConfig
from tracekit.config.choices import Strategy
from tracekit.datasets.normalization import apply_normalization, fit_normalization
from tracekit.datasets.split import split_indices
from tracekit.errors import InputError
from tracekit.storage.atomic import check_writable, save_npz
from tracekit.storage.sentences import (
    SEED_NUMBERING,
    FinalTokenData,
    get_final_token_data,
    load_all_sentences,
)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class BuildDatasetResult:
    """What ``build_dataset`` wrote."""

    output: Path
    strategy: str
    input_source: str
    input_layers: list[int]
    n_files: int
    n_samples: int
    x_shape: tuple[int, ...]
    norm_method: str
    target_layer: int | None = None
    target_feature: int | None = None
    average_l0: float | None = None
    sae_width: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    layer_numbering: str = "tracekit"
    provenance: dict[str, str | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "strategy": self.strategy,
            "input_source": self.input_source,
            "input_layers": self.input_layers,
            "n_files": self.n_files,
            "n_samples": self.n_samples,
            "x_shape": list(self.x_shape),
            "norm_method": self.norm_method,
            "target_layer": self.target_layer,
            "target_feature": self.target_feature,
            "average_l0": self.average_l0,
            "sae_width": self.sae_width,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "layer_numbering": self.layer_numbering,
            "provenance": self.provenance,
            "warnings": self.warnings,
            "notices": self.notices,
        }


def dataset_arrays(metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Metadata as NPZ arrays: ``norm_*`` keys as they are, every other key as ``meta_<key>``."""
    import numpy as np

    arrays: dict[str, np.ndarray] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        name = key if key.startswith("norm_") else f"meta_{key}"
        arrays[name] = np.asarray(value)
    return arrays


def save_dataset(
    X: np.ndarray,
    y: np.ndarray,
    metadata: Mapping[str, Any],
    output_path: str | Path,
    **extra: np.ndarray,
) -> Path:
    """Seed API: write ``X``, ``y``, ``metadata`` (as ``meta_*``/``norm_*``) to an NPZ atomically.

    Parent folders are created; an existing file is replaced (``build_dataset`` refuses that
    without ``force``). ``extra`` arrays are stored under their own names.
    """
    path = Path(output_path)
    arrays: dict[str, Any] = {"X": X, "y": y, **dataset_arrays(metadata), **extra}
    save_npz(path, **arrays)
    return path


def _select(config: BuildDatasetConfig) -> dict[str, Any]:
    """What to gather from the files for ``config.strategy``."""
    if config.strategy is Strategy.embedding_to_feature:
        return {"layers": [], "embeddings": True, "hidden_states": False, "labels": False}
    if config.strategy is Strategy.hidden_to_feature:
        return {
            "layers": [config.target_layer],
            "embeddings": False,
            "hidden_states": True,
            "labels": False,
        }
    if config.layer is not None:
        layers: list[int] | None = [config.layer]
    else:
        assert config.layers is not None
        layers = None if config.layers.is_all else list(config.layers.layers)
    return {"layers": layers, "embeddings": False, "hidden_states": True, "labels": True}


def build_dataset(
    config: BuildDatasetConfig,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> BuildDatasetResult:
    """Build and write the dataset that ``config`` describes; return what was written.

    ``on_progress(done, total)`` is called after each sentence file is read.
    """
    check_writable(config.output, config.force)
    sentences = load_all_sentences(config.input)
    target = None
    if config.strategy.predicts_feature:
        assert config.target_layer is not None and config.target_feature is not None
        target = (config.target_layer, config.target_feature)
    total = len(sentences)
    data = get_final_token_data(
        sentences,
        **_select(config),
        target=target,
        group_field=config.group_by if config.test_fraction is not None else None,
        on_file=None if on_progress is None else (lambda i: on_progress(i + 1, total)),
    )
    warnings, notices = _check_samples(config, data, total)
    X, source, input_layers = _inputs(config.strategy, data)
    y = data.target_activations if target is not None else data.labels
    assert y is not None

    train = test = None
    if config.test_fraction is not None:
        train, test = split_indices(data.n_samples, config.test_fraction, config.seed, data.groups)
    # fitted on the training rows only: the test part must not shape the statistics
    norm = fit_normalization(X, config.normalize, rows=train)
    apply_normalization(X, norm, out=X)

    metadata = _metadata(config, data, source, input_layers, X.shape[1])
    metadata.update(norm)
    result = BuildDatasetResult(
        output=config.output,
        strategy=config.strategy.value,
        input_source=source,
        input_layers=input_layers,
        n_files=total,
        n_samples=data.n_samples,
        x_shape=tuple(X.shape),
        norm_method=norm["norm_method"],
        target_layer=config.target_layer if target is not None else None,
        target_feature=config.target_feature if target is not None else None,
        average_l0=data.average_l0,
        sae_width=data.sae_width,
        layer_numbering=data.numbering,
        provenance=data.provenance,
        warnings=warnings,
        notices=notices,
    )
    if train is None or test is None:
        save_dataset(X, y, metadata, config.output)
    else:
        metadata.update(
            test_fraction=config.test_fraction, seed=config.seed, group_by=config.group_by
        )
        split: dict[str, Any] = {
            "X_train": X[train],
            "y_train": y[train],
            "X_test": X[test],
            "y_test": y[test],
            "train_indices": train,
            "test_indices": test,
        }
        del X, data  # the split copies replace the full matrix in the output
        split.update(dataset_arrays(metadata))
        save_npz(config.output, **split)
        result.n_train, result.n_test = len(train), len(test)
    for message in warnings:
        logger.warning(message)
    for message in notices:
        logger.info(message)
    return result


def _check_samples(
    config: BuildDatasetConfig, data: FinalTokenData, total: int
) -> tuple[list[str], list[str]]:
    """(warnings, notices) about the samples gathered from ``total`` files; none at all fails."""
    n = data.n_samples
    if n == 0:
        raise InputError(
            f"no final tokens in {total} sentence files under {config.input} "
            "(is_final_token is never True)",
            "re-run `tracekit extract features`; every sentence marks its last token",
        )
    warnings: list[str] = []
    if data.files_without_final_token:
        missing = data.files_without_final_token
        warnings.append(
            f"Only {n} samples (expected ~{total}): {len(missing)} sentence file(s) have no "
            f"final token, e.g. {missing[0].name}"
        )
    if config.strategy.predicts_feature:
        _check_average_l0(config, data.average_l0, warnings)
    for name, recorded in data.provenance_partial.items():
        warnings.append(
            f"only {recorded} of {total} sentence files record their {name}; the others may "
            f"come from other weights, so the dataset does not record it (no meta_{name})"
        )
    notices: list[str] = []
    if data.numbering == SEED_NUMBERING:
        notices.append(
            "the files have no 'layers' array (seed 004's layout): layer L is "
            "hidden_states[L], as in the seed, not README's numbering (where 0 is the "
            "embedding output)"
        )
    return warnings, notices


def _inputs(strategy: Strategy, data: FinalTokenData) -> tuple[np.ndarray, str, list[int]]:
    """(X, the array it comes from, its layers) for ``strategy``."""
    if strategy is Strategy.embedding_to_feature:
        assert data.embeddings is not None
        return data.embeddings, "embeddings", [0]
    assert data.hidden_states is not None
    # a view: layers concatenated per sample
    return data.hidden_states.reshape(data.n_samples, -1), "hidden_states", list(data.layers)


def _metadata(
    config: BuildDatasetConfig,
    data: FinalTokenData,
    source: str,
    input_layers: list[int],
    input_dims: int,
) -> dict[str, Any]:
    """The dataset's ``meta_*`` entries (the normalization's ``norm_*`` are added after)."""
    import numpy as np

    metadata: dict[str, Any] = {
        "strategy": config.strategy.value,
        "input_source": source,
        "input_layers": np.asarray(input_layers, dtype=np.int64),
        "input_dims": input_dims,
        "n_samples": data.n_samples,
        "sentence_indices": data.sentence_indices,
        "input_dir": str(config.input),
        "layer_numbering": data.numbering,
        # which weights X came from; "" for quantization: not quantized, as in the inputs
        **{name: value or "" for name, value in data.provenance.items()},
    }
    if config.strategy.predicts_feature:
        metadata["target_layer"] = config.target_layer
        metadata["target_feature"] = config.target_feature
        metadata["average_l0"] = np.nan if data.average_l0 is None else data.average_l0
        metadata["sae_width"] = data.sae_width
    return metadata


def _check_average_l0(
    config: BuildDatasetConfig, recorded: float | None, warnings: list[str]
) -> None:
    """``--average-l0`` names the SAE the feature id belongs to; the files must match it."""
    expected = config.average_l0
    if recorded is None:
        note = (
            f"the files record no average_l0s for layer {config.target_layer}; "
            "meta_average_l0 is NaN"
        )
        if expected is not None:
            raise InputError(
                f"average_l0 mismatch: --average-l0 {expected:g} was given but {note}",
                "drop --average-l0, or rebuild the files with an SAE that records its L0",
            )
        warnings.append(note)
        return
    # SAEs are named by their rounded average L0 (e.g. Gemma Scope's average_l0_84)
    if expected is not None and round(expected) != round(recorded):
        raise InputError(
            f"average_l0 mismatch: --average-l0 {expected:g} but the files' SAE at layer "
            f"{config.target_layer} has average L0 {recorded:g}",
            "the feature id belongs to another SAE: use the files written with that SAE, "
            "or take the feature id from this one",
        )
