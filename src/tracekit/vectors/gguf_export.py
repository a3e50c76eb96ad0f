"""Trait vectors as a llama.cpp control vector (``llama-cli --control-vector FILE``).

The format, as llama.cpp's ``common_control_vector_load_one`` reads it and repeng's
``ControlVector.export_gguf`` writes it: a GGUF file with ``general.architecture =
controlvector``, ``controlvector.model_hint`` (the model's architecture name, e.g. ``llama``)
and ``controlvector.layer_count`` (the number of direction tensors), and one 1-D float32
tensor ``direction.N`` per layer, ``N >= 1``. The loader reads only the tensors.

Layer numbering: llama.cpp adds ``direction.N`` to the output of decoder block ``N`` (counted
from 0; ``build_cvec(cur, il)`` at the end of block ``il``, whose tensor is filled from
``direction.il``), and has no slot for block 0's output or the embeddings. tracekit's layer
``i >= 1`` is the residual stream leaving block ``i - 1`` (README "Layer indexing"), so
tracekit layer ``i`` is ``direction.{i - 1}``: layers 2..L are written, layers 0 and 1 cannot
be and are reported as skipped.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tracekit.errors import InputError
from tracekit.storage.atomic import write_bytes

if TYPE_CHECKING:
    import numpy as np

ARCH = "controlvector"


def llama_cpp_direction(layer: int) -> int | None:
    """The ``direction.N`` index of tracekit ``layer`` (None: llama.cpp has no slot for it)."""
    return layer - 1 if layer >= 2 else None


@dataclass
class GgufExport:
    path: Path
    directions: dict[int, int]
    """tracekit layer -> llama.cpp direction index, for the layers written."""
    skipped: list[int]
    """tracekit layers llama.cpp cannot steer (the embeddings and block 0's output)."""
    model_hint: str


def check_exportable(layers: list[int]) -> None:
    """Refuse before anything is computed when no layer has a llama.cpp slot."""
    if not any(llama_cpp_direction(layer) is not None for layer in layers):
        raise InputError(
            f"--export gguf: layers {', '.join(map(str, layers))} have no llama.cpp control-vector "
            "slot (llama.cpp steers the outputs of blocks 1.., tracekit layers 2..)",
            "extract activations of layers >= 2 (e.g. --layers all) and build the vectors again",
        )


def model_hint_from(metadata: dict[str, object]) -> str:
    """llama.cpp's architecture name from a trait's metadata: ``LlamaForCausalLM`` -> ``llama``
    (else the model id; ``unknown`` when neither is recorded)."""
    architecture = metadata.get("architecture")
    if isinstance(architecture, str) and architecture.endswith("ForCausalLM"):
        return architecture.removesuffix("ForCausalLM").lower()
    model = metadata.get("model")
    return model if isinstance(model, str) and model else "unknown"


def write_control_vector(
    path: Path, vectors: np.ndarray, layers: list[int], model_hint: str
) -> GgufExport:
    """Write ``vectors`` ``[n_layers, hidden]`` (rows in ``layers`` order) to ``path``
    atomically, as they are (llama.cpp scales them by ``--control-vector-scaled``)."""
    import gguf
    import numpy as np

    check_exportable(layers)
    directions = {
        layer: direction
        for layer in layers
        if (direction := llama_cpp_direction(layer)) is not None
    }
    with tempfile.TemporaryDirectory() as scratch:
        # GGUFWriter opens its file by name; build it aside, then publish it atomically
        staged = Path(scratch) / path.name
        writer = gguf.GGUFWriter(staged, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for row, layer in enumerate(layers):
            if layer in directions:
                vector = np.ascontiguousarray(vectors[row], dtype=np.float32)
                writer.add_tensor(f"direction.{directions[layer]}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        write_bytes(path, staged.read_bytes())
    skipped = [layer for layer in layers if layer not in directions]
    return GgufExport(path, directions, skipped, model_hint)
