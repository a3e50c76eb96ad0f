"""Benchmark ``tracekit log`` end to end: store writes on the writer thread vs. in line.

The job (``tracekit.jobs.log.log_activations``) runs on a random-init model saved to a
temporary folder (``tracekit.models.random_model``, nothing downloaded), twice per
repetition over fresh stores and fresh QA files of random prompts:

- **in line** (the baseline): each batch's store transaction runs before the next batch starts,
  as the job did before (the job's writer swapped for one that writes at once);
- **writer thread** (the job as it ships): the transaction runs on a background thread while
  the next batch generates and runs its teacher-forced forward.

Reported: seconds of the batch loop (from the job's first progress call to its return, so
model loading is not counted), entries/s and the ratio. A first, untimed run compiles and
captures what the engine needs. The two orders alternate between repetitions; the best of each
is compared.

Usage: ``python benchmarks/bench_log_job.py [--shape llama-3.2-1b] [--device cuda]
[--questions 192] [--batch-size 32] [--new-tokens 128] [--layers 8,16] [--repeats 2]``.
On CPU use ``--shape tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results import add_csv_option, write_csv

from tracekit.jobs import log as job
from tracekit.models.random_model import random_llama


class _InLine:
    """The job's writer, writing at once (the baseline)."""

    def __init__(self, name: str = "") -> None:
        self.wait_seconds = 0.0

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--questions", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--layers", default="8,16")
    ap.add_argument("--repeats", type=int, default=2)
    add_csv_option(ap)
    args = ap.parse_args()
    on_cuda = args.device.startswith("cuda")
    dtype = "bfloat16" if on_cuda else "float32"
    tmp = Path(tempfile.mkdtemp(prefix="tracekit-bench-log-"))
    loaded = random_llama(args.shape, device="cpu", dtype=dtype, seed=0)
    loaded.model.generation_config.eos_token_id = None
    loaded.model.save_pretrained(tmp / "model")
    loaded.tokenizer.save_pretrained(tmp / "model")
    del loaded
    gen = torch.Generator().manual_seed(0)

    def qa_file(n: int, name: str) -> Path:
        path = tmp / name
        rows = []
        for _ in range(n):
            words = torch.randint(2, 1000, (args.prompt_words,), generator=gen).tolist()
            rows.append(json.dumps({"prompt": " ".join(f"w{w}" for w in words)}) + "\n")
        path.write_text("".join(rows))
        return path

    real_writer = job.BackgroundWrites

    def run(mode: str, name: str, n: int) -> tuple[float, Any]:
        writer: Any = _InLine if mode == "in line" else real_writer
        job.BackgroundWrites = writer  # type: ignore[misc]
        marks: list[float] = []
        cfg = job.LogConfig(
            qa=qa_file(n, f"{name}.jsonl"),
            lmdb=tmp / f"{name}.lmdb",
            model=str(tmp / "model"),
            layers=args.layers,
            max_new_tokens=args.new_tokens,
            batch_size=args.batch_size,
            device=args.device,
            prompt_template="{question}",
            dtype="bfloat16" if on_cuda else "float32",
        )
        result = job.log_activations(cfg, on_batch=lambda *_: marks.append(time.perf_counter()))
        return time.perf_counter() - marks[0], result

    try:
        run("in line", "warm", args.batch_size)
        best: dict[str, float] = {}
        result: Any = None
        for rep in range(args.repeats):
            order = ("in line", "writer thread") if rep % 2 == 0 else ("writer thread", "in line")
            for mode in order:
                seconds, result = run(mode, f"r{rep}-{mode.replace(' ', '-')}", args.questions)
                best[mode] = min(best.get(mode, seconds), seconds)
                print(f"  {mode:13s} repetition {rep}: {seconds:.2f} s", flush=True)
    finally:
        job.BackgroundWrites = real_writer  # type: ignore[misc]
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(
        f"\n{device}, {args.shape}, {args.questions} questions, batch {args.batch_size}, "
        f"{args.new_tokens} new tokens, layers {args.layers}: "
        f"{result.bytes_written / 1e6:.0f} MB per run\n"
    )
    print("| store writes | loop s | entries/s | speed-up |")
    print("|---|---|---|---|")
    base = best["in line"]
    rows = []
    for mode in ("in line", "writer thread"):
        seconds = best[mode]
        rate = args.questions / seconds
        print(f"| {mode} | {seconds:.2f} | {rate:.0f} | {base / seconds:.2f}x |")
        rows.append({"store_writes": mode, "loop_s": seconds, "entries_per_s": rate,
                     "speedup": base / seconds, "device": device})  # fmt: skip
    write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
