"""Build small random SAEs on disk, in the two formats `tracekit extract features --sae` reads.

    python examples/make_example_saes.py saes/gemma-scope --format gemma-scope
    python examples/make_example_saes.py saes/saelens --format saelens --activation topk

The SAEs are random (no training), sized for the embedded SmolLM2-135M-Instruct (hidden size
576). With ``--calibrate`` (the default) each SAE's thresholds / biases are set from the
embedded model's real residual states on examples/sentences.csv, so every feature fires on
about L0/width of the tokens and the folder name ``average_l0_N`` tells the truth.

Layouts written (N = the SAE release's layer = decoder block N, i.e. tracekit layer N + 1):
- gemma-scope: ``OUT/layer_N/width_W/average_l0_L0/params.npz`` (one per ``--l0`` value),
  with ``W_enc`` [d, W], ``W_dec`` [W, d], ``b_enc``, ``b_dec``, ``threshold`` (JumpReLU);
- saelens: ``OUT/layer_N/cfg.json`` + ``OUT/layer_N/sae_weights.safetensors``.

The writers below use numpy and safetensors only, so tests can build SAEs without tracekit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HIDDEN_SIZE = 576  # SmolLM2-135M-Instruct


def random_sae(d_in: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Random encoder/decoder weights: unit-norm decoder rows, encoder = decoder transposed."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((width, d_in)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return {
        "W_enc": np.ascontiguousarray(w_dec.T),
        "W_dec": w_dec,
        "b_enc": (0.01 * rng.standard_normal(width)).astype(np.float32),
        "b_dec": (0.01 * rng.standard_normal(d_in)).astype(np.float32),
        "threshold": np.full(width, 0.1, dtype=np.float32),
    }


def write_gemma_scope(
    root: Path, release_layer: int, params: dict[str, np.ndarray], average_l0: int
) -> Path:
    """``root/layer_N/width_W/average_l0_L0/params.npz`` as the Gemma Scope release has it."""
    width = params["W_enc"].shape[1]
    name = f"{width // 1024}k" if width % 1024 == 0 else str(width)
    folder = root / f"layer_{release_layer}" / f"width_{name}" / f"average_l0_{average_l0}"
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    np.savez(folder / "params.npz", **{k: params[k] for k in keys})
    return folder / "params.npz"


def write_saelens(
    root: Path,
    release_layer: int,
    params: dict[str, np.ndarray],
    activation: str = "jumprelu",
    k: int | None = None,
    apply_b_dec_to_input: bool = True,
    hook_name: str | None = None,
) -> Path:
    """``root/layer_N/{cfg.json, sae_weights.safetensors}`` as SAELens saves an SAE."""
    from safetensors.numpy import save_file

    folder = root / f"layer_{release_layer}"
    folder.mkdir(parents=True, exist_ok=True)
    d_in, width = params["W_enc"].shape
    architecture = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[activation]
    cfg: dict[str, object] = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(width),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook_name or f"blocks.{release_layer}.hook_resid_post"},
    }
    if activation == "topk":
        cfg["k"] = int(k or 8)
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    keys = ["W_enc", "W_dec", "b_enc", "b_dec"] + (
        ["threshold"] if activation == "jumprelu" else []
    )
    save_file(
        {key: np.ascontiguousarray(params[key]) for key in keys}, folder / "sae_weights.safetensors"
    )
    return folder


def residual_states(release_layers: list[int], csv: Path) -> dict[int, np.ndarray]:
    """Residual states after block N (tracekit layer N + 1) of the embedded model, all tokens."""
    import pandas as pd
    import torch

    import tracekit

    loaded = tracekit.load_model(tracekit.ModelConfig(device="cpu", dtype="float32"))
    texts = pd.read_csv(csv)["sentence"].tolist()
    states: dict[int, list[np.ndarray]] = {n: [] for n in release_layers}
    with torch.inference_mode():
        for text in texts:
            ids = loaded.tokenizer(text, return_tensors="pt")
            out = loaded.model(**ids, output_hidden_states=True)
            for n in release_layers:
                states[n].append(out.hidden_states[n + 1][0].numpy())
    return {n: np.concatenate(parts) for n, parts in states.items()}


def calibrate(params: dict[str, np.ndarray], states: np.ndarray, l0: int, activation: str) -> None:
    """Set thresholds (JumpReLU) or shift b_enc (ReLU) so each feature fires on ~l0/width tokens."""
    x = states - params["b_dec"] if activation != "jumprelu" else states
    pre = x @ params["W_enc"] + params["b_enc"]
    width = pre.shape[1]
    cut = np.quantile(pre, 1.0 - l0 / width, axis=0).astype(np.float32)
    if activation == "jumprelu":
        params["threshold"] = np.maximum(cut, 1e-3).astype(np.float32)
    elif activation == "relu":
        params["b_enc"] = (params["b_enc"] - cut).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder to create (the --sae DIR)")
    parser.add_argument("--format", choices=["gemma-scope", "saelens"], default="gemma-scope")
    parser.add_argument(
        "--release-layers", default="0-5", help="SAE-release layers, e.g. 0-5 or 0-4,9"
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--l0", default="16,32", help="average L0s (gemma-scope: one SAE each)")
    parser.add_argument("--activation", choices=["relu", "jumprelu", "topk"], default="jumprelu")
    parser.add_argument("--d-in", type=int, default=HIDDEN_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-calibrate", action="store_true", help="skip the embedded model")
    parser.add_argument("--sentences", type=Path, default=Path(__file__).with_name("sentences.csv"))
    args = parser.parse_args()

    layers = sorted(
        {
            n
            for part in args.release_layers.split(",")
            for start, _, end in [part.partition("-")]
            for n in range(int(start), int(end or start) + 1)
        }
    )
    l0s = [int(v) for v in args.l0.split(",")]
    states = None if args.no_calibrate else residual_states(layers, args.sentences)
    for layer in layers:
        for position, l0 in enumerate(l0s if args.format == "gemma-scope" else l0s[:1]):
            params = random_sae(args.d_in, args.width, seed=args.seed + 1000 * layer + position)
            activation = "jumprelu" if args.format == "gemma-scope" else args.activation
            if states is not None:
                calibrate(params, states[layer], l0, activation)
            if args.format == "gemma-scope":
                path = write_gemma_scope(args.out, layer, params, l0)
            else:
                path = write_saelens(args.out, layer, params, activation, k=l0)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
