"""Judgments/s of the openai judge backend against a loopback server with a fixed latency.

    python benchmarks/bench_judge.py [--latency 0.05] [--concurrency 1,8,64,256]
                                     [--seconds 2] [--json]

The server (tests/judge_server.py, a threaded chat-completions server on 127.0.0.1) runs in a
child process so it does not share the client's GIL, and answers every request after
``--latency`` seconds with known logprobs. Each concurrency level judges enough distinct rows
for about ``--seconds`` of ideal work (``concurrency / latency`` judgments/s), with the cache
off. Speed-up is against concurrency 1 of the same run; the ideal is the concurrency itself.
A final row at latency 0 (highest concurrency) shows where the client (plus the loopback
server) is the bottleneck. A short warm-up run precedes each timed run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

from results import add_csv_option, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TEMPLATE = "Q: {question}\nA: {answer}\nScore:"


def _serve(latency: float, queue: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    from judge_server import JudgeServer

    with JudgeServer(latency=latency) as server:
        queue.put(server.base_url)
        stop.wait()


def measure(latency: float, concurrency: int, n: int) -> dict[str, float]:
    from tracekit.judge import JudgeConfig, judge_rows

    queue: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    child = multiprocessing.Process(target=_serve, args=(latency, queue, stop), daemon=True)
    child.start()
    try:
        base_url = queue.get(timeout=30)
        config = JudgeConfig(
            backend="openai",
            base_url=base_url,
            concurrency=concurrency,
            no_cache=True,
            timeout=30,
        )
        rows = [
            {"question": f"q{i}", "response": f"<<lp={i % 101}:0.6,{(i + 7) % 101}:0.3>>"}
            for i in range(n)
        ]
        # warm-up (imports, first connection) outside the timed run
        judge_rows(rows[:2], config, trait_prompt=TEMPLATE)
        started = time.perf_counter()
        result = judge_rows(rows, config, trait_prompt=TEMPLATE)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        child.join(timeout=10)
    counts = result.summary.total
    if counts.scored != n or counts.retries:
        raise SystemExit(f"benchmark run was not clean: {counts}")
    return {"n": n, "seconds": seconds, "per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="connections per httpx client (default tracekit's POOL_SIZE; 1024 = one client)",
    )
    parser.add_argument("--json", action="store_true")
    add_csv_option(parser)
    args = parser.parse_args()
    if args.pool_size is not None:
        from tracekit.judge import backends

        backends.POOL_SIZE = args.pool_size
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    base = None
    for concurrency in levels:
        ideal = concurrency / args.latency
        n = max(concurrency * 2, int(ideal * args.seconds))
        row = {
            "latency_s": args.latency,
            "concurrency": concurrency,
            **measure(args.latency, concurrency, n),
        }
        base = base or row["per_s"]
        row["speedup"] = row["per_s"] / base
        row["efficiency"] = row["speedup"] / (concurrency / levels[0])
        results.append(row)
    top = max(levels)
    ceiling = {"latency_s": 0.0, "concurrency": top, **measure(0.0, top, max(1000, top * 4))}
    ceiling["speedup"] = ceiling["per_s"] / base
    ceiling["efficiency"] = float("nan")
    results.append(ceiling)
    write_csv(args.csv, results)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        "| latency ms | concurrency | judgments | seconds | judgments/s "
        f"| speed-up vs c={levels[0]} | speed-up / ideal |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        eff = "-" if r["efficiency"] != r["efficiency"] else f"{r['efficiency']:.2f}"
        print(
            f"| {r['latency_s'] * 1000:.0f} | {r['concurrency']} | {r['n']} | {r['seconds']:.2f} | "
            f"{r['per_s']:.1f} | {r['speedup']:.1f} | {eff} |"
        )


if __name__ == "__main__":
    main()
