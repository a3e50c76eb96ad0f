"""``tracekit.extract_vectors``: stage 3, per-layer trait vectors from pos/neg activations.

Every method (``mean_diff``, ``pca_diff``, ``probe``: see :mod:`tracekit.vectors.methods`) uses
the same *pairs* (pos row ``k`` and neg row ``k``, matched by id, never by row order) that pass
the judge filter: pos ``trait_score >= threshold``; neg ``trait_score < 100 -
threshold`` (neg rule ``mirrored``, persona_vectors' ``generate_vec.py``; the default) or neg
``trait_score < threshold`` (neg rule ``same``); and, when any row has a ``coherence_score``,
``coherence_score >= min_coherence`` on both sides, a row without one failing. Without judge
scores every pair is used (the result says so).

Separation per layer, so a user sees which layer to pick: pos and neg activations are projected
on the layer's unit vector; Cohen's d of the projections (pooled standard deviation) and the
AUROC of pos-vs-neg projections (Mann-Whitney, ties count half). Both are in-sample: the same
pairs make the vector and score it, which flatters small runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.choices import NegRule, VectorExport, VectorMethod
from tracekit.config.extract_vectors import ExtractVectorsConfig
from tracekit.errors import InputError
from tracekit.storage import experiment as store
from tracekit.storage.atomic import check_writable, output_lock, write_json
from tracekit.storage.experiment import TraitPaths
from tracekit.vectors.gguf_export import (
    GgufExport,
    check_exportable,
    model_hint_from,
    write_control_vector,
)
from tracekit.vectors.inputs import PooledActivations, load_pooled
from tracekit.vectors.methods import compute_vectors

if TYPE_CHECKING:
    import numpy as np

SCORE_COLUMN = "trait_score"
COHERENCE_COLUMN = "coherence_score"


@dataclass
class LayerSeparation:
    layer: int
    norm: float
    cohen_d: float
    auroc: float


@dataclass
class ExtractVectorsResult:
    trait: str
    method: str
    pooling: str
    n_pairs: int
    judged: bool
    """False when no judge scores were found and every pair was used."""
    dropped: dict[str, int]
    """Rows left out per reason (failed the threshold, low coherence, no partner...)."""
    judge_filter: str | None
    """The filter applied, in words (None without judge scores)."""
    layers: list[LayerSeparation]
    seconds: float
    files: list[Path] = field(default_factory=list)
    gguf: GgufExport | None = None

    @property
    def best_layer(self) -> int | None:
        scored = [s for s in self.layers if not math.isnan(s.cohen_d)]
        return max(scored, key=lambda s: (s.auroc, s.cohen_d)).layer if scored else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (undefined separation values are null)."""
        return json_safe(
            {
                "trait": self.trait,
                "method": self.method,
                "pooling": self.pooling,
                "n_pairs": self.n_pairs,
                "judged": self.judged,
                "dropped": self.dropped,
                "judge_filter": self.judge_filter,
                "best_layer": self.best_layer,
                "layers": [
                    {"layer": s.layer, "norm": s.norm, "cohen_d": s.cohen_d, "auroc": s.auroc}
                    for s in self.layers
                ],
                "seconds": round(self.seconds, 3),
                "files": [str(f) for f in self.files],
                "gguf": None if self.gguf is None else _gguf_summary(self.gguf),
            }
        )


def _gguf_summary(export: GgufExport) -> dict[str, Any]:
    return {
        "path": str(export.path),
        "model_hint": export.model_hint,
        "directions": {str(layer): n for layer, n in export.directions.items()},
        "skipped_layers": export.skipped,
    }


