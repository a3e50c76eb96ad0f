"""Feature normalization: fit statistics on one set of rows, apply them to any rows.

``standardize`` maps each column to ``(x - mean) / std`` (population std, ddof=0);
``minmax`` to ``(x - min) / (max - min)``; ``none`` leaves values alone. A constant column
(std or range 0) is divided by 1 instead, so it becomes 0 rather than NaN. Statistics are
accumulated in float64 over row chunks, so fitting never copies the whole matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tracekit.config.choices import Normalization

if TYPE_CHECKING:
    import numpy as np

_CHUNK_ROWS = 1024


def _row_chunks(n_rows: int, rows: Sequence[int] | np.ndarray | None) -> list[Any]:
    import numpy as np

    if rows is None:
        return [slice(i, min(i + _CHUNK_ROWS, n_rows)) for i in range(0, n_rows, _CHUNK_ROWS)]
    picked = np.asarray(rows, dtype=np.int64)
    return [picked[i : i + _CHUNK_ROWS] for i in range(0, len(picked), _CHUNK_ROWS)]


def fit_normalization(
    X: np.ndarray,
    method: Normalization | str = Normalization.standardize,
    rows: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Statistics of ``method`` over ``X[rows]`` (all rows when ``None``), as saved in a dataset.

    Returns ``{"norm_method": ..., "norm_mean"/"norm_std" | "norm_min"/"norm_max": float32 [d]}``.
    """
    import numpy as np

    method = Normalization(method)
    if method is Normalization.none:
        return {"norm_method": method.value}
    chunks = _row_chunks(X.shape[0], rows)
    count = X.shape[0] if rows is None else len(rows)
    if count == 0:
        raise ValueError("cannot fit a normalization on zero rows")
    if method is Normalization.minmax:
        low = np.full(X.shape[1], np.inf)
        high = np.full(X.shape[1], -np.inf)
        for chunk in chunks:
            block = X[chunk]
            np.minimum(low, block.min(axis=0), out=low)
            np.maximum(high, block.max(axis=0), out=high)
        return {
            "norm_method": method.value,
            "norm_min": low.astype(np.float32),
            "norm_max": high.astype(np.float32),
        }
    # standardize: Chan et al.'s pairwise merge of per-chunk (count, mean, M2)
    total = 0
    mean = np.zeros(X.shape[1])
    m2 = np.zeros(X.shape[1])
    for chunk in chunks:
        block = np.asarray(X[chunk], dtype=np.float64)
        k = block.shape[0]
        block_mean = block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta = block_mean - mean
        mean = mean + delta * (k / (total + k))
        m2 = m2 + block_m2 + delta**2 * (total * k / (total + k))
        total += k
    std = np.sqrt(m2 / total)
    return {
        "norm_method": method.value,
        "norm_mean": mean.astype(np.float32),
        "norm_std": std.astype(np.float32),
    }


def apply_normalization(
    X: np.ndarray, params: dict[str, Any], out: np.ndarray | None = None
) -> np.ndarray:
    """``X`` scaled with ``params`` from :func:`fit_normalization` (in place when ``out is X``)."""
    import numpy as np

    method = Normalization(params["norm_method"])
    if out is None:
        out = np.array(X, dtype=np.float32, copy=True)
    elif out is not X:
        out[...] = X
    if method is Normalization.none:
        return out
    if method is Normalization.standardize:
        shift, scale = params["norm_mean"], params["norm_std"]
    else:
        shift, scale = params["norm_min"], params["norm_max"] - params["norm_min"]
    scale = np.where(scale == 0, 1, scale).astype(out.dtype)
    for chunk in _row_chunks(out.shape[0], None):
        out[chunk] -= shift
        out[chunk] /= scale
    return out


def normalize_features(
    X: np.ndarray, method: Normalization | str = Normalization.standardize
) -> tuple[np.ndarray, dict[str, Any]]:
    """Seed API: ``(X_normalized, norm_params)`` with statistics fitted on all of ``X``.

    Fitting on everything is right for a dataset you will not split; for a train/test split
    fit on the training rows (:func:`fit_normalization` with ``rows``) so the test part does
    not leak into the statistics.
    """
    params = fit_normalization(X, method)
    return apply_normalization(X, params), params
