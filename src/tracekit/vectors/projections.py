"""``tracekit.extract_projections``: monitor a trait by projecting activations on its vector.

For every row (pos and neg) and layer: the **scalar projection** ``a · v / |v|`` of the pooled
activation ``a`` on the layer's vector ``v`` — the length of ``a`` along ``v``'s direction,
in the residual stream's units, so it does not depend on how the vector was scaled (a
``mean_diff`` vector and its unit version give the same numbers). The activations may be of
any experiment (e.g. another model checkpoint, a steered run, new prompts), the vector of any
trait; rows are not judge-filtered (monitoring looks at everything).

Written to ``EXP/T/projections/{pooling}_on_{vector stem}``: ``.csv`` (one line per row and
layer: id, polarity, layer, projection), ``.npy`` (float32 ``[n_rows, n_layers]``, pos rows by
id then neg rows by id), ``_summary.json`` (row order, layers, the vector file and its
SHA-256, and per layer how well the projection separates pos from neg: means, Cohen's d,
AUROC) and ``.png`` (AUROC per layer; the pos and neg projections at the best layer).

Which vector belongs to which layer: a vectors file written by ``extract vectors`` has a
``{stem}_metadata.json`` beside it listing its layers; those are matched to the activations'
layers by number. A ``[n_layers, hidden]`` file without one must have exactly the activations'
layers, in their order; one ``[hidden]`` vector is used at every layer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.extract_projections import ProjectionsConfig
from tracekit.config.types import LayerSpec
from tracekit.errors import InputError
from tracekit.storage.atomic import check_writable, save_npy, write_json, write_text
from tracekit.storage.experiment import Polarity, TraitPaths
from tracekit.vectors.inputs import PooledActivations, load_pooled
from tracekit.vectors.mean_diff import auroc, cohen_d, json_safe

if TYPE_CHECKING:
    import numpy as np

DEFINITION = "a · v / |v| (scalar projection of the pooled activation on the layer's vector)"


@dataclass
class LayerProjection:
    layer: int
    n_pos: int
    n_neg: int
    mean_pos: float
    mean_neg: float
    cohen_d: float
    auroc: float


@dataclass
class ProjectionsResult:
    trait: str
    pooling: str
    vector: Path
    layers: list[LayerProjection]
    seconds: float
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (undefined values are null)."""
        return json_safe(
            {
                "trait": self.trait,
                "pooling": self.pooling,
                "vector": str(self.vector),
                "projection": DEFINITION,
                "layers": [vars(s).copy() for s in self.layers],
                "seconds": round(self.seconds, 3),
                "files": [str(f) for f in self.files],
            }
        )


def load_vector_file(path: Path) -> tuple[np.ndarray, list[int] | None]:
    """``(vectors as float64 [n_layers, hidden] or [hidden], their layers or None)`` from a
    ``.npy`` (no pickle) or ``.pt`` (``weights_only``) file, with the layers from the
    ``{stem}_metadata.json`` that ``extract vectors`` writes beside it, if any."""
    from tracekit.storage.vectors import read_vectors

    array = read_vectors(path, "vectors file", "run 'tracekit extract vectors'")
    meta = path.with_name(f"{path.stem}_metadata.json")
    layers = None
    if array.ndim == 2 and meta.is_file():
        recorded = json.loads(meta.read_text(encoding="utf-8")).get("layers") or []
        layers = [int(row["layer"]) for row in recorded]
        if len(layers) != len(array):
            layers = None  # not this file's metadata after all
    return array.astype("float64"), layers


def _vector_rows(
    array: np.ndarray, vector_layers: list[int] | None, pooled: PooledActivations, path: Path
) -> dict[int, np.ndarray]:
    """tracekit layer -> the vector to project on, for every layer both sides have."""
    hidden = next(iter(pooled.acts.values())).shape[2]
    if array.shape[-1] != hidden:
        raise InputError(
            f"{path} has vectors of width {array.shape[-1]} but the activations have {hidden}",
            "use a vector of the model the activations came from",
        )
    if array.ndim == 1:
        return {layer: array for layer in pooled.layers}
    if vector_layers is None:
        if len(array) != len(pooled.layers):
            raise InputError(
                f"{path} holds {len(array)} layers and no metadata naming them, but the "
                f"activations have {len(pooled.layers)}",
                "pass the vectors file that 'extract vectors' wrote (its _metadata.json "
                "names the layers)",
            )
        vector_layers = pooled.layers
    return {layer: array[i] for i, layer in enumerate(vector_layers) if layer in pooled.layers}


