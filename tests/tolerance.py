"""Tolerances for comparing numbers computed two ways (another batch, padding, kernel, library).

Equal math in another reduction order differs by a few units in the last place of the result's
*largest* values, not of each element: a sum of terms of size M carries an error of about
eps(dtype) * M * (a growth factor of the reduction length and the depth). So every such test
compares against ``rel(dtype) * max|want|``, never a fixed absolute number, which is too tight
where values are large (SmolLM2's residual stream reaches hundreds) and too loose where they
are small. The factors are ~100-1000 ulps: enough for any BLAS or thread count, and still
orders of magnitude below what a real bug gives (a wrong layer, position or padding token moves
values by O(max)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# relative to the largest magnitude of the expected values
REL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device and dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close_to_scale(got: Any, want: Any, dtype: str = "float32", rel: float | None = None):
    """Assert ``|got - want| <= rel * max|want|`` elementwise (shapes must match)."""
    g, w = _numpy(got), _numpy(want)
    assert g.shape == w.shape, (g.shape, w.shape)
    bound = (REL[dtype] if rel is None else rel) * max(float(np.abs(w).max(initial=0.0)), 1e-30)
    worst = float(np.abs(g - w).max(initial=0.0))
    assert worst <= bound, f"max |diff| {worst:.3g} > {bound:.3g} (= rel x max|want|, {dtype})"


def close_to_scale(got: Any, want: Any, dtype: str = "float32") -> bool:
    g, w = _numpy(got), _numpy(want)
    return g.shape == w.shape and bool(
        np.abs(g - w).max(initial=0.0) <= REL[dtype] * np.abs(w).max(initial=0.0)
    )
