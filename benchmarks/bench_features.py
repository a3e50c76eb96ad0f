"""Sentences/s of `extract features`: tracekit's one pass vs one forward pass per layer.

    python benchmarks/bench_features.py [--sentences 48] [--baseline-sentences 8]
                                        [--sae-width 1024] [--batch-size 16]
    python benchmarks/bench_features.py --gpu --random-init [--shape llama-3.2-1b]
                                        [--sae-width 16384] [--sentences 512]
    python benchmarks/bench_features.py --random-init --shape tiny    # quick CPU check

Every decoder block gets a random JumpReLU SAE (Gemma Scope layout, written to a temp folder),
so all layers 1..L are saved with SAE activations (``--storage``, dense by default on CPU as
the original stage did, sparse by default on GPU).

* ``baseline``: the original stage's way: per sentence, per layer, one forward pass
  (``output_hidden_states=True``, batch 1) keeping that layer, SAE-encoding it, then one file
  per sentence (same writer). Measured on ``--baseline-sentences`` sentences (it is slow).
* ``tracekit b=1``: ``tracekit.extract_features`` with batch size 1 (one pass per sentence).
* ``tracekit``: ``tracekit.extract_features`` with ``--batch-size`` (one batched pass per batch).

All three include writing the files. The embedded SmolLM2-135M runs on CPU; ``--random-init``
uses a random Llama of ``--shape`` (tracekit.models.random_model) with word-level
random sentences; ``--gpu`` puts it on CUDA in bf16. Ratios are against the baseline of the
same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results import add_csv_option, write_csv

EXAMPLE_CSV = Path(__file__).resolve().parents[1] / "examples" / "sentences.csv"


def write_sentences(path: Path, n: int, random_words: int | None) -> None:
    rng = np.random.default_rng(0)
    if random_words is None:
        with EXAMPLE_CSV.open() as handle:
            rows = list(csv.DictReader(handle))
        texts = [
            (rows[i % len(rows)]["sentence"], rows[i % len(rows)]["concept_strength_label"])
            for i in range(n)
        ]
    else:
        texts = [
            (
                " ".join(f"w{w}" for w in rng.integers(2, random_words, rng.integers(8, 40))),
                int(i % 4),
            )
            for i in range(n)
        ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "concept_strength_label"])
        writer.writerows(texts)


def layer_states(loaded, texts: list[str]) -> dict[int, torch.Tensor]:
    """Residual states of tracekit layers 1..L (pre final norm) over ``texts``, all tokens."""
    from tracekit.models import LayerTaps

    states: dict[int, list[torch.Tensor]] = {i: [] for i in range(1, loaded.handles.n_blocks + 1)}
    taps = LayerTaps(loaded.handles, list(states), lambda i, h: states[i].append(h[0].float()))
    with torch.inference_mode(), taps:
        for text in texts:
            loaded.model(**loaded.tokenizer(text, return_tensors="pt").to(loaded.device))
    return {i: torch.cat(parts) for i, parts in states.items()}


def write_saes(root: Path, loaded, texts: list[str], width: int, l0: int = 64) -> None:
    """Random JumpReLU SAEs, Gemma Scope layout, one per block (W_dec omitted: never read).

    Each threshold is calibrated on the model's own states so that about ``l0`` of ``width``
    features fire per token, as in a real SAE (random thresholds would fire on half of them and
    turn the benchmark into a disk benchmark).
    """
    states = layer_states(loaded, texts)
    gen = torch.Generator(device="cpu").manual_seed(1)
    d_in = loaded.hidden_size
    for block in range(loaded.handles.n_blocks):
        folder = root / f"layer_{block}" / f"width_{width}" / f"average_l0_{l0}"
        folder.mkdir(parents=True)
        w_enc = torch.randn(d_in, width, generator=gen) / d_in**0.5
        pre = states[block + 1] @ w_enc.to(states[block + 1].device)
        cut = torch.quantile(pre.flatten()[: 2**24], 1 - l0 / width).item()
        np.savez(
            folder / "params.npz",
            W_enc=w_enc.numpy(),
            b_enc=np.zeros(width, np.float32),
            b_dec=np.zeros(d_in, np.float32),
            threshold=np.full(width, max(cut, 1e-6), np.float32),
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline(loaded, saes, sentences, output: Path, storage: str) -> None:
    """One forward pass per layer per sentence (batch 1), as the original stage did."""
    from tracekit.sae.csr import to_csr
    from tracekit.storage.sentences import SaeMeta, write_sentence_file

    layers = sorted(saes)
    meta = SaeMeta(
        width=saes[layers[0]].width,
        average_l0s=[64.0] * len(layers),
        release_layers=[layer - 1 for layer in layers],
        formats="gemma-scope",
        storage=storage,
    )
    tok = loaded.tokenizer
    for index, (text, label) in enumerate(zip(sentences.texts, sentences.labels, strict=True)):
        ids = tok(text, return_tensors="pt").to(loaded.device)
        hidden, acts, embeddings = [], [], None
        with torch.inference_mode():
            for layer in layers:
                states = loaded.model(**ids, output_hidden_states=True).hidden_states
                h = states[layer][0]
                hidden.append(h.float().cpu().numpy())
                acts.append(saes[layer].encode(h))
                embeddings = states[0][0].float().cpu().numpy()
        stacked = torch.stack(acts)
        sparse = to_csr(stacked.flatten(0, 1)) if storage == "sparse" else None
        write_sentence_file(
            output / f"sentence_{index:06d}.npz",
            embeddings=embeddings,
            hidden_states=np.stack(hidden),
            layers=layers,
            label=label,
            sentence=text,
            tokens=tok.convert_ids_to_tokens(ids["input_ids"][0].tolist()),
            model=loaded.name,
            sae=meta,
            activations=None if sparse else stacked.cpu().numpy(),
            sparse=sparse,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=None)
    parser.add_argument("--baseline-sentences", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--sae-width", type=int, default=None)
    parser.add_argument("--storage", choices=["dense", "sparse"], default=None)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--shape", default=None, help="random-init shape: tiny or llama-3.2-1b")
    parser.add_argument("--json-out", type=Path, default=None)
    add_csv_option(parser)
    args = parser.parse_args()

    from tracekit.features import FeaturesConfig, extract_features
    from tracekit.features.inputs import read_sentences
    from tracekit.models import ModelConfig, load_model
    from tracekit.sae import load_saes

    device = "cuda" if args.gpu else "cpu"
    if args.random_init:
        from tracekit.models.random_model import SHAPES, random_llama

        shape = args.shape or ("llama-3.2-1b" if args.gpu else "tiny")
        loaded = random_llama(shape, device=device, dtype="bfloat16" if args.gpu else "float32")
        vocab = SHAPES[shape]["vocab_size"]
    else:
        loaded = load_model(ModelConfig(device=device, dtype="auto"))
        vocab = None
    n = args.sentences or (512 if args.gpu else 48)
    batch = args.batch_size or (64 if args.gpu else 16)
    width = args.sae_width or (16384 if args.gpu else 1024)
    storage = args.storage or ("sparse" if args.gpu else "dense")
    n_blocks = loaded.handles.n_blocks

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp_text:
        tmp = Path(tmp_text)
        csv_path = tmp / "sentences.csv"
        write_sentences(csv_path, n, vocab)
        with csv_path.open() as handle:
            calibration = [row["sentence"] for row in csv.DictReader(handle)][:16]
        write_saes(tmp / "saes", loaded, calibration, width)

        def run(name: str, batch_size: int, limit: int | None = None) -> dict[str, float]:
            path = csv_path
            if limit is not None:
                path = tmp / f"first_{limit}.csv"
                lines = csv_path.read_text().splitlines(keepends=True)
                path.write_text("".join(lines[: limit + 1]))
            cfg = FeaturesConfig(
                sentences=path,
                output=tmp / name,
                sae=tmp / "saes",
                sae_storage=storage,
                force=True,
                batch_size=batch_size,
            )
            result = extract_features(cfg, loaded=loaded)  # returns after the last write
            # extract_seconds leaves out reading the SAE files, as the baseline's time does
            return {
                "sentences": result.written,
                "seconds": result.extract_seconds,
                "tokens_per_sentence": result.tokens / max(result.written, 1),
            }

        run("warmup", batch, limit=min(n, 2 * batch))  # kernels, allocator, page cache
        results = {}
        k = min(args.baseline_sentences, n)
        cfg = FeaturesConfig(sentences=csv_path, output=tmp / "unused", sae=tmp / "saes")
        sentences = read_sentences(csv_path, "sentence", "concept_strength_label", (0, 3))
        subset = type(sentences)(texts=sentences.texts[:k], labels=sentences.labels[:k])
        layers = list(range(1, n_blocks + 1))
        saes = {layer: sae.to(loaded.device) for layer, sae in load_saes(cfg.sae, layers).items()}
        (tmp / "baseline").mkdir()
        sync(loaded.device)
        start = time.perf_counter()
        baseline(loaded, saes, subset, tmp / "baseline", storage)
        sync(loaded.device)
        results["baseline (one forward pass per layer, b=1)"] = {
            "sentences": k,
            "seconds": time.perf_counter() - start,
        }
        results["tracekit b=1 (one pass, all layers)"] = run("tracekit_b1", 1, limit=k)
        results[f"tracekit b={batch} (one pass, all layers)"] = run("tracekit", batch)
        first = np.load(tmp / "tracekit" / "sentence_000000.npz")
        if "act_shape" in first:
            measured_l0 = first["act_values"].size / (first["act_shape"][0] * first["act_shape"][1])
        else:
            measured_l0 = float((first["activations"] > 0).sum(-1).mean())
        files = sorted((tmp / "tracekit").glob("sentence_*.npz"))
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        largest = max(files, key=lambda p: p.stat().st_size)
        with np.load(largest) as data:
            breakdown = {k: f"{data[k].shape} {data[k].nbytes / 2**20:.2f} MiB" for k in data.files}
        print(f"{len(files)} files; largest {largest.name}: {breakdown}")
        # same numbers, not just the same speed: compare the first file of each approach
        # (all but the last layer: HF's last hidden state is after the final norm, tracekit's
        # is before it, by the README's layer convention)
        theirs = np.load(tmp / "baseline" / "sentence_000000.npz")["hidden_states"][:-1]
        scale = float(np.abs(theirs).max())
        diffs = {}
        for name in ("tracekit_b1", "tracekit"):
            ours = np.load(tmp / name / "sentence_000000.npz")["hidden_states"][:-1]
            diffs[name] = float(np.abs(ours - theirs[:, -ours.shape[1] :]).max())

    base = results["baseline (one forward pass per layer, b=1)"]
    base_rate = base["sentences"] / base["seconds"]
    device_name = torch.cuda.get_device_name() if args.gpu else "CPU"
    print(
        f"model: {loaded.name} ({n_blocks} blocks, d={loaded.hidden_size}, {loaded.dtype}) "
        f"on {device_name}; {n_blocks} layers saved, SAE width {width}, {storage} storage"
    )
    print(
        f"sentence 0 hidden states vs baseline: max |diff| b=1 {diffs['tracekit_b1']:.3g}, "
        f"b={batch} {diffs['tracekit']:.3g} (max |x| {scale:.3g})"
    )
    print(f"measured L0 (sentence 0): {measured_l0:.1f}; files: {size_mb / n:.2f} MiB per sentence")
    print(
        "(times leave out loading the model and the SAEs, for every approach; "
        f"{results[f'tracekit b={batch} (one pass, all layers)']['tokens_per_sentence']:.1f} "
        "tokens per sentence)"
    )
    print("| approach | sentences | seconds | sentences/s | vs baseline |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rate = r["sentences"] / r["seconds"]
        r["sentences_per_s"] = rate
        r["speedup"] = rate / base_rate
        speedup = rate / base_rate
        print(f"| {name} | {r['sentences']} | {r['seconds']:.2f} | {rate:.2f} | {speedup:.1f}x |")
    write_csv(args.csv, [{"approach": name, **r} for name, r in results.items()])
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"device": device_name, "model": loaded.name, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
