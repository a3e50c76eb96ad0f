"""Peak memory and time of `build-dataset` vs a load-everything numpy baseline (seed 004's way).

    python benchmarks/bench_build_dataset.py [--files 300] [--layers 26] [--hidden 256]
                                             [--width 512] [--fragments 10] [--keep DIR]

Generates ``--files`` sentence NPZ files (dense SAE layout, ``--layers`` layers) in a temp
folder, then runs each approach in its own subprocess, so each peak RSS (``ru_maxrss``) is its
own:

* ``baseline``: what the seed's ``load_all_sentences`` + ``get_final_token_data`` do: load every
  array of every file into memory, stack the final-token rows of all layers, then select.
* ``tracekit``: ``tracekit.build_dataset`` (per-file, sliced reads into a preallocated output).

Both build the same two datasets (hidden-to-concept over all layers; hidden-to-feature on one
layer) with ``--normalize none`` and the outputs are compared for equality. Ratios are reported
against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results import add_csv_option, write_csv


def make_files(folder: Path, files: int, layers: int, hidden: int, width: int, frags: int) -> int:
    """Write the sentence files; returns their total size in bytes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(files):
        n = frags + i % 3
        is_final = np.zeros(n, dtype=bool)
        is_final[-1] = True
        acts = rng.standard_normal((layers, n, width), dtype=np.float32)
        np.maximum(acts, 0, out=acts)
        path = folder / f"sentence_{i:06d}.npz"
        np.savez(
            path,
            embeddings=rng.standard_normal((n, hidden), dtype=np.float32),
            hidden_states=rng.standard_normal((layers, n, hidden), dtype=np.float32),
            layers=np.arange(layers, dtype=np.int64),
            activations=acts,
            average_l0s=np.full(layers, 50.0),
            concept_strength_label=np.int64(i % 4),
            is_final_token=is_final,
        )
        total += path.stat().st_size
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_baseline(input_dir: Path, out: Path, target_layer: int, feature: int) -> None:
    """The seed's pipeline: every file fully loaded, then stacked."""
    sentences = []
    for path in sorted(input_dir.glob("sentence_*.npz")):
        with np.load(path, allow_pickle=False) as f:
            sentences.append({k: f[k] for k in f.files})
    finals = [np.flatnonzero(s["is_final_token"]) for s in sentences]
    hidden = np.stack([s["hidden_states"][:, f[0]] for s, f in zip(sentences, finals, strict=True)])
    acts = np.stack([s["activations"][:, f[0]] for s, f in zip(sentences, finals, strict=True)])
    labels = np.array([int(s["concept_strength_label"]) for s in sentences])
    X_concept = hidden.reshape(len(hidden), -1)
    np.savez(out / "concept.npz", X=X_concept, y=labels)
    np.savez(out / "feature.npz", X=hidden[:, target_layer], y=acts[:, target_layer, feature])


def child_tracekit(input_dir: Path, out: Path, target_layer: int, feature: int) -> None:
    from tracekit.datasets import BuildDatasetConfig, build_dataset

    build_dataset(
        BuildDatasetConfig(
            strategy="hidden-to-concept",
            input=input_dir,
            output=out / "concept.npz",
            layers="all",
            normalize="none",
        )
    )
    build_dataset(
        BuildDatasetConfig(
            strategy="hidden-to-feature",
            input=input_dir,
            output=out / "feature.npz",
            target_layer=target_layer,
            target_feature=feature,
            normalize="none",
        )
    )


def run_child(args: argparse.Namespace) -> None:
    import tracekit.datasets  # noqa: F401  (imports count as the interpreter floor, not work)

    before = peak_rss_mb()
    start = time.perf_counter()
    work = child_tracekit if args.child == "tracekit" else child_baseline
    work(Path(args.input), Path(args.out), args.target_layer, args.feature)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "floor_mb": before}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--fragments", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="write the data here and keep it")
    add_csv_option(parser)
    parser.add_argument("--child", choices=["baseline", "tracekit"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--target-layer", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--feature", type=int, default=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return 0

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-build-dataset-"))
    try:
        data = root / "features"
        size = make_files(data, args.files, args.layers, args.hidden, args.width, args.fragments)
        print(
            f"{args.files} files, {args.layers} layers, hidden {args.hidden}, SAE width "
            f"{args.width}: {size / 2**20:.0f} MiB of input"
        )
        results = {}
        target = min(12, args.layers - 1)
        for name in ("baseline", "tracekit"):
            out = root / name
            out.mkdir(exist_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--input",
                str(data),
                "--out",
                str(out),
                "--target-layer",
                str(target),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        for kind in ("concept", "feature"):
            a = np.load(root / "baseline" / f"{kind}.npz")
            b = np.load(root / "tracekit" / f"{kind}.npz")
            assert np.array_equal(a["X"], b["X"]) and np.array_equal(a["y"], b["y"]), kind
        out_mb = (
            sum(np.load(root / "tracekit" / f"{k}.npz")["X"].nbytes for k in ("concept", "feature"))
            / 2**20
        )
        base = results["baseline"]
        print(f"outputs identical; largest output X: {out_mb:.1f} MiB in total\n")
        print(
            f"{'approach':<10} {'time s':>8} {'peak RSS MiB':>13} {'over floor':>11} "
            f"{'time ratio':>11} {'RSS-over-floor ratio':>21}"
        )
        write_csv(args.csv, [{"approach": name, **r} for name, r in results.items()])
        for name, r in results.items():
            over = r["peak_mb"] - r["floor_mb"]
            base_over = base["peak_mb"] - base["floor_mb"]
            print(
                f"{name:<10} {r['seconds']:>8.2f} {r['peak_mb']:>13.0f} {over:>11.0f} "
                f"{r['seconds'] / base['seconds']:>11.2f} {over / base_over:>21.3f}"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
