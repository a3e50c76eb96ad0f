"""Trait vectors files: the only writer and reader of ``vectors/{method}_{pooling}.npy`` and its
``.pt`` copy (float32 ``[n_layers, hidden]``), and of the ``[hidden]`` or ``[layers, hidden]``
vectors a user passes in (``.npy`` without pickle, ``.pt`` with ``weights_only``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from tracekit.errors import InputError
from tracekit.storage.atomic import save_npy, write_bytes

if TYPE_CHECKING:
    import numpy as np


def write_vectors(npy: Path, pt: Path, vectors: np.ndarray) -> list[Path]:
    """``vectors`` as ``npy`` and as the tensor file ``pt``, each written atomically."""
    import torch

    save_npy(npy, vectors)
    buffer = io.BytesIO()
    torch.save(torch.from_numpy(vectors), buffer)
    write_bytes(pt, buffer.getvalue())
    return [npy, pt]


def read_vectors(path: Path, what: str, missing_hint: str) -> np.ndarray:
    """The numbers in ``path``, ``[n_layers, hidden]`` or one ``[hidden]`` vector, as they are
    stored. Any problem is one :class:`InputError` that starts with ``what`` (the file's role,
    e.g. ``--steer-vector``): not found (``missing_hint`` says what to do), not ``.npy``/``.pt``,
    unreadable (pickled objects included), or not a 1-D/2-D array of numbers."""
    import numpy as np

    if not path.is_file():
        raise InputError(f"{what}: file not found: {path}", missing_hint)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".pt"):
        raise InputError(
            f"{what}: {path} is neither .npy nor .pt",
            "pass a vectors file as 'tracekit extract vectors' writes it",
        )
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            import torch

            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"holds a {type(tensor).__name__}, not a tensor")
            array = tensor.float().numpy()
    except Exception as exc:  # a truncated, pickled or foreign file: say which
        raise InputError(
            f"{what}: cannot read {path}: {exc}", "pass a .npy or .pt tensor"
        ) from None
    if array.dtype.kind not in "fiu" or array.ndim not in (1, 2) or 0 in array.shape:
        raise InputError(
            f"{what}: {path} holds an array of shape {list(array.shape)} ({array.dtype}); "
            "expected [layers, hidden] or [hidden] numbers"
        )
    return array
