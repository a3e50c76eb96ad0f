"""Writing sentence feature files: ``sentence_000000.npz``, ... (the build-dataset contract).

One atomic ``.npz`` per sentence, no object arrays. Seed-compatible arrays: ``embeddings``
``[n_fragments, d]``, ``hidden_states`` ``[n_layers, n_fragments, d]``, ``layers``,
``activations`` ``[n_layers, n_fragments, width]`` (dense layout), ``average_l0s``,
``concept_strength_label``, ``is_final_token``. tracekit additions: ``sae_width``,
``sae_storage``, ``sae_format``, ``sae_layers`` (the release's numbers), ``sentence``,
``tokens``, ``model``, and in the sparse layout ``act_values``/``act_indices``/``act_indptr``/
``act_shape`` (CSR over rows ``layer_pos * n_fragments + fragment``) instead of ``activations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.storage.atomic import save_npz

if TYPE_CHECKING:
    import numpy as np
    import torch

SENTENCE_FILE = re.compile(r"^sentence_(\d{6})\.npz$")
MANIFEST_NAME = "features.json"


def sentence_file(output: Path, index: int) -> Path:
    """Path of the file for CSV row ``index`` (0-based)."""
    return output / f"sentence_{index:06d}.npz"


def existing_sentence_files(output: Path) -> list[Path]:
    """The ``sentence_NNNNNN.npz`` files in ``output`` (none when it does not exist)."""
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir() if SENTENCE_FILE.match(p.name))


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


@dataclass(frozen=True)
class SaeMeta:
    """The per-file SAE metadata shared by every sentence of a run."""

    width: int
    average_l0s: list[float] | None  # None when no chosen SAE states its average L0
    release_layers: list[int]
    formats: str
    storage: str


def write_sentence_file(
    path: Path,
    *,
    embeddings: np.ndarray,
    hidden_states: np.ndarray,
    layers: list[int],
    label: int,
    sentence: str,
    tokens: list[str],
    model: str,
    sae: SaeMeta | None = None,
    activations: np.ndarray | None = None,
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Write one sentence file atomically in the layout above."""
    import numpy as np

    n_fragments = embeddings.shape[0]
    is_final = np.zeros(n_fragments, dtype=bool)
    is_final[-1] = True
    arrays: dict[str, Any] = {
        "embeddings": embeddings,
        "hidden_states": hidden_states,
        "layers": np.asarray(layers, dtype=np.int64),
        "concept_strength_label": np.int64(label),
        "is_final_token": is_final,
        "sentence": np.str_(sentence),
        "tokens": np.asarray(tokens, dtype=str),
        "model": np.str_(model),
    }
    if sae is not None:
        if sae.average_l0s is not None:
            arrays["average_l0s"] = np.asarray(sae.average_l0s, dtype=np.float64)
        arrays["sae_width"] = np.int64(sae.width)
        arrays["sae_storage"] = np.str_(sae.storage)
        arrays["sae_format"] = np.str_(sae.formats)
        arrays["sae_layers"] = np.asarray(sae.release_layers, dtype=np.int64)
        if sparse is not None:
            values, indices, indptr = sparse
            arrays["act_values"] = values
            arrays["act_indices"] = indices
            arrays["act_indptr"] = indptr
            arrays["act_shape"] = np.asarray([len(layers), n_fragments, sae.width], np.int64)
        else:
            arrays["activations"] = activations
    save_npz(path, **arrays)
