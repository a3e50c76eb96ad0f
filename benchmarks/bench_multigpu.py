"""Data-parallel ``tracekit generate``: the same experiment on 1 and N processes.

Saves a random-init Llama (``tracekit.models.random_model`` shapes; default the
Llama-3.2-1B shape, bf16) with its word-level tokenizer to a temporary folder, then runs, each
as a real CLI process on the same rows (greedy, every layer captured, response_avg +
prompt_last):

- ``1 process``: ``python -m tracekit generate --model FOLDER ...``
- ``N processes``: the same with ``--num-processes N`` (torchrun; one GPU per process, nccl)

and checks the merged outputs equal the single-process ones (CSV text identical, activations
within ``1e-2`` of the largest magnitude: bf16, and row batches differ between the runs).

Throughput is new tokens over the ``generation_seconds`` the main process reports: from the
moment every process has its model loaded to the merged files (compilation, CUDA graph capture,
journaling and the merge included; loading the model excluded, since it is the same fixed cost
on both sides and would dominate a benchmark of a few thousand rows). End-to-end times
(``seconds``, the process's wall clock) are printed beside it, and per process the seconds in
the engine and the one-time engine setup within them (kernel choice, compilation, graph
capture), with the steady-state ratio they give. A short warm-up run first fills the on-disk
compile caches and the kernel decisions (one ``TRACEKIT_CACHE_DIR`` for all runs), so neither
timed run pays for a cold cache and every process picks the same kernels. The ratio is N
processes over 1 process; the issue's target on 2 H200 GPUs is >= 1.8.

Run: ``python benchmarks/bench_multigpu.py [--num-processes 2] [--n-examples 256]
[--max-new-tokens 128] [--batch-size 64] [--shape llama-3.2-1b] [--engine auto]``.
``--shape tiny --device cpu`` is a CPU smoke check of the script (the ratio means nothing there).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from results import add_csv_option, write_csv

from tracekit.models.random_model import random_llama

POOLINGS = ("response_avg", "prompt_last")


def save_model(folder: Path, shape: str, dtype: str) -> None:
    loaded = random_llama(shape, device="cpu", dtype=dtype)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def run(
    args: argparse.Namespace, model: Path, base: Path, experiment: str, n: int, rows: int = 0
) -> dict:
    command = [
        sys.executable, "-m", "tracekit", "generate", "--model", str(model),
        "--no-chat-template", "--trait", "refusal", "--experiment", experiment,
        "--experiments-dir", str(base), "--n-examples", str(rows or args.n_examples),
        "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0",
        "--batch-size", str(args.batch_size), "--layers", "all", "--pooling", ",".join(POOLINGS),
        "--engine", args.engine, "--device", args.device, "--dtype", args.dtype,
        "--no-generation-cache", "--json",
    ]  # fmt: skip
    if n > 1:
        command += ["--num-processes", str(n)]
    started = time.perf_counter()
    # one cache directory for every run: the warm-up's kernel decisions are reused by all
    env = {**os.environ, "TRACEKIT_CACHE_DIR": str(base.parent / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{experiment} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    summary["wall"] = wall
    print(
        f"{experiment}: {n} process(es), {summary['tokens']} tokens, generation "
        f"{summary['generation_seconds']:.1f} s, wall {wall:.1f} s",
        flush=True,
    )
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
            differing = [x["id"] for x, y in zip(rows_a, rows_b, strict=False) if x != y]
            print(
                f"  {polarity}.csv: {len(differing)} of {len(rows_a)} rows differ "
                f"(ids {', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''})"
            )
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
    add_csv_option(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as tmp:
        root = Path(tmp)
        model = root / "model"
        save_model(model, args.shape, args.dtype)
        base = root / "experiments"
        run(args, model, base, "warmup", 1, rows=args.batch_size)
        single = run(args, model, base, "one", 1)
        multi = run(args, model, base, "many", args.num_processes)
        check = compare(base / "one" / "refusal", base / "many" / "refusal")

    rate_1 = single["tokens"] / single["generation_seconds"]
    rate_n = multi["tokens"] / multi["generation_seconds"]
    n = args.num_processes
    print(f"shape {args.shape}, {args.n_examples} rows/polarity, {args.max_new_tokens} new tokens")
    print("| run | tokens | generation s | tok/s | end-to-end s | process wall s |")
    print("|---|---|---|---|---|---|")
    for label, s, rate in (("1 process", single, rate_1), (f"{n} processes", multi, rate_n)):
        print(
            f"| {label} | {s['tokens']} | {s['generation_seconds']:.1f} | {rate:.0f} | "
            f"{s['seconds']:.1f} | {s['wall']:.1f} |"
        )
    print("\nper process: seconds in the engine, of which one-time setup (kernel choice,")
    print("compilation, CUDA graph capture) and waiting on journal writes; steady = tokens /")
    print("(engine - setup); merge = this process's share of the final merge")
    print(
        "| run | rank | device | rows | tokens | engine s | setup s | journal wait s | "
        "steady tok/s | merge s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    steady = {}
    for label, s in (("1 process", single), (f"{n} processes", multi)):
        slowest = 0.0
        for p in s.get("processes", []):
            busy = max(p["engine_seconds"] - p["setup_seconds"], 1e-9)
            slowest = max(slowest, busy)
            print(
                f"| {label} | {p['rank']} | {p['device']} | {p['rows']} | {p['tokens']} | "
                f"{p['engine_seconds']:.1f} | {p['setup_seconds']:.1f} | "
                f"{p.get('journal_wait_seconds', float('nan')):.1f} | "
                f"{p['tokens'] / busy:.0f} | {p.get('merge_seconds', float('nan')):.1f} |"
            )
        steady[label] = s["tokens"] / slowest if slowest else float("nan")
    print("\nper process: model loading and the parts of the one-time engine setup (seconds)")
    print("| run | rank | load | kernel choice | compile + warm-up | graph capture |")
    print("|---|---|---|---|---|---|")
    for label, s in (("1 process", single), (f"{n} processes", multi)):
        for p in s.get("processes", []):
            parts = p.get("setup_parts", {})
            print(
                f"| {label} | {p['rank']} | {p.get('load_seconds', float('nan')):.1f} | "
                f"{parts.get('kernel_choice', float('nan')):.1f} | "
                f"{parts.get('compile_warmup', float('nan')):.1f} | "
                f"{parts.get('graph_capture', float('nan')):.1f} |"
            )
    e2e = (multi["tokens"] / multi["seconds"]) / (single["tokens"] / single["seconds"])
    steady_ratio = steady[f"{n} processes"] / steady["1 process"]
    print(f"\nthroughput ratio {n} vs 1: {rate_n / rate_1:.2f}x (target on 2 GPUs: >= 1.8x)")
    print(f"steady-state ratio (slowest process, setup excluded): {steady_ratio:.2f}x")
    print(f"end-to-end ratio (model loading included): {e2e:.2f}x")
    print(
        f"outputs: CSV identical: {check['same_csv']}, activations max |diff| / max |value|: "
        f"{check['activation_rel_diff']:.2e} (tolerance {args.tolerance:g})"
    )
    if single["tokens"] != multi["tokens"]:
        print("WARNING: the runs made different numbers of tokens")
    ok = check["same_csv"] and check["activation_rel_diff"] <= args.tolerance
    ratios = {"throughput_ratio": rate_n / rate_1, "steady_ratio": steady_ratio}
    write_csv(args.csv, [{"processes": n, **ratios, "end_to_end_ratio": e2e, **check}])
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
