"""Benchmark the activation store: logging throughput and reconstruct over many entries.

1. Logging: ``ActivationStoreWriter.write_batch`` (encode arrays + JSON metadata, one
   transaction per batch, map growth from 64 MiB) against raw LMDB puts of the *same bytes*
   (values encoded beforehand, same batches, a map sized up front), both into fresh stores in
   this run. Reports entries/s, MB/s and the ratio to the raw baseline.
2. Reconstruct: ``tracekit.jobs.reconstruct.reconstruct`` over N entries and an N-row QA
   file, against a baseline that only walks the metadata database with a cursor and parses
   every JSON value (the least any reconstruct must do). Reports rows/s and the ratio.

Usage: ``python benchmarks/bench_log.py [--entries 2000] [--positions 32] [--layers 3]
[--reconstruct-entries 100000] [--repeats 3]``; each side is timed best-of-``repeats``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
from results import add_csv_option, write_csv

from tracekit.actlog.prompts import DEFAULT_TEMPLATE, format_prompt
from tracekit.jobs.reconstruct import ReconstructConfig, reconstruct
from tracekit.storage.activation_store import (
    ActivationStoreWriter,
    PendingEntry,
    encode_arrays,
    prompt_key,
)

PROVENANCE = {"model": "bench/model", "prompt_format": "template", "prompt_template": None}


def _entries(n: int, positions: int, layers: int, width: int, start: int = 0) -> list[PendingEntry]:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((positions, width)).astype(np.float16)
    out = []
    for i in range(start, start + n):
        prompt = format_prompt(DEFAULT_TEMPLATE, f"benchmark question number {i}?")
        meta = {
            "prompt": prompt,
            "generation": f"answer {i}",
            "model": "bench/model",
            "input_length": positions // 2,
            "timestamp": 1700000000.0 + i,
            "messages": None,
            "trim_position": None,
        }
        out.append(
            PendingEntry(prompt_key(prompt), meta, {f"layer_{k}": block for k in range(layers)})
        )
    return out


def bench_logging(
    tmp: Path, n: int, positions: int, layers: int, width: int, batch: int, repeats: int
) -> dict:
    raw_s = tk_s = float("inf")
    for rep in range(repeats):  # best of N, alternating order: the machine is shared
        rdir, tdir = tmp / f"raw{rep}", tmp / f"tk{rep}"
        rdir.mkdir()
        tdir.mkdir()
        one = _bench_logging_once(rdir, tdir, n, positions, layers, width, batch)
        raw_s, tk_s = min(raw_s, one[0]), min(tk_s, one[1])
        shutil.rmtree(rdir)
        shutil.rmtree(tdir)
        total_bytes = one[2]
    return {
        "entries": n,
        "MB": total_bytes / 1e6,
        "raw_s": raw_s,
        "tracekit_s": tk_s,
        "raw_entries_per_s": n / raw_s,
        "tracekit_entries_per_s": n / tk_s,
        "raw_MB_per_s": total_bytes / 1e6 / raw_s,
        "tracekit_MB_per_s": total_bytes / 1e6 / tk_s,
        "time_ratio": tk_s / raw_s,
    }


def _bench_logging_once(
    rdir: Path, tdir: Path, n: int, positions: int, layers: int, width: int, batch: int
) -> tuple[float, float, int]:
    entries = _entries(n, positions, layers, width)
    # raw baseline: the exact bytes tracekit writes, put batch by batch into a pre-sized map
    encoded = [
        (
            e.key.encode(),
            json.dumps({**e.metadata, "provenance_id": "x" * 16}).encode(),
            encode_arrays(e.arrays),
        )
        for e in entries
    ]
    total_bytes = sum(len(m) + len(a) for _, m, a in encoded)
    env = lmdb.open(str(rdir / "raw.lmdb"), map_size=4 * total_bytes + (64 << 20), max_dbs=4)
    act_db, meta_db = env.open_db(b"activations"), env.open_db(b"meta")
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        with env.begin(write=True) as txn:
            for key, meta, acts in encoded[s : s + batch]:
                txn.put(key, acts, db=act_db)
                txn.put(key, meta, db=meta_db)
    raw_s = time.perf_counter() - t0
    env.close()

    t0 = time.perf_counter()
    written = 0
    with ActivationStoreWriter(tdir / "tracekit.lmdb", PROVENANCE) as writer:
        for s in range(0, n, batch):
            written += writer.write_batch(entries[s : s + batch])
    tk_s = time.perf_counter() - t0
    assert written == total_bytes, (written, total_bytes)
    return raw_s, tk_s, total_bytes


def bench_reconstruct(tmp: Path, n: int, repeats: int) -> dict:
    store = tmp / "recon.lmdb"
    with ActivationStoreWriter(store, {**PROVENANCE, "prompt_template": DEFAULT_TEMPLATE}) as w:
        for s in range(0, n, 5000):
            w.write_batch(_entries(min(5000, n - s), positions=4, layers=1, width=16, start=s))
    qa = tmp / "qa.jsonl"
    with qa.open("w") as handle:
        for i in range(n):
            row = {"index": i, "prompt": f"benchmark question number {i}?", "answer": "x"}
            handle.write(json.dumps(row) + "\n")

    base_s = tk_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        env = lmdb.open(str(store), readonly=True, max_dbs=4, lock=False)
        meta_db = env.open_db(b"meta", create=False)
        with env.begin(buffers=True) as txn, txn.cursor(db=meta_db) as cursor:
            parsed = sum(1 for _, v in cursor if json.loads(bytes(v)))
        env.close()
        base_s = min(base_s, time.perf_counter() - t0)
        assert parsed == n

        t0 = time.perf_counter()
        cfg = ReconstructConfig(
            qa_output_path=qa, lmdb_path=store, output_path=tmp / "out.jsonl", force=True
        )
        result = reconstruct(cfg)
        tk_s = min(tk_s, time.perf_counter() - t0)
        assert result.matched == n and result.corrupted == 0
    return {
        "entries": n,
        "baseline_s": base_s,
        "reconstruct_s": tk_s,
        "reconstruct_rows_per_s": n / tk_s,
        "time_ratio": tk_s / base_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reconstruct-entries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs of each side")
    add_csv_option(parser)
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or 'cpu'}")
    with tempfile.TemporaryDirectory(prefix="bench-log-") as tmp:
        log = bench_logging(
            Path(tmp),
            args.entries,
            args.positions,
            args.layers,
            args.width,
            args.batch,
            args.repeats,
        )
        print(
            f"logging {log['entries']} entries ({log['MB']:.1f} MB, batches of {args.batch}): "
            f"raw LMDB puts {log['raw_entries_per_s']:,.0f} entries/s "
            f"{log['raw_MB_per_s']:,.0f} MB/s | tracekit {log['tracekit_entries_per_s']:,.0f} "
            f"entries/s {log['tracekit_MB_per_s']:,.0f} MB/s | time ratio {log['time_ratio']:.2f}"
        )
        rec = bench_reconstruct(Path(tmp), args.reconstruct_entries, args.repeats)
        print(
            f"reconstruct {rec['entries']:,} entries: baseline (cursor + json.loads) "
            f"{rec['baseline_s']:.2f} s | tracekit {rec['reconstruct_s']:.2f} s "
            f"({rec['reconstruct_rows_per_s']:,.0f} rows/s) | time ratio {rec['time_ratio']:.2f}"
        )
        write_csv(args.csv, [{"part": "logging", **log}, {"part": "reconstruct", **rec}])


if __name__ == "__main__":
    main()