def _score(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def neg_limit(threshold: float, neg_rule: NegRule) -> float:
    """Neg rows pass with ``trait_score`` below this."""
    return 100.0 - threshold if neg_rule == NegRule.mirrored else threshold


def describe_filter(
    threshold: float, min_coherence: float, neg_rule: NegRule, coherence: bool
) -> str:
    """The judge filter in words, as the summary prints it."""
    why = "100 - threshold, as persona_vectors" if neg_rule == NegRule.mirrored else "= threshold"
    text = (
        f"pos trait >= {threshold:g}, neg trait < {neg_limit(threshold, neg_rule):g} "
        f"(neg rule {neg_rule}: {why})"
    )
    if coherence:
        return f"{text}, coherence >= {min_coherence:g} on both sides"
    return f"{text}; no coherence scores, so no coherence filter"


def select_pairs(
    pos_rows: list[dict[str, Any]],
    neg_rows: list[dict[str, Any]],
    threshold: float,
    min_coherence: float,
    neg_rule: NegRule = NegRule.mirrored,
) -> tuple[list[int], str | None, dict[str, int]]:
    """Ids of pairs passing the judge filter, the filter in words (None when there were no
    judge scores and every pair was kept), and drop counts per reason."""
    pos = {int(r["id"]): r for r in pos_rows}
    neg = {int(r["id"]): r for r in neg_rows}
    rows = (*pos_rows, *neg_rows)
    judged = any(_score(r.get(SCORE_COLUMN)) is not None for r in rows)
    # coherence filters as soon as any row was scored for it; a row without a score then fails
    # (persona_vectors' pandas comparison is False for an empty cell)
    coherence = judged and any(_score(r.get(COHERENCE_COLUMN)) is not None for r in rows)
    limit = neg_limit(threshold, neg_rule)
    dropped = {"no partner": len(set(pos) ^ set(neg))}
    keep = []
    for row_id in sorted(set(pos) & set(neg)):
        if judged:
            p, n = _score(pos[row_id].get(SCORE_COLUMN)), _score(neg[row_id].get(SCORE_COLUMN))
            if p is None or n is None:
                dropped["unscored"] = dropped.get("unscored", 0) + 1
                continue
            if p < threshold or n >= limit:
                dropped["threshold"] = dropped.get("threshold", 0) + 1
                continue
            scores = [_score(r[row_id].get(COHERENCE_COLUMN)) for r in (pos, neg)]
            if coherence and any(c is None for c in scores):
                dropped["no coherence score"] = dropped.get("no coherence score", 0) + 1
                continue
            if coherence and any(c is not None and c < min_coherence for c in scores):
                dropped["coherence"] = dropped.get("coherence", 0) + 1
                continue
        keep.append(row_id)
    rule = describe_filter(threshold, min_coherence, neg_rule, coherence) if judged else None
    return keep, rule, dropped


def cohen_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """Standardized mean difference with the pooled standard deviation (nan if undefined)."""
    import numpy as np

    if len(pos) < 2 or len(neg) < 2:
        return float("nan")
    pooled = ((len(pos) - 1) * pos.var(ddof=1) + (len(neg) - 1) * neg.var(ddof=1)) / (
        len(pos) + len(neg) - 2
    )
    if pooled <= 0:
        return float("inf") if pos.mean() != neg.mean() else float("nan")
    return float((pos.mean() - neg.mean()) / np.sqrt(pooled))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a pos projection > a neg projection), ties counting half (Mann-Whitney U / n1 n2)."""

    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def layer_separation(
    pos: np.ndarray, neg: np.ndarray, vectors: np.ndarray, layers: list[int]
) -> list[LayerSeparation]:
    """Norm, Cohen's d and AUROC of projections on each layer's unit vector."""
    import numpy as np

    out = []
    for i, layer in enumerate(layers):
        vector = vectors[i].astype("float64")
        norm = float(np.linalg.norm(vector))
        unit = vector / norm if norm > 0 else vector
        p, n = pos[:, i].astype("float64") @ unit, neg[:, i].astype("float64") @ unit
        out.append(LayerSeparation(layer, norm, cohen_d(p, n), auroc(p, n)))
    return out


def json_safe(value: Any) -> Any:
    """JSON-safe copy: nan/inf (undefined separation) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def extract_vectors(config: ExtractVectorsConfig) -> ExtractVectorsResult:
    """Trait vectors for one trait; see the module docstring.

    Holds the trait folder's one-writer lock, as generate and extract activations do: it reads
    their activation files, and a writer of that folder removes stray temp files under it
    (``vectors/`` included) when it starts."""
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    with output_lock(paths.root):
        return _extract_vectors(config, paths)


