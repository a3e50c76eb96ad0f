"""Data-parallel ``tracekit generate``: the same experiment on 1 and N processes.

Saves a random-init Llama (``tracekit.generation.cuda_random_model`` shapes; default the
Llama-3.2-1B shape, bf16) with its word-level tokenizer to a temporary folder, then runs, each
as a real CLI process on the same rows (greedy, every layer captured, response_avg +
prompt_last):

- ``1 process``: ``python -m tracekit generate --model FOLDER ...``
- ``N processes``: the same with ``--num-processes N`` (torchrun; one GPU per process, nccl)

and checks the merged outputs equal the single-process ones (CSV text identical, activations
within ``1e-2`` of the largest magnitude: bf16, and row batches differ between the runs). The
throughput is new tokens / the ``seconds`` the main process reports (model loading included,
the same on both sides), and the ratio is N processes over 1 process. The issue's target on
2 H200 GPUs is a ratio >= 1.8.

Run: ``python benchmarks/bench_multigpu.py [--num-processes 2] [--n-examples 256]
[--max-new-tokens 128] [--batch-size 64] [--shape llama-3.2-1b] [--engine auto]``.
``--shape tiny --device cpu`` is a CPU smoke check of the script (the ratio means nothing there).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tracekit.generation.cuda_random_model import random_llama  # noqa: E402

POOLINGS = ("response_avg", "prompt_last")


def save_model(folder: Path, shape: str, dtype: str) -> None:
    loaded = random_llama(shape, device="cpu", dtype=dtype)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def run(args: argparse.Namespace, model: Path, base: Path, experiment: str, n: int) -> dict:
    command = [
        sys.executable, "-m", "tracekit", "generate", "--model", str(model),
        "--no-chat-template", "--trait", "refusal", "--experiment", experiment,
        "--experiments-dir", str(base), "--n-examples", str(args.n_examples),
        "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0",
        "--batch-size", str(args.batch_size), "--layers", "all", "--pooling", ",".join(POOLINGS),
        "--engine", args.engine, "--device", args.device, "--dtype", args.dtype,
        "--no-generation-cache", "--json",
    ]  # fmt: skip
    if n > 1:
        command += ["--num-processes", str(n)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{experiment} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    summary["wall"] = wall
    return summary


def compare(one: Path, many: Path) -> dict[str, Any]:
    """CSV text equality and the largest activation difference relative to the largest value."""
    same_csv = True
    worst = 0.0
    for polarity in ("pos", "neg"):
        a = (one / "responses" / f"{polarity}.csv").read_text(encoding="utf-8")
        b = (many / "responses" / f"{polarity}.csv").read_text(encoding="utf-8")
        same_csv = same_csv and a == b
        if a != b:
            rows_a = list(csv.DictReader(a.splitlines()))
            rows_b = list(csv.DictReader(b.splitlines()))
            differing = sum(x != y for x, y in zip(rows_a, rows_b, strict=False))
            print(f"  {polarity}.csv: {differing} of {len(rows_a)} rows differ")
        for pooling in POOLINGS:
            x = np.load(one / "activations" / f"{polarity}_{pooling}.npy", allow_pickle=False)
            y = np.load(many / "activations" / f"{polarity}_{pooling}.npy", allow_pickle=False)
            if x.shape != y.shape:
                return {"same_csv": same_csv, "activation_rel_diff": float("inf")}
            scale = float(np.abs(x).max()) or 1.0
            worst = max(worst, float(np.abs(x - y).max()) / scale)
    return {"same_csv": same_csv, "activation_rel_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--n-examples", type=int, default=256, help="rows per polarity")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tolerance", type=float, default=1e-2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as tmp:
        root = Path(tmp)
        model = root / "model"
        save_model(model, args.shape, args.dtype)
        base = root / "experiments"
        single = run(args, model, base, "one", 1)
        multi = run(args, model, base, "many", args.num_processes)
        check = compare(base / "one" / "refusal", base / "many" / "refusal")

    rate_1 = single["tokens"] / single["seconds"]
    rate_n = multi["tokens"] / multi["seconds"]
    n = args.num_processes
    print(f"shape {args.shape}, {args.n_examples} rows/polarity, {args.max_new_tokens} new tokens")
    print(f"{'run':<14}{'tokens':>10}{'seconds':>10}{'wall s':>10}{'tok/s':>12}")
    for label, s, rate in (("1 process", single, rate_1), (f"{n} processes", multi, rate_n)):
        print(f"{label:<14}{s['tokens']:>10}{s['seconds']:>10.1f}{s['wall']:>10.1f}{rate:>12.1f}")
    print(f"throughput ratio {n} vs 1: {rate_n / rate_1:.2f}x (target on 2 GPUs: >= 1.8x)")
    print(
        f"outputs: CSV identical: {check['same_csv']}, activations max |diff| / max |value|: "
        f"{check['activation_rel_diff']:.2e} (tolerance {args.tolerance:g})"
    )
    if single["tokens"] != multi["tokens"]:
        print("WARNING: the runs made different numbers of tokens")
    ok = check["same_csv"] and check["activation_rel_diff"] <= args.tolerance
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
