"""The pooled activations of one trait, by polarity, with the layer number of each column."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracekit.errors import InputError
from tracekit.storage import activation_slots as activations
from tracekit.storage.experiment import Polarity, TraitPaths

if TYPE_CHECKING:
    import numpy as np


@dataclass
class PooledActivations:
    ids: dict[Polarity, np.ndarray]
    """Row ids per polarity (pos and neg rows pair by id)."""
    acts: dict[Polarity, np.ndarray]
    """``[n_rows, n_layers, hidden]`` per polarity."""
    layers: list[int]
    """tracekit layer number of each column (README "Layer indexing")."""
    metadata: dict[str, Any]
    """``activations/metadata.json`` ({} when the files came without one)."""
    source: str | None
    """How this pooling was computed (``generate`` or ``teacher-forced``), when recorded."""


def load_pooled(
    paths: TraitPaths, pooling: str, polarities: tuple[Polarity, ...] = ("pos", "neg")
) -> PooledActivations:
    """Read ``polarities``' activation files of ``pooling``; shapes and layer lists must agree."""
    metadata: dict[str, Any] = {}
    if paths.activations_metadata.is_file():
        metadata = json.loads(paths.activations_metadata.read_text(encoding="utf-8"))
    ids: dict[Polarity, np.ndarray] = {}
    acts: dict[Polarity, np.ndarray] = {}
    for polarity in polarities:
        ids[polarity], acts[polarity] = activations.load_activations(paths, polarity, pooling)
    shapes = {array.shape[1:] for array in acts.values()}
    if len(shapes) > 1:
        shown = " and ".join(str(acts[p].shape[1:]) for p in polarities)
        raise InputError(
            f"{' and '.join(polarities)} activations of {paths.root} have different shapes {shown}",
            "re-run 'tracekit extract activations --force'",
        )
    n_layers = next(iter(acts.values())).shape[1]
    entry = metadata.get("poolings", {}).get(pooling, {})
    layers = list(entry.get("layers") or range(n_layers))
    if len(layers) != n_layers:
        raise InputError(
            f"{paths.activations_metadata} lists {len(layers)} layers for {pooling} but the "
            f"files hold {n_layers}",
            "re-run 'tracekit extract activations --force'",
        )
    return PooledActivations(ids, acts, layers, metadata, entry.get("source"))
