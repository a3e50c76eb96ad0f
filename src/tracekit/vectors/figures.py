"""The layer-separation figure of ``extract vectors``: Cohen's d and AUROC per layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from tracekit.plots import png_figure

if TYPE_CHECKING:
    from tracekit.vectors.mean_diff import ExtractVectorsResult


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
