"""Several GPUs against one, in one command: identical outputs and the generate speed-up.

    python benchmarks/bench_multigpu.py --num-processes 2 --csv multigpu.csv

Every case runs the real CLI (``python -m tracekit ...``) on the same inputs once in one
process and once with ``--num-processes N`` (torchrun, one GPU per process, nccl), on random-init
models saved to a temporary folder (``tracekit.models.random_model`` / ``random_gemma``, bf16,
word-level tokenizer), and compares the outputs: CSV text, and every ``.npy`` / ``.npz`` array
and LMDB entry bit for bit (``identical``; otherwise the largest difference relative to the
largest value is shown). Cases (``--cases``, default all):

- ``generate``: ``--shape`` (Llama-3.2-1B), greedy, every layer captured, ``response_avg`` +
  ``prompt_last``; the speed-up is the target (>= 1.8x on 2 GPUs, >= 3.5x on 4).
- ``steered``: the same model, a steering sweep (``--steer-coef 0,8`` along a seeded unit
  vector at the middle layer); ``--engine auto`` picks the CUDA engine when it can steer,
  else ``hf`` (the table's engine column says which).
- ``gemma``: ``--gemma-shape`` (Gemma-2-2B), as ``generate``, speed-up against the same target;
  skipped, with the reason, when the CUDA engine does not run that model.
- ``activations``: ``extract activations`` (``prompt_avg``, every layer) over the ``generate``
  case's responses (runs ``generate`` first if it was not asked for).
- ``features``: ``extract features`` of random sentences through random JumpReLU SAEs
  (Gemma Scope layout, thresholds calibrated as in ``bench_features.py``), sparse storage.
- ``log``: ``log`` of random prompts into an LMDB store (per-rank stores merged).
- ``device-map``: not data-parallel: ``generate --engine hf --device-map auto`` (the model split
  over every GPU) against ``--engine hf --device cuda:0``.

Speed is new tokens over the ``generation_seconds`` the main process reports: from the moment
every process has its model loaded to the merged files (kernel choice, compilation, CUDA graph
capture, journaling and the merge included; loading the model excluded: the same fixed cost on
both sides). ``steady`` leaves out each process's one-time engine setup too (slowest process).
A short warm-up run per model first fills the on-disk compile caches and kernel decisions (one
``TRACEKIT_CACHE_DIR`` for all runs), so no timed run pays for a cold cache and every process
picks the same kernels. A case whose command fails is reported as failed and the others
run; the CSV is rewritten after every case. The exit code is 1 when any outputs differ or any
case failed.

``--shape tiny --gemma-shape gemma2-tiny --device cpu --dtype float32`` is a CPU smoke check of
the script (gloo; the ratios mean nothing there, and with fewer CPU threads per process float
sums can differ in the last places, which the table then shows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from results import add_csv_option, write_csv

CASES = ("generate", "steered", "gemma", "activations", "features", "log", "device-map")
POOLINGS = ("response_avg", "prompt_last")
TARGETS = {2: 1.8, 4: 3.5}  # generate speed-up asked for on N GPUs


class CaseFailed(Exception):
    """A command of a case exited non-zero (the case is reported as failed, the others run)."""


class Bench:
    """The runs of one benchmark: shared options, the temporary folder and the cache."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.n = args.num_processes
        self.env = {**os.environ, "TRACEKIT_CACHE_DIR": str(root / "cache")}
        self.llama = root / "llama"
        self.hidden = self.layers = self.vocab = 0  # of the Llama model, once saved
        self.generated = False  # the generate case's experiments exist

    def tracekit(self, *args: str, processes: int = 1) -> dict[str, Any]:
        """``python -m tracekit ARGS --json`` (with ``--num-processes`` when > 1): its summary,
        with ``wall`` (seconds) added."""
        command = [sys.executable, "-m", "tracekit", *args, "--json"]
        if processes > 1:
            command += ["--num-processes", str(processes)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=self.env)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr, flush=True)
            raise CaseFailed(f"{' '.join(args[:2])} exited {done.returncode}")
        summary: dict[str, Any] = json.loads(done.stdout)
        summary["wall"] = time.perf_counter() - started
        return summary

    def generate(
        self,
        model: Path,
        experiment: str,
        rows: int,
        *extra: str,
        processes: int = 1,
        placement: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        a = self.args
        summary = self.tracekit(
            "generate", "--model", str(model), "--no-chat-template", "--trait", "refusal",
            "--experiment", experiment, "--experiments-dir", str(self.root / "experiments"),
            "--n-examples", str(rows), "--max-new-tokens", str(a.max_new_tokens),
            "--temperature", "0", "--batch-size", str(a.batch_size), "--layers", "all",
            "--pooling", ",".join(POOLINGS), *(placement or ("--device", a.device)),
            "--dtype", a.dtype, "--no-generation-cache", *extra,
            processes=processes,
        )  # fmt: skip
        print(
            f"  {experiment}: {processes} process(es), {summary['tokens']} tokens, generation "
            f"{summary['generation_seconds']:.1f} s, wall {summary['wall']:.1f} s",
            flush=True,
        )
        return summary

    def trait_dir(self, experiment: str) -> Path:
        return self.root / "experiments" / experiment / "refusal"


# --- comparing outputs ----------------------------------------------------------------------
def compare_files(one: Path, many: Path, patterns: tuple[str, ...]) -> dict[str, Any]:
    """CSV text and every array of the files matching ``patterns`` under ``one`` and ``many``."""
    names = sorted({p.relative_to(one) for pattern in patterns for p in one.glob(pattern)})
    if not names:
        raise CaseFailed(f"no output files {patterns} under {one}")
    differing, worst = [], 0.0
    for name in names:
        a, b = one / name, many / name
        if not b.is_file():
            differing.append(f"{name} (missing)")
            worst = float("inf")
        elif a.suffix in (".csv", ".jsonl"):
            if a.read_bytes() != b.read_bytes():
                differing.append(str(name))
                worst = float("inf")
        else:
            for key, (x, y) in _arrays(a, b).items():
                same, rel = _same(x, y)
                if not same:
                    differing.append(f"{name}:{key}")
                    worst = max(worst, rel)
    return {"identical": not differing, "max_rel_diff": worst, "differing": differing}


def _arrays(a: Path, b: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if a.suffix == ".npz":
        with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
            keys = sorted(set(x.files) | set(y.files))
            return {k: (x.get(k), y.get(k)) for k in keys}
    return {"": (np.load(a, allow_pickle=False), np.load(b, allow_pickle=False))}


def _same(x: Any, y: Any) -> tuple[bool, float]:
    """Bit-identical, else the largest difference relative to the largest value."""
    if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
        return False, float("inf")
    if x.tobytes() == y.tobytes():
        return True, 0.0
    if x.dtype.kind not in "fc":
        return False, float("inf")
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    scale = float(np.abs(xf).max()) or 1.0
    return False, float(np.abs(xf - yf).max()) / scale


def compare_stores(one: Path, many: Path) -> dict[str, Any]:
    """Two LMDB activation stores: the same keys, response tokens and positions, and arrays."""
    from tracekit import open_store

    differing, worst = [], 0.0
    with open_store(one) as a, open_store(many) as b:
        keys_a, keys_b = sorted(a.keys()), sorted(b.keys())
        if keys_a != keys_b:
            return {"identical": False, "max_rel_diff": float("inf"), "differing": ["keys"]}
        for key in keys_a:
            x, y = a.get(key), b.get(key)
            for field in ("prompt", "response_token_ids", "positions", "finish_reason"):
                if x.metadata.get(field) != y.metadata.get(field):
                    differing.append(f"{key}:{field}")
                    worst = float("inf")
            for name in sorted(set(x.arrays) | set(y.arrays)):
                same, rel = _same(x.arrays.get(name), y.arrays.get(name))
                if not same:
                    differing.append(f"{key}:{name}")
                    worst = max(worst, rel)
    return {"identical": not differing, "max_rel_diff": worst, "differing": differing}


# --- models and inputs ----------------------------------------------------------------------
def save_model(folder: Path, shape: str, dtype: str, device: str) -> Any:
    """A random-init model of ``shape`` (Llama family or Gemma) saved with its tokenizer; returns
    the loaded model (on ``device``) for callers that need it."""
    from tracekit.models.random_gemma import SHAPES as GEMMA_SHAPES
    from tracekit.models.random_gemma import random_gemma
    from tracekit.models.random_model import random_llama

    build = random_gemma if shape in GEMMA_SHAPES else random_llama
    loaded = build(shape, device=device, dtype=dtype)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return loaded


def random_words(n: int, vocab: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(f"w{w}" for w in rng.integers(2, vocab, rng.integers(8, 40))) for _ in range(n)
    ]


def model_device(args: argparse.Namespace) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


# --- cases ----------------------------------------------------------------------------------
def row(case: str, engine: str, **values: Any) -> dict[str, Any]:
    base = {
        "case": case, "engine": engine, "processes": 0, "rows": 0, "tokens": 0,
        "seconds_1": float("nan"), "seconds_n": float("nan"), "speedup": float("nan"),
        "steady_speedup": float("nan"), "target": "", "meets_target": "",
        "identical": "", "max_rel_diff": float("nan"), "note": "",
    }  # fmt: skip
    return {**base, **values}


def speed_row(bench: Bench, case: str, engine: str, one: dict, many: dict, check: dict) -> dict:
    """The row of a timed generate pair, with the target on ``bench.n`` processes."""
    rate_1 = one["tokens"] / one["generation_seconds"]
    rate_n = many["tokens"] / many["generation_seconds"]
    target = TARGETS.get(bench.n)
    speedup = rate_n / rate_1
    met = (speedup >= target) if target else ""
    _print_processes(case, one, many)
    return row(
        case, engine, processes=bench.n, tokens=one["tokens"],
        rows=sum(sum(t["rows"].values()) for t in one["traits"]),
        seconds_1=one["generation_seconds"], seconds_n=many["generation_seconds"],
        speedup=speedup, steady_speedup=_steady(many) / _steady(one),
        target=f">= {target}x" if target else "", meets_target=met,
        identical=check["identical"], max_rel_diff=check["max_rel_diff"],
        note="; ".join(check["differing"][:3]) if not check["identical"] else "",
    )  # fmt: skip


def _steady(summary: dict) -> float:
    """Tokens over the slowest process's engine seconds less its one-time setup."""
    busy = [p["engine_seconds"] - p["setup_seconds"] for p in summary.get("processes", [])]
    return summary["tokens"] / max(max(busy, default=0.0), 1e-9)


def _print_processes(case: str, one: dict, many: dict) -> None:
    print(f"  {case} per process: rank, device, rows, tokens, engine s, setup s, load s")
    for label, summary in (("1", one), ("N", many)):
        for p in summary.get("processes", []):
            print(
                f"    {label}: {p['rank']} {p['device']} {p['rows']} {p['tokens']} "
                f"{p['engine_seconds']:.1f} {p['setup_seconds']:.1f} "
                f"{p.get('load_seconds', float('nan')):.1f}"
            )


def generate_pair(
    bench: Bench, case: str, model: Path, rows: int, *extra: str, warm_up: bool = True
) -> tuple:
    """Warm-up (compile caches, kernel decisions: the CUDA engine's), then the same
    ``generate`` on 1 and N processes; their summaries and the check of their outputs."""
    if warm_up:
        bench.generate(model, f"{case}-warmup", bench.args.batch_size, *extra)
    one = bench.generate(model, f"{case}-one", rows, *extra)
    many = bench.generate(model, f"{case}-many", rows, *extra, processes=bench.n)
    check = compare_files(
        bench.trait_dir(f"{case}-one"),
        bench.trait_dir(f"{case}-many"),
        ("**/responses/*.csv", "**/activations/*.npy"),
    )
    return one, many, check


def case_generate(bench: Bench) -> dict:
    print(f"generate ({bench.args.shape})", flush=True)
    engine = bench.args.engine
    one, many, check = generate_pair(
        bench, "generate", bench.llama, bench.args.n_examples, "--engine", engine
    )
    bench.generated = True
    return speed_row(bench, "generate", engine, one, many, check)


def case_steered(bench: Bench) -> dict:
    from tracekit.engines.interface import engine_class

    print(f"generate, steered ({bench.args.shape})", flush=True)
    fast_steers = getattr(engine_class("cuda"), "supports_steering", False)
    engine = "cuda" if fast_steers and model_device(bench.args) != "cpu" else "hf"
    vector = np.random.default_rng(0).standard_normal(bench.hidden).astype(np.float32)
    path = bench.root / "steer.npy"
    np.save(path, vector / np.linalg.norm(vector))
    steer = ["--steer-vector", str(path), "--steer-layer", str(bench.layers // 2)]
    steer += ["--steer-coef", "0,8", "--engine", "auto"]
    rows = bench.args.steer_examples
    one, many, check = generate_pair(
        bench, "steered", bench.llama, rows, *steer, warm_up=engine == "cuda"
    )
    out = speed_row(bench, "steered", engine, one, many, check)
    coefs = [t["steering"]["coef"] for t in many["traits"]]
    if coefs != [0.0, 8.0]:
        out.update(identical=False, note=f"steering sets {coefs}, expected [0.0, 8.0]")
    if engine == "hf":
        out.update(
            target="", meets_target="", note=out["note"] or "the CUDA engine does not steer: hf"
        )
    return out


def case_gemma(bench: Bench) -> dict:
    from tracekit.engines.cuda.arch import unsupported_reason

    shape = bench.args.gemma_shape
    print(f"generate ({shape})", flush=True)
    loaded = save_model(bench.root / "gemma", shape, bench.args.dtype, model_device(bench.args))
    reason = unsupported_reason(loaded.model)
    del loaded
    _free_gpu()
    if reason is not None and model_device(bench.args) != "cpu":
        return row("gemma", "cuda", note=f"skipped: the CUDA engine does not run {shape}: {reason}")
    engine = bench.args.engine
    one, many, check = generate_pair(
        bench, "gemma", bench.root / "gemma", bench.args.gemma_examples, "--engine", engine
    )
    return speed_row(bench, "gemma", engine, one, many, check)


def case_activations(bench: Bench) -> dict:
    if not bench.generated:
        case_generate(bench)
    print("extract activations", flush=True)
    args = ["extract", "activations", "--trait", "refusal", "--model", str(bench.llama)]
    args += ["--experiments-dir", str(bench.root / "experiments"), "--no-chat-template"]
    args += ["--layers", "all", "--pooling", "prompt_avg", "--dtype", bench.args.dtype]
    args += ["--batch-size", str(bench.args.batch_size), "--device", bench.args.device]
    one = bench.tracekit(*args, "--experiment", "generate-one")
    many = bench.tracekit(*args, "--experiment", "generate-many", processes=bench.n)
    check = compare_files(
        bench.trait_dir("generate-one"), bench.trait_dir("generate-many"),
        ("activations/*_prompt_avg*.npy",),
    )  # fmt: skip
    return _plain_row("activations", bench, one, many, check, rows=sum(one["rows"].values()))


def write_feature_inputs(bench: Bench, loaded: Any) -> None:
    """Random sentences and, for every block of ``loaded``, a random JumpReLU SAE whose
    thresholds let ~64 of 1024 features fire (calibrated on the model's states)."""
    import csv

    from bench_features import write_saes

    texts = random_words(bench.args.sentences, bench.vocab, seed=1)
    with (bench.root / "sentences.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "concept_strength_label"])
        writer.writerows((text, i % 4) for i, text in enumerate(texts))
    write_saes(bench.root / "saes", loaded, texts[:64], width=1024)


def case_features(bench: Bench) -> dict:
    print("extract features", flush=True)
    sentences = bench.root / "sentences.csv"
    layers = f"1,{bench.layers // 2},{bench.layers}"
    args = ["extract", "features", "--sentences", str(sentences), "--sae", str(bench.root / "saes")]
    args += ["--model", str(bench.llama), "--layers", layers, "--sae-storage", "sparse"]
    args += ["--batch-size", str(bench.args.batch_size), "--dtype", bench.args.dtype]
    args += ["--device", bench.args.device]
    one = bench.tracekit(*args, "--output", str(bench.root / "features-one"))
    many = bench.tracekit(*args, "--output", str(bench.root / "features-many"), processes=bench.n)
    check = compare_files(bench.root / "features-one", bench.root / "features-many", ("*.npz",))
    return _plain_row("features", bench, one, many, check, rows=bench.args.sentences)


def case_log(bench: Bench) -> dict:
    print("log", flush=True)
    qa = bench.root / "qa.jsonl"
    prompts = random_words(bench.args.log_prompts, bench.vocab, seed=2)
    qa.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    args = ["log", "--model", str(bench.llama), "--qa", str(qa), "--prompt-template"]
    args += ["{question}", "--layers", f"1,{bench.layers}"]
    args += ["--max-new-tokens", str(min(32, bench.args.max_new_tokens))]
    args += ["--batch-size", str(bench.args.batch_size), "--model-dtype", bench.args.dtype]
    args += ["--device", bench.args.device]
    one = bench.tracekit(*args, "--lmdb", str(bench.root / "log-one"))
    many = bench.tracekit(*args, "--lmdb", str(bench.root / "log-many"), processes=bench.n)
    check = compare_stores(bench.root / "log-one", bench.root / "log-many")
    return _plain_row("log", bench, one, many, check, rows=len(prompts))


def case_device_map(bench: Bench) -> dict:
    print("generate --device-map auto (hf engine)", flush=True)
    if model_device(bench.args) == "cpu":
        return row("device-map", "hf", note="skipped: needs CUDA GPUs")
    rows = bench.args.batch_size  # two batches: a correctness check, not a timing
    one = bench.generate(
        bench.llama, "split-one", rows, "--engine", "hf", placement=("--device", "cuda:0")
    )
    split = bench.generate(
        bench.llama, "split-auto", rows, "--engine", "hf", placement=("--device-map", "auto")
    )
    check = compare_files(
        bench.trait_dir("split-one"), bench.trait_dir("split-auto"),
        ("responses/*.csv", "activations/*.npy"),
    )  # fmt: skip
    return row(
        "device-map", "hf", processes=1, rows=2 * rows, tokens=one["tokens"],
        seconds_1=one["generation_seconds"], seconds_n=split["generation_seconds"],
        identical=check["identical"], max_rel_diff=check["max_rel_diff"],
        note="one process, the model split over every GPU, against cuda:0"
        + ("" if check["identical"] else "; " + "; ".join(check["differing"][:3])),
    )  # fmt: skip


def _plain_row(case: str, bench: Bench, one: dict, many: dict, check: dict, rows: int) -> dict:
    s1, sn = one["wall"], many["wall"]  # the whole command, model loading included
    return row(
        case, bench.args.engine, processes=bench.n, rows=rows, seconds_1=s1, seconds_n=sn,
        speedup=s1 / sn, identical=check["identical"], max_rel_diff=check["max_rel_diff"],
        note="; ".join(check["differing"][:3]),
    )  # fmt: skip


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


RUNNERS: dict[str, Callable[[Bench], dict]] = {
    "generate": case_generate,
    "steered": case_steered,
    "gemma": case_gemma,
    "activations": case_activations,
    "features": case_features,
    "log": case_log,
    "device-map": case_device_map,
}


def print_table(rows: list[dict[str, Any]], n: int) -> None:
    print(
        f"\n| case | engine | rows | 1 GPU s | {n} GPUs s | speed-up | target | identical | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = "" if np.isnan(r["speedup"]) else f"{r['speedup']:.2f}x"
        if not np.isnan(r["steady_speedup"]):
            speed += f" (steady {r['steady_speedup']:.2f}x)"
        target = r["target"] + (
            "" if r["meets_target"] == "" else f" {'met' if r['meets_target'] else 'NOT met'}"
        )
        same = r["identical"]
        if same is False:
            same = f"no ({r['max_rel_diff']:.2e})"
        elif same is True:
            same = "yes"
        t1 = "" if np.isnan(r["seconds_1"]) else f"{r['seconds_1']:.1f}"
        tn = "" if np.isnan(r["seconds_n"]) else f"{r['seconds_n']:.1f}"
        cells = (r["case"], r["engine"], r["rows"], t1, tn, speed, target, same, r["note"])
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}"
    )
    parser.add_argument("--n-examples", type=int, default=8192, help="generate: rows per polarity")
    parser.add_argument("--gemma-examples", type=int, default=2048, help="gemma: rows per polarity")
    parser.add_argument("--steer-examples", type=int, default=128, help="steered: rows per set")
    parser.add_argument("--sentences", type=int, default=512, help="extract features: sentences")
    parser.add_argument("--log-prompts", type=int, default=512, help="log: prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--gemma-shape", default="gemma-2-2b")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    add_csv_option(parser)
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-multigpu-") as tmp:
        bench = Bench(args, Path(tmp))
        loaded = save_model(bench.llama, args.shape, args.dtype, model_device(args))
        bench.hidden, bench.layers = loaded.hidden_size, loaded.n_layers - 1
        bench.vocab = loaded.model.config.vocab_size
        if "features" in cases:
            write_feature_inputs(bench, loaded)
        del loaded
        _free_gpu()
        for case in cases:
            try:
                rows.append(RUNNERS[case](bench))
            except CaseFailed as exc:
                rows.append(row(case, args.engine, identical=False, note=f"failed: {exc}"))
            write_csv(args.csv, rows)  # after every case: a run cut short keeps its rows
    print(f"\n{args.shape} / {args.gemma_shape}, {args.dtype}, {args.max_new_tokens} new tokens")
    print_table(rows, args.num_processes)
    raise SystemExit(0 if all(r["identical"] is not False for r in rows) else 1)


if __name__ == "__main__":
    main()
