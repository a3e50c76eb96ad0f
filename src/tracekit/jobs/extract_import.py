"""The seeds' ``activations/all_layers.pt`` (seed 002) and its import into tracekit's layout.

Seed 002's generate script saved one plain tensor per trait, ``activations/all_layers.pt``:
float ``[n_examples, n_layers, hidden]``, the rows of ``responses/pos.csv`` followed by those of
``responses/neg.csv``, next to its own ``activations/metadata.json``.
:func:`import_seed_activations` reads it with ``torch.load(weights_only=True)`` (no pickle
code runs) and writes ``{pos,neg}_{pooling}.npy`` + ``_ids.npy`` (ids from the CSVs, so
``extract vectors`` pairs and filters them like any tracekit run) and tracekit's
``activations/metadata.json``, which keeps the seed's metadata under ``seed_metadata``.
``all_layers.pt`` itself is left in place.

Layer numbering: entry ``i`` of the file's layer axis becomes layer ``first_layer + i``. The
default ``first_layer=0`` reads the file as Hugging Face's ``output_hidden_states`` (entry 0 the
embedding output), which is tracekit's numbering (README "Layer indexing"), except that HF's last
entry is taken after the final norm. A file of decoder-block outputs only (as many entries as the
model has blocks) needs ``first_layer=1``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.extract_import import ImportActivationsConfig
from tracekit.errors import InputError
from tracekit.storage import activation_slots as activations
from tracekit.storage import experiment as store
from tracekit.storage.atomic import check_writable, write_json
from tracekit.storage.experiment import POLARITIES, TraitPaths

if TYPE_CHECKING:
    import numpy as np

SEED_FILE = "all_layers.pt"
LAYER_INDEXING = (
    "seed all_layers.pt: file entry i = layer {first} + i (0 = embedding output; i = residual "
    "stream after decoder block i-1)"
)


@dataclass
class ImportActivationsResult:
    source: Path
    rows: dict[str, int]
    layers: tuple[int, ...]
    pooling: str
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "rows": self.rows,
            "layers": [self.layers[0], self.layers[-1]] if self.layers else [],
            "pooling": self.pooling,
            "files": [str(f) for f in self.files],
        }


def load_all_layers(path: Path) -> np.ndarray:
    """The seed's ``all_layers.pt`` as float32 ``[n, n_layers, hidden]`` (weights-only load)."""
    import numpy as np
    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only loader refuses anything but tensors/containers
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot read {path} as a tensor file: {message}",
            "all_layers.pt must be a plain tensor saved with torch.save",
        ) from None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shown = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(
            f"{path} holds {shown}, not a tensor [n_examples, n_layers, hidden]",
            "all_layers.pt must be seed 002's one tensor per trait",
        )
    if not tensor.is_floating_point():
        raise InputError(f"{path} holds {tensor.dtype} values, not floats")
    return np.ascontiguousarray(tensor.to(torch.float32).numpy())


def import_seed_activations(config: ImportActivationsConfig) -> ImportActivationsResult:
    """Import the seed's ``all_layers.pt`` of one trait; see the module docstring."""
    paths = TraitPaths.of(config.experiments_dir, config.experiment, config.trait)
    source = paths.activations_dir / SEED_FILE
    if not source.is_file():
        raise InputError(
            f"no seed activations to import: {source} not found",
            "this imports seed 002's activations/all_layers.pt; tracekit's own runs need no import",
        )
    tables = {
        p: store.read_responses_csv(paths.responses_csv(p), ("response",)) for p in POLARITIES
    }
    pooling: str = config.pooling
    check_writable(activations.activation_outputs(paths, POLARITIES, [pooling]), config.force)
    array = load_all_layers(source)
    counts: dict[str, int] = {p: len(rows) for p, rows in tables.items()}
    if array.shape[0] != counts["pos"] + counts["neg"]:
        raise InputError(
            f"{source} holds {array.shape[0]} rows but responses/pos.csv and neg.csv hold "
            f"{counts['pos']} + {counts['neg']}",
            "all_layers.pt must hold the rows of pos.csv, then those of neg.csv",
        )
    layers = tuple(range(config.first_layer, config.first_layer + array.shape[1]))
    seed_metadata, entries = _previous_metadata(paths.activations_metadata)
    result = ImportActivationsResult(source, counts, layers, pooling)
    start = 0
    for polarity in POLARITIES:
        ids = [int(r["id"]) for r in tables[polarity]]
        block: dict[str, Any] = {pooling: array[start : start + counts[polarity]]}
        result.files += activations.save_activations(paths, polarity, ids, block)
        start += counts[polarity]
    metadata = {
        "model": seed_metadata.get("model") if isinstance(seed_metadata, dict) else None,
        "dtype": "float32",
        "layer_indexing": LAYER_INDEXING.format(first=config.first_layer),
        "files": {
            "activations": "{polarity}_{pooling}.npy (float32 [n_rows, n_layers, hidden])",
            "ids": "{polarity}_{pooling}_ids.npy (int64 row ids; pos and neg pair by id)",
        },
        "poolings": {
            **entries,
            pooling: {
                "source": f"seed {SEED_FILE}",
                "layers": list(layers),
                "shape": {p: [n, len(layers), int(array.shape[2])] for p, n in counts.items()},
                "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        },
        "seed_metadata": seed_metadata,
    }
    write_json(paths.activations_metadata, metadata)
    result.files.append(paths.activations_metadata)
    return result


def _previous_metadata(path: Path) -> tuple[Any, dict[str, Any]]:
    """(the seed's metadata, tracekit's entries of other poolings) from the metadata file
    there: the seed's own (kept whole under ``seed_metadata``) or tracekit's (a repeated
    import, or another pooling's files)."""
    if not path.is_file():
        return None, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return path.read_text(encoding="utf-8", errors="replace"), {}
    if isinstance(data, dict) and isinstance(data.get("poolings"), dict):
        return data.get("seed_metadata"), dict(data["poolings"])
    return data, {}
