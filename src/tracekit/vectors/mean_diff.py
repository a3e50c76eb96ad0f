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
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tracekit.config.base import TracekitConfig
from tracekit.errors import InputError
from tracekit.generation.pooling import Pooling
from tracekit.storage import experiment as store
from tracekit.storage.atomic import check_writable, save_npy, write_bytes, write_json
from tracekit.storage.experiment import TraitPaths
from tracekit.vectors.methods import Method, compute_vectors

if TYPE_CHECKING:
    import numpy as np

SCORE_COLUMN = "trait_score"
COHERENCE_COLUMN = "coherence_score"

NegRule = Literal["mirrored", "same"]
"""Which neg rows pass the judge filter: ``mirrored`` keeps neg ``trait < 100 - threshold``
(persona_vectors' ``generate_vec.py``), ``same`` keeps neg ``trait < threshold``."""


class ExtractVectorsConfig(TracekitConfig):
    """Options of ``tracekit extract vectors``."""

    experiment: str
    trait: str
    experiments_dir: Path = Path("experiments")
    method: Method = "mean_diff"
    pooling: Pooling = Pooling.response_avg
    threshold: float = Field(default=50.0, ge=0.0, le=100.0)
    min_coherence: float = Field(default=50.0, ge=0.0, le=100.0)
    neg_rule: NegRule = "mirrored"
    plot: bool = True
    force: bool = False


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

    @property
    def best_layer(self) -> int | None:
        scored = [s for s in self.layers if not math.isnan(s.cohen_d)]
        return max(scored, key=lambda s: (s.auroc, s.cohen_d)).layer if scored else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (undefined separation values are null)."""
        return _finite(
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
            }
        )


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
    return 100.0 - threshold if neg_rule == "mirrored" else threshold


def describe_filter(
    threshold: float, min_coherence: float, neg_rule: NegRule, coherence: bool
) -> str:
    """The judge filter in words, as the summary prints it."""
    why = "100 - threshold, as persona_vectors" if neg_rule == "mirrored" else "below threshold"
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
    neg_rule: NegRule = "mirrored",
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


def _finite(value: Any) -> Any:
    """JSON-safe copy: nan/inf (undefined separation) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def extract_vectors(config: ExtractVectorsConfig) -> ExtractVectorsResult:
    """Trait vectors for one trait; see the module docstring."""
    import io
    import json

    import torch

    started = time.perf_counter()
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    stem = f"{config.method}_{config.pooling.value}"
    vector_file = paths.vectors_dir / f"{stem}.npy"
    meta_file = paths.vectors_dir / f"{stem}_metadata.json"
    plot_file = paths.vectors_dir / f"{stem}_separation.png"
    outputs = [vector_file, vector_file.with_suffix(".pt"), meta_file]
    check_writable([*outputs, plot_file] if config.plot else outputs, config.force)

    acts_meta: dict[str, Any] = {}
    if paths.activations_metadata.is_file():
        acts_meta = json.loads(paths.activations_metadata.read_text(encoding="utf-8"))
    pos_ids, pos_acts = store.load_activations(paths, "pos", config.pooling.value)
    neg_ids, neg_acts = store.load_activations(paths, "neg", config.pooling.value)
    if pos_acts.shape[1:] != neg_acts.shape[1:]:
        raise InputError(
            f"pos and neg activations of {config.trait} have different shapes "
            f"{pos_acts.shape[1:]} and {neg_acts.shape[1:]}",
            "re-run 'tracekit extract activations --force'",
        )
    entry = acts_meta.get("poolings", {}).get(config.pooling.value, {})
    layers = list(entry.get("layers") or range(pos_acts.shape[1]))
    if len(layers) != pos_acts.shape[1]:
        raise InputError(
            f"{paths.activations_metadata} lists {len(layers)} layers for "
            f"{config.pooling.value} but the files hold {pos_acts.shape[1]}",
            "re-run 'tracekit extract activations --force'",
        )
    pos_rows = store.read_responses_csv(paths.responses_csv("pos"), ())
    neg_rows = store.read_responses_csv(paths.responses_csv("neg"), ())
    # rows without activations cannot be used (e.g. responses appended after extraction)
    pos_index = {int(i): k for k, i in enumerate(pos_ids.tolist())}
    neg_index = {int(i): k for k, i in enumerate(neg_ids.tolist())}
    pos_rows = [r for r in pos_rows if int(r["id"]) in pos_index]
    neg_rows = [r for r in neg_rows if int(r["id"]) in neg_index]
    ids, rule, dropped = select_pairs(
        pos_rows, neg_rows, config.threshold, config.min_coherence, config.neg_rule
    )
    judged = rule is not None
    if not ids:
        raise InputError(
            f"no pos/neg pairs of {config.trait} to build a vector from"
            + (f" (none pass the judge filter: {rule})" if judged else ""),
            "lower --threshold or --min-coherence, or generate more examples",
        )
    pos = pos_acts[[pos_index[i] for i in ids]]
    neg = neg_acts[[neg_index[i] for i in ids]]
    vectors = compute_vectors(config.method, pos, neg)
    separation = layer_separation(pos, neg, vectors, layers)

    result = ExtractVectorsResult(
        trait=config.trait,
        method=config.method,
        pooling=config.pooling.value,
        n_pairs=len(ids),
        judged=judged,
        dropped={k: v for k, v in dropped.items() if v},
        judge_filter=rule,
        layers=separation,
        seconds=0.0,
    )
    save_npy(vector_file, vectors)
    buffer = io.BytesIO()
    torch.save(torch.from_numpy(vectors), buffer)
    write_bytes(paths.vectors_dir / f"{stem}.pt", buffer.getvalue())
    meta = {
        **{k: v for k, v in result.to_dict().items() if k not in ("files", "seconds")},
        "shape": list(vectors.shape),
        "threshold": config.threshold if judged else None,
        "min_coherence": config.min_coherence if judged else None,
        "neg_rule": config.neg_rule if judged else None,
        "pair_ids": ids,
        "model": acts_meta.get("model"),
        "activations_source": entry.get("source"),
        "separation_note": "in-sample: the same pairs build the vector and score it",
        "unit_norm": config.method != "mean_diff",
        "files": {"vectors": f"{stem}.npy and {stem}.pt (float32 [n_layers, hidden])"},
    }
    write_json(meta_file, meta)
    result.files = [vector_file, paths.vectors_dir / f"{stem}.pt", meta_file]
    if config.plot:
        from tracekit.vectors.figures import plot_separation

        plot_separation(result, plot_file)
        result.files.append(plot_file)
    result.seconds = time.perf_counter() - started
    return result
