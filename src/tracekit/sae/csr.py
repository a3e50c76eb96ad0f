"""SAE activations as CSR rows: computed on the device, sliced per sentence on the host.

The sparse layout of the sentence files (:mod:`tracekit.storage.sentences`) stores these three
arrays per file (``act_values``, ``act_indices``, ``act_indptr``) with rows
``layer_pos * n_fragments + fragment``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


def to_csr(acts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of a 2-D activation matrix ``[rows, width]``, computed on its own device.

    Returns numpy ``(values float32, indices int32, indptr int64)``; ``nonzero`` walks rows in
    order, so the entries of row r are ``indptr[r]:indptr[r + 1]`` with ascending feature ids.
    """
    import torch

    nz = acts.nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    values = acts[rows, cols].to(torch.float32)
    counts = torch.bincount(rows, minlength=acts.shape[0])
    indptr = torch.zeros(acts.shape[0] + 1, dtype=torch.int64, device=acts.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return (
        values.cpu().numpy(),
        cols.to(torch.int32).cpu().numpy(),
        indptr.cpu().numpy(),
    )


def take_csr_rows(
    csr: tuple[np.ndarray, np.ndarray, np.ndarray], row_ranges: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows ``[start, stop)`` of each range, concatenated in order, as a new CSR.

    One ``nonzero`` over a whole batch on the device, then this per sentence on the host, is
    much cheaper than one device round trip per sentence.
    """
    import numpy as np

    values, indices, indptr = csr
    taken_v, taken_i, counts = [], [], []
    for start, stop in row_ranges:
        lo, hi = int(indptr[start]), int(indptr[stop])
        taken_v.append(values[lo:hi])
        taken_i.append(indices[lo:hi])
        counts.append(np.diff(indptr[start : stop + 1]))
    new_indptr = np.zeros(sum(len(c) for c in counts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=new_indptr[1:])
    return np.concatenate(taken_v), np.concatenate(taken_i), new_indptr


def csr_to_dense(
    values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Dense ``[n_layers, n_fragments, width]`` from the sparse layout (for tests and tools)."""
    import numpy as np

    n_layers, n_fragments, width = (int(s) for s in shape)
    dense = np.zeros((n_layers * n_fragments, width), dtype=np.float32)
    rows = np.repeat(np.arange(n_layers * n_fragments), np.diff(indptr))
    dense[rows, indices] = values
    return dense.reshape(n_layers, n_fragments, width)
