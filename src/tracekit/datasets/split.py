"""Train/test splitting of dataset rows, optionally keeping groups (e.g. sentences) together."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tracekit.errors import InputError

if TYPE_CHECKING:
    import numpy as np


def split_indices(
    n_samples: int,
    test_fraction: float,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_rows, test_rows)`` with about ``test_fraction`` of the rows in test.

    Without ``groups`` rows are shuffled with ``seed`` and the first ``round(f * n)`` (at least
    1, at most n-1) go to test. With ``groups``, whole groups are shuffled and moved to test
    until it holds at least that many rows, so rows sharing a group never straddle the split.
    """
    import numpy as np

    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be between 0 and 1 (exclusive)")
    if n_samples < 2:
        raise InputError(
            f"cannot split {n_samples} sample(s) into train and test",
            "use more sentences, or drop --test-fraction",
        )
    rng = np.random.default_rng(seed)
    wanted = min(max(int(round(test_fraction * n_samples)), 1), n_samples - 1)
    if groups is None:
        order = rng.permutation(n_samples)
        test = np.sort(order[:wanted])
        train = np.sort(order[wanted:])
        return train, test
    keys = np.asarray(groups)
    if keys.shape[0] != n_samples:
        raise ValueError(f"groups has {keys.shape[0]} entries for {n_samples} samples")
    unique, inverse = np.unique(keys, return_inverse=True)
    if len(unique) < 2:
        raise InputError(
            f"cannot split by group: all {n_samples} samples share one group ({unique[0]!r})",
            "group by a field that differs between sentences, or drop --group-by",
        )
    sizes = np.bincount(inverse, minlength=len(unique))
    in_test = np.zeros(len(unique), dtype=bool)
    taken = 0
    for group in rng.permutation(len(unique)):
        if taken >= wanted:
            break
        if taken + sizes[group] >= n_samples:  # keep at least one group for training
            continue
        in_test[group] = True
        taken += int(sizes[group])
    if not in_test.any():
        raise InputError(
            "cannot split by group: every group is too large for the test part",
            "use a finer --group-by field or a larger --test-fraction",
        )
    test_mask = in_test[inverse]
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
