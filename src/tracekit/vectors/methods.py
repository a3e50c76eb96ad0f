"""How a trait vector is computed from paired pos/neg activations, one function per method.

Each takes ``pos`` and ``neg`` of shape ``[n_pairs, n_layers, hidden]`` (row ``k`` of both is
one pair) and returns float32 ``[n_layers, hidden]``:

- ``mean_diff``: mean(pos) − mean(neg); its norm is the distance between the two means.
- ``pca_diff`` (repeng's ``read_representations(method="pca_diff")``): the first principal
  component of the paired differences ``pos_k − neg_k``, centred as scikit-learn's ``PCA`` centres
  them; a unit vector whose sign makes its dot product with the mean difference positive.
  (repeng picks the sign by a vote of the pairs, pos projection above neg; the two agree unless
  the pairs are split nearly evenly, where the vote can tie and the mean cannot.)
- ``probe``: the weight of an L2-regularized logistic regression (scikit-learn, ``C=1``) that
  tells pos rows (1) from neg rows (0), fitted per layer on the activations centred per feature
  and divided by one number, the standard deviation of all their entries: a uniform scale
  does not turn the direction, and it makes ``C`` mean the same at every layer whatever the
  residual stream's magnitude there. Normalized to a unit vector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tracekit.config.choices import VectorMethod
from tracekit.errors import InputError

if TYPE_CHECKING:
    import numpy as np

PROBE_C = 1.0

MIN_PAIRS = {"mean_diff": 1, "pca_diff": 2, "probe": 1}
"""pca_diff needs two differences for a centred component to exist."""


def mean_diff_vectors(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``[n_layers, hidden]`` = mean over pairs of pos minus mean of neg (float32)."""
    return (pos.astype("float64").mean(axis=0) - neg.astype("float64").mean(axis=0)).astype(
        "float32"
    )


def pca_diff_vectors(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per layer, the unit first principal component of the centred paired differences, its
    sign aligned with the mean difference (float32)."""
    import numpy as np

    diffs = pos.astype("float64") - neg.astype("float64")
    out = np.zeros(diffs.shape[1:], dtype="float64")
    for layer in range(diffs.shape[1]):
        d = diffs[:, layer]
        mean = d.mean(axis=0)
        _, _, vt = np.linalg.svd(d - mean, full_matrices=False)
        component = vt[0]
        out[layer] = -component if component @ mean < 0 else component
    return out.astype("float32")


def probe_vectors(pos: np.ndarray, neg: np.ndarray, c: float = PROBE_C) -> np.ndarray:
    """Per layer, the unit weight of a logistic-regression probe, pos = 1 vs neg = 0 (float32)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    out = np.zeros(pos.shape[1:], dtype="float64")
    for layer in range(pos.shape[1]):
        x = np.concatenate([pos[:, layer], neg[:, layer]]).astype("float64")
        x -= x.mean(axis=0)
        scale = x.std()
        if scale > 0:
            x /= scale
        probe = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, labels)
        weight = probe.coef_[0]
        norm = np.linalg.norm(weight)
        out[layer] = weight / norm if norm > 0 else weight
    return out.astype("float32")


def compute_vectors(method: VectorMethod, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The ``method``'s vectors for paired ``pos``/``neg`` ``[n_pairs, n_layers, hidden]``."""
    if len(pos) < MIN_PAIRS.get(method, 1):
        raise InputError(
            f"--method {method} needs at least {MIN_PAIRS[method]} pairs; {len(pos)} passed the "
            "filters",
            "lower --threshold or --min-coherence, generate more examples, or use mean_diff",
        )
    if method == VectorMethod.pca_diff:
        return pca_diff_vectors(pos, neg)
    if method == VectorMethod.probe:
        return probe_vectors(pos, neg)
    if method == VectorMethod.mean_diff:
        return mean_diff_vectors(pos, neg)
    raise ValueError(f"unknown vector method {method!r}")