def _extract_vectors(config: ExtractVectorsConfig, paths: TraitPaths) -> ExtractVectorsResult:
    started = time.perf_counter()
    stem = f"{config.method}_{config.pooling.value}"
    files = {
        "npy": paths.vectors_dir / f"{stem}.npy",
        "pt": paths.vectors_dir / f"{stem}.pt",
        "metadata": paths.vectors_dir / f"{stem}_metadata.json",
        "png": paths.vectors_dir / f"{stem}_separation.png",
        "gguf": paths.vectors_dir / f"{stem}.gguf",
    }
    wanted = {"npy", "pt", "metadata"} | ({"png"} if config.plot else set())
    wanted |= {"gguf"} if config.export == VectorExport.gguf else set()
    check_writable([path for key, path in files.items() if key in wanted], config.force)

    pooled = load_pooled(paths, config.pooling.value)
    if config.export == VectorExport.gguf:
        check_exportable(pooled.layers)
    ids, rule, dropped = _pairs(config, paths, pooled)
    pos = pooled.acts["pos"][_rows_of(pooled.ids["pos"], ids)]
    neg = pooled.acts["neg"][_rows_of(pooled.ids["neg"], ids)]
    vectors = compute_vectors(config.method, pos, neg)
    result = ExtractVectorsResult(
        trait=config.trait,
        method=config.method,
        pooling=config.pooling.value,
        n_pairs=len(ids),
        judged=rule is not None,
        dropped={k: v for k, v in dropped.items() if v},
        judge_filter=rule,
        layers=layer_separation(pos, neg, vectors, pooled.layers),
        seconds=0.0,
    )
    _write(config, paths, files, result, vectors, pooled, ids)
    result.files = [path for key, path in files.items() if key in wanted]
    result.seconds = time.perf_counter() - started
    return result


def _rows_of(row_ids: np.ndarray, ids: list[int]) -> list[int]:
    index = {int(i): k for k, i in enumerate(row_ids.tolist())}
    return [index[i] for i in ids]


def _pairs(
    config: ExtractVectorsConfig, paths: TraitPaths, pooled: PooledActivations
) -> tuple[list[int], str | None, dict[str, int]]:
    """:func:`select_pairs` over the CSV rows that have activations (responses appended after
    extraction have none); refuses when no pair is left."""
    rows = {}
    for polarity in ("pos", "neg"):
        have = set(pooled.ids[polarity].tolist())
        csv_rows = store.read_responses_csv(paths.responses_csv(polarity), ())
        rows[polarity] = [r for r in csv_rows if int(r["id"]) in have]
    ids, rule, dropped = select_pairs(
        rows["pos"], rows["neg"], config.threshold, config.min_coherence, config.neg_rule
    )
    if not ids:
        raise InputError(
            f"no pos/neg pairs of {config.trait} to build a vector from"
            + (f" (none pass the judge filter: {rule})" if rule is not None else ""),
            "lower --threshold or --min-coherence, or generate more examples",
        )
    return ids, rule, dropped


def _write(
    config: ExtractVectorsConfig,
    paths: TraitPaths,
    files: dict[str, Path],
    result: ExtractVectorsResult,
    vectors: np.ndarray,
    pooled: PooledActivations,
    ids: list[int],
) -> None:
    """The vectors (.npy, .pt), the llama.cpp export, the metadata and the PNG."""
    import json

    from tracekit.storage.vectors import write_vectors

    write_vectors(files["npy"], files["pt"], vectors)
    if config.export == VectorExport.gguf:
        trait_meta: dict[str, Any] = {}
        if paths.metadata.is_file():
            trait_meta = json.loads(paths.metadata.read_text(encoding="utf-8"))
        hint = config.gguf_model_hint or model_hint_from({**pooled.metadata, **trait_meta})
        result.gguf = write_control_vector(files["gguf"], vectors, pooled.layers, hint)
    judged = result.judged
    stem = files["npy"].stem
    write_json(
        files["metadata"],
        {
            **{k: v for k, v in result.to_dict().items() if k not in ("files", "seconds")},
            "shape": list(vectors.shape),
            "threshold": config.threshold if judged else None,
            "min_coherence": config.min_coherence if judged else None,
            "neg_rule": config.neg_rule if judged else None,
            "pair_ids": ids,
            "model": pooled.metadata.get("model"),
            "quantization": pooled.metadata.get("quantization"),
            "weights_sha256": pooled.metadata.get("weights_sha256"),
            "activations_source": pooled.source,
            "separation_note": "in-sample: the same pairs build the vector and score it",
            "unit_norm": config.method != VectorMethod.mean_diff,
            "files": {"vectors": f"{stem}.npy and {stem}.pt (float32 [n_layers, hidden])"},
        },
    )
    if config.plot:
        from tracekit.vectors.figures import plot_separation

        plot_separation(result, files["png"])