def _select_layers(
    config: ProjectionsConfig, available: list[int], vector_layers: list[int]
) -> list[int]:
    layers = [layer for layer in available if layer in vector_layers]
    if config.layers.is_all:
        chosen = layers
    else:
        missing = [layer for layer in config.layers.layers if layer not in layers]
        if missing:
            raise InputError(
                f"--layers: layer(s) {', '.join(map(str, missing))} not in both the activations "
                f"and the vectors (both have {LayerSpec(layers) if layers else 'none'})",
                "pick layers both files hold",
            )
        chosen = list(config.layers.layers)
    if not chosen:
        raise InputError(
            "the activations and the vectors share no layer",
            "use vectors built from activations of the same layers",
        )
    return chosen


def project(acts: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``acts [n, hidden] · v / |v|`` in float64 (nan for a zero vector)."""
    import numpy as np

    norm = float(np.linalg.norm(vector))
    if norm == 0:
        return np.full(len(acts), np.nan)
    return acts.astype("float64") @ (vector / norm)


def extract_projections(config: ProjectionsConfig) -> ProjectionsResult:
    """Projections of one trait's activations on a vector; see the module docstring."""
    import numpy as np

    started = time.perf_counter()
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    pooling = config.pooling.value
    vector_path = config.vector or paths.vectors_dir / f"{config.method}_{pooling}.npy"
    name = f"{pooling}_on_{vector_path.stem}"
    out_dir = paths.root / "projections"
    files = [out_dir / f"{name}.csv", out_dir / f"{name}.npy", out_dir / f"{name}_summary.json"]
    files += [out_dir / f"{name}.png"] if config.plot else []
    array, vector_layers = load_vector_file(vector_path)
    pooled = load_pooled(paths, pooling)
    by_layer = _vector_rows(array, vector_layers, pooled, vector_path)
    layers = _select_layers(config, pooled.layers, list(by_layer))
    check_writable(files, config.force)

    polarities: tuple[Polarity, ...] = ("pos", "neg")
    order = {p: np.argsort(pooled.ids[p], kind="stable") for p in polarities}
    values = {}  # polarity -> [n_rows, n_selected_layers]
    for p in polarities:
        acts = pooled.acts[p][order[p]]
        values[p] = np.stack(
            [project(acts[:, pooled.layers.index(k)], by_layer[k]) for k in layers], axis=1
        )
    summary = [
        _separation(layer, values["pos"][:, j], values["neg"][:, j])
        for j, layer in enumerate(layers)
    ]
    result = ProjectionsResult(config.trait, pooling, vector_path, summary, 0.0, files)

    ids = {p: pooled.ids[p][order[p]].astype(int).tolist() for p in polarities}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "polarity", "layer", "projection"])
    for p in polarities:
        for row, row_id in enumerate(ids[p]):
            for j, layer in enumerate(layers):
                writer.writerow([row_id, p, layer, repr(float(values[p][row, j]))])
    write_text(files[0], buffer.getvalue())
    save_npy(files[1], np.concatenate([values["pos"], values["neg"]]).astype("float32"))
    result.seconds = time.perf_counter() - started
    write_json(
        files[2],
        {
            **result.to_dict(),
            "experiment": config.experiment,
            "vector_sha256": hashlib.sha256(vector_path.read_bytes()).hexdigest(),
            "model": pooled.metadata.get("model"),
            "activations_source": pooled.source,
            "npy": "float32 [n_rows, n_layers]: pos rows by id, then neg rows by id; "
            "columns in the order of 'layers'",
            "ids": ids,
        },
    )
    if config.plot:
        from tracekit.vectors.figures import plot_projections

        plot_projections(result, values["pos"], values["neg"], files[3])
    return result


def _separation(layer: int, pos: np.ndarray, neg: np.ndarray) -> LayerProjection:
    """Means, Cohen's d and AUROC of one layer's projections (nan values left out)."""
    import numpy as np

    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    return LayerProjection(
        layer,
        len(pos),
        len(neg),
        float(pos.mean()) if len(pos) else float("nan"),
        float(neg.mean()) if len(neg) else float("nan"),
        cohen_d(pos, neg),
        auroc(pos, neg),
    )
