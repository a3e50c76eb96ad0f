"""Figures of ``extract vectors`` (layer separation) and ``extract projections``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from tracekit.plots import png_figure

if TYPE_CHECKING:
    import numpy as np

    from tracekit.vectors.mean_diff import ExtractVectorsResult
    from tracekit.vectors.projections import ProjectionsResult


def plot_separation(result: ExtractVectorsResult, path: Path) -> None:
    """Two panels over the layers: Cohen's d (left) and AUROC (right, 0.5 = chance), the best
    layer marked; undefined values (too few pairs, zero spread) are left out of the lines."""
    layers = [s.layer for s in result.layers]
    best = result.best_layer
    with png_figure(path, 1, 2, figsize=(10, 3.8)) as (figure, (left, right)):
        for axis, name, values in (
            (left, "Cohen's d", [s.cohen_d for s in result.layers]),
            (right, "AUROC", [s.auroc for s in result.layers]),
        ):
            shown = [(x, y) for x, y in zip(layers, values, strict=True) if math.isfinite(y)]
            if shown:
                axis.plot(*zip(*shown, strict=True), marker="o", markersize=3)
            if best is not None:
                axis.axvline(best, color="tab:red", linestyle=":", label=f"best layer {best}")
                axis.legend(loc="lower right", fontsize=8)
            axis.set_xlabel("layer (0 = embeddings, i = after block i-1)")
            axis.set_ylabel(name)
            axis.grid(alpha=0.3)
        right.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        right.set_ylim(-0.02, 1.02)
        figure.suptitle(
            f"{result.trait} · {result.method} · {result.pooling} · {result.n_pairs} pairs "
            "(in-sample: the same pairs build and score the vector)",
            fontsize=10,
        )


def plot_projections(
    result: ProjectionsResult, pos: np.ndarray, neg: np.ndarray, path: Path
) -> None:
    """Left: AUROC of the projections per layer (0.5 = chance). Right: the pos and neg
    projections at the best-separating layer (AUROC, then Cohen's d) as histograms.
    ``pos``/``neg`` are ``[n_rows, n_layers]`` in ``result.layers`` order."""
    import numpy as np

    layers = [s.layer for s in result.layers]
    scores = [s.auroc for s in result.layers]
    finite = [j for j, a in enumerate(scores) if math.isfinite(a)]
    with png_figure(path, 1, 2, figsize=(10, 3.8)) as (figure, (left, right)):
        if finite:
            xs, ys = [layers[j] for j in finite], [scores[j] for j in finite]
            left.plot(xs, ys, marker="o", markersize=3)
        left.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        left.set_ylim(-0.02, 1.02)
        left.set_xlabel("layer (0 = embeddings, i = after block i-1)")
        left.set_ylabel("AUROC of pos vs neg projections")
        left.grid(alpha=0.3)
        if finite:
            d = [s.cohen_d if math.isfinite(s.cohen_d) else -math.inf for s in result.layers]
            j = max(finite, key=lambda k: (scores[k], d[k]))  # as extract vectors' best layer
            shown = [x[~np.isnan(x)] for x in (pos[:, j], neg[:, j])]
            bins = np.histogram_bin_edges(np.concatenate(shown), bins=20)
            for values, name, color in (
                (shown[0], "pos", "tab:red"),
                (shown[1], "neg", "tab:blue"),
            ):
                label = f"{name} ({len(values)} rows)"
                right.hist(values, bins=bins, alpha=0.5, color=color, label=label)
            right.set_title(f"layer {layers[j]} (AUROC {scores[j]:.3f})", fontsize=10)
            right.legend(fontsize=8)
        right.set_xlabel("projection a · v / |v|")
        right.set_ylabel("rows")
        figure.suptitle(
            f"{result.trait} · {result.pooling} · projection on {result.vector.name}", fontsize=10
        )
