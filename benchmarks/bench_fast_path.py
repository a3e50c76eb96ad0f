"""The fast path for the models users run (issue 33), checked and timed in one command.

Random-init models (nothing downloaded), bf16 unless said, one table per part:

- ``check``: Gemma-2, Gemma-3 and Phi-3 (tiny, float32, TF32 off, 8 rows) through ``auto`` with CUDA
  graphs and compile against the hf engine: identical tokens and captures within 1e-3 (``ok``).
- ``two``: two model shapes in one process. A Mistral-7B-shaped and then a Qwen2.5-7B-shaped
  model (their attention shapes, two blocks, vocabulary cut to 512) generate through ``auto``
  with capture; each row says which engine ran it (both must say ``cuda``).
- ``exact``: the bf16 error against float32, per pooling, the largest over all layers: the
  engine's captures and HF's own bf16 teacher-forced forward, both against HF's float32
  forward of the same weights over the same tokens (:mod:`tracekit.engines.exactness`).
- ``gemma``: Gemma-2-2B, Gemma-2-9B and Gemma-3-12B shapes, every layer captured: the decode
  step on the device against the floor (the bytes one step reads, untied input embedding
  excluded, plus the mean KV cache, over the copy bandwidth measured here), tokens/s against
  ``model.generate`` in the same process.
- ``profile`` (only when asked for): the ``--gemma`` shapes' captured step replayed under
  the profiler, its top kernels by device time per step (``--gemma-attention`` picks the
  attention: both compare them).
- ``cold``: a 200-row trait run (Llama-3.2-1B shape, batch 32, 128 new tokens, every layer
  captured) with no decisions file: seconds from the engine's creation to the first batch's
  results, and end to end, against ``model.generate`` over the same rows.

With ``tuned`` among the parts, ``cold`` also runs the same rows on an engine that times every
kernel and tunes whole steps first (a minute or two more), for the step time cold start gives up.

Run on the device: ``python benchmarks/bench_fast_path.py`` (parts check, two, exact, cold,
gemma, each table printed when done: about 8 minutes on an H100; ``--parts check,two,exact,cold``
and ``--parts gemma`` split it in two); ``--csv out.csv`` writes the rows. Step
tuning is off for the ``gemma`` rows (``TRACEKIT_STEP_TUNING=0``; it is worth 1-3% and costs a
minute per batch size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_generate import (  # this folder: the same measures as the other benches
    bandwidth,
    kv_bytes_per_step,
    step_read_bytes,
)
from results import add_csv_option, write_csv

from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.exactness import bf16_errors
from tracekit.engines.interface import CaptureSpec, GenerationParams, create_engine
from tracekit.engines.pooling import Pooling
from tracekit.models.random_gemma import random_gemma
from tracekit.models.random_model import random_llama

ALL_POOLINGS = tuple(Pooling)
SMOKE = {"device": "cuda"}
"""``--smoke`` sets ``device`` to ``cpu``: every part on tiny shapes, to check the script."""


def device() -> str:
    return SMOKE["device"]


def half() -> str:
    return "bfloat16" if device() == "cuda" else "float32"


def random_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    ids: list[list[int]] = torch.randint(2, vocab, (batch, length), generator=gen).tolist()
    return ids


def sync() -> None:
    if device() == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def hf_generate(loaded: Any, prompts: list[list[int]], new: int) -> None:
    ids = torch.tensor(prompts, device=loaded.device)
    with torch.no_grad():
        loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


def part_two(rows: list[dict[str, Any]]) -> None:
    params = GenerationParams(max_new_tokens=16, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 2), poolings=ALL_POOLINGS)
    shapes = [("mistral-7b", 32, 8, 4096, "mistral"), ("qwen2.5-7b", 28, 4, 3584, "qwen2")]
    if device() != "cuda":
        shapes = [("mistral-tiny", 8, 2, 128, "mistral"), ("qwen2-tiny", 4, 1, 128, "qwen2")]
    for name, heads, kv_heads, hidden, family in shapes:
        overrides = {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "initializer_range": 0.02,
        }
        loaded = random_llama(
            "tiny", device=device(), dtype=half(), overrides=overrides, model_type=family
        )
        engine = create_engine("auto", loaded)
        plan_job = getattr(engine, "plan_job", None)  # auto's CUDA engine (hf has none)
        if plan_job is not None:
            plan_job(4, 16, 4)  # a short job: no kernel timing
        started = time.perf_counter()
        out = engine.generate(random_prompts(512, 4, 24, 0), params, capture)
        rows.append(
            {
                "part": "two",
                "shape": name,
                "engine": engine.name,
                "tokens": sum(len(r) for r in out.response_ids),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        del engine, loaded
        empty_cache()


def empty_cache() -> None:
    """Free the last model's memory: its decoder and tuner refer to each other, so only the
    cycle collector frees them."""
    import gc

    gc.collect()
    if device() == "cuda":
        torch.cuda.empty_cache()


def part_check(rows: list[dict[str, Any]]) -> None:
    """Gemma-2 and Gemma-3 (tiny, float32, TF32 off) with CUDA graphs and compile against the
    hf engine: the same tokens, captures within 1e-3 (relative, by norm)."""
    from tracekit.engines.exactness import relative_error
    from tracekit.engines.hf import HFEngine

    params = GenerationParams(max_new_tokens=24, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 2, 4), poolings=ALL_POOLINGS)
    for shape in ("gemma2-tiny", "gemma3-tiny", "phi3-tiny"):
        if shape == "phi3-tiny":
            loaded = random_llama("tiny", device=device(), dtype="float32", model_type="phi3")
        else:
            loaded = random_gemma(shape, device=device(), dtype="float32", seed=0)
        gen = torch.Generator().manual_seed(5)
        lengths = torch.randint(3, 40, (8,), generator=gen).tolist()
        prompts = [torch.randint(2, 512, (k,), generator=gen).tolist() for k in lengths]
        ref = HFEngine(loaded).generate(prompts, params, capture)
        engine = create_engine("auto", loaded)
        out = engine.generate(prompts, params, capture)
        worst = max(relative_error(out.pooled[p], ref.pooled[p]) for p in ALL_POOLINGS)
        rows.append(
            {
                "part": "check",
                "shape": shape,
                "engine": engine.name,
                "tokens equal": out.response_ids == ref.response_ids,
                "worst pooled rel err": f"{worst:.1e}",
                "ok": engine.name == ("cuda" if device() == "cuda" else "hf")
                and out.response_ids == ref.response_ids
                and worst < 1e-3,
            }
        )


def part_exact(rows: list[dict[str, Any]]) -> None:
    shapes = ("llama-3.2-1b", "gemma-2-2b") if device() == "cuda" else ("tiny", "gemma2-tiny")
    for shape in shapes:
        maker = random_gemma if shape.startswith("gemma") else random_llama
        loaded = maker(shape, device=device(), dtype="float32", seed=0)
        vocab = loaded.model.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(8, 64, (8,), generator=gen).tolist()
        prompts = [torch.randint(2, vocab, (k,), generator=gen).tolist() for k in lengths]
        errors = bf16_errors(loaded, prompts, new_tokens=32)
        for pooling, err in errors.items():
            engine, hf = max(err["engine"]), max(err["hf"])
            rows.append(
                {
                    "part": "exact",
                    "shape": shape,
                    "pooling": pooling,
                    "engine err": f"{engine:.2%}",
                    "engine worst layer": err["engine"].index(engine),
                    "hf err": f"{hf:.2%}",
                    "hf worst layer": err["hf"].index(hf),
                    "ratio": round(engine / hf, 2),
                }
            )
        del loaded
        empty_cache()


ATTENTION = {"kernel": "on", "torch": "off"}
"""``--gemma-attention`` values: the fused Triton attention kernel, or the attention as torch
operations inside the compiled step (``CudaEngine(fused_attention=...)``)."""


def part_gemma(
    rows: list[dict[str, Any]], bw: float, batches: dict[str, list[int]], attention: list[str]
) -> None:
    for shape, sizes in batches.items():
        for how in attention:
            gemma_rows(rows, bw, shape, sizes, how)  # prints each row as it is done
            empty_cache()


def gemma_model(shape: str) -> tuple[Any, CaptureSpec, int]:
    """A random-init Gemma of ``shape`` in half precision that never stops early, the capture of
    every layer with all poolings, and its vocabulary size."""
    loaded = random_gemma(shape, device=device(), dtype=half(), seed=0)
    loaded.model.generation_config.eos_token_id = None
    capture = CaptureSpec(layers=tuple(range(loaded.n_layers)), poolings=ALL_POOLINGS)
    return loaded, capture, loaded.model.config.get_text_config().vocab_size


def gemma_rows(
    rows: list[dict[str, Any]], bw: float, shape: str, sizes: list[int], attention: str
) -> None:
    prompt, new = (64, 128) if device() == "cuda" else (8, 8)
    params = GenerationParams(max_new_tokens=new, temperature=0)
    loaded, capture, vocab = gemma_model(shape)
    engine = CudaEngine(loaded, fused_attention=ATTENTION[attention])
    engine.stop_ids = [-1]  # every row makes `new` tokens
    weights = step_read_bytes(loaded.model)
    for batch in sizes:
        prompts = random_prompts(vocab, batch, prompt, batch)

        def run(p: list[list[int]] = prompts) -> None:
            engine.generate(p, params, capture)

        setup = seconds(run)
        steps, calls = [], []
        for _ in range(3):
            calls.append(seconds(run))
            on_device = engine._decoder(capture).last_decode_seconds  # None off CUDA
            steps.append((calls[-1] if on_device is None else on_device) / new)
        step, call = statistics.median(steps), statistics.median(calls)
        hf = seconds(lambda p=prompts: hf_generate(loaded, p, new))
        floor = (weights + kv_bytes_per_step(loaded.model, batch, prompt, new)) / bw
        rows.append(
            {
                "part": "gemma",
                "shape": shape,
                "batch": batch,
                # what ran: a kernel that failed its check leaves the torch attention
                "attention": "kernel"
                if any(r.dims.fused_attention for r in engine._decoder(capture)._runners.values())
                else "torch",
                "setup s": round(setup, 1),
                "step ms": round(step * 1e3, 3),
                "floor ms": round(floor * 1e3, 3),
                "of floor": f"{floor / step:.0%}",
                "tok/s": round(batch * new / call),
                "generate tok/s": round(batch * new / hf),
                "x generate": round(hf / call, 1),
            }
        )
        print_tables(rows[-1:])  # each batch size as soon as it is done


def part_profile(
    rows: list[dict[str, Any]],
    batches: dict[str, list[int]],
    attention: list[str],
    pdl: bool,
    top: int = 12,
) -> None:
    """Where a captured decode step's device time goes: the ``--gemma`` shapes' graph replayed
    20 times under the profiler, the ``top`` kernels by device time per step. With programmatic
    dependent launch (``pdl``) a kernel's span includes its wait for the one before, so the
    spans overlap and add up to more than the step; ``--profile-no-pdl`` gives each kernel's
    own time (of a step a few percent slower)."""
    from torch.profiler import ProfilerActivity, profile

    prompt, new, replays = (64, 128, 20) if device() == "cuda" else (8, 8, 2)
    params = GenerationParams(max_new_tokens=new, temperature=0)
    for shape, sizes in batches.items():
        loaded, capture, vocab = gemma_model(shape)
        for how, batch in ((how, batch) for how in attention for batch in sizes):
            engine = CudaEngine(loaded, fused_attention=ATTENTION[how], pdl=None if pdl else False)
            engine.stop_ids = [-1]
            engine.generate(random_prompts(vocab, batch, prompt, batch), params, capture)
            (runner,) = engine._decoder(capture)._runners.values()
            if runner.graph is None:  # off CUDA: nothing captured to replay
                continue
            runner.reset_dummy()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    runner.graph.replay()
                sync()
            kernels = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
            for event in kernels[:top]:
                rows.append(
                    {
                        "part": "profile",
                        "shape": shape,
                        "batch": batch,
                        "attention": "kernel" if runner.dims.fused_attention else "torch",
                        "pdl": runner.dims.gemv.pdl,
                        "kernel": event.key[:60],
                        "us per step": round(event.device_time_total / replays, 1),
                        "launches per step": event.count // replays,
                    }
                )
            del engine, runner
            empty_cache()
        del loaded
        empty_cache()


def part_cold(rows: list[dict[str, Any]], tuned: bool) -> None:
    """A 200-row trait run on a machine without a decisions file, as ``tracekit generate``
    runs it (the engine told the job's size: too short to repay timing kernels); with
    ``tuned``, the same engine timing every kernel and tuning whole steps first, for its step
    time (and what that costs)."""
    n_rows, batch, prompt, new = (200, 32, 64, 128) if device() == "cuda" else (10, 4, 8, 8)
    shape = "llama-3.2-1b" if device() == "cuda" else "tiny"
    loaded = random_llama(shape, device=device(), dtype=half(), seed=0)
    loaded.model.generation_config.eos_token_id = None
    prompts = random_prompts(loaded.model.config.vocab_size, n_rows, prompt, 7)
    capture = CaptureSpec(layers=tuple(range(loaded.n_layers)), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=new, temperature=0)
    hf_total = sum(
        seconds(lambda i=i: hf_generate(loaded, prompts[i : i + batch], new))
        for i in range(0, n_rows, batch)
    )
    for mode in ("cold", "tuned") if tuned else ("cold",):
        os.environ["TRACEKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"tracekit-{mode}-")
        sync()
        started = time.perf_counter()
        engine = CudaEngine(loaded, tune_steps=True if mode == "tuned" else None)
        engine.stop_ids = [-1]  # every row makes `new` tokens
        # what `tracekit generate` tells the engine; the tuned one times whatever the size
        timing = engine.plan_job(n_rows, new, batch) if mode == "cold" else True
        first, steps = None, []
        for i in range(0, n_rows, batch):
            engine.generate(prompts[i : i + batch], params, capture, pad_to=batch)
            first = time.perf_counter() - started if first is None else first
            on_device = engine._decoder(capture).last_decode_seconds
            steps.append(float("nan") if on_device is None else on_device / new)
        rows.append(
            {
                "part": "cold",
                "engine": f"{mode} ({'times kernels' if timing else 'no timing'})",
                "rows": n_rows,
                "first batch s": round(first or 0.0, 1),
                "end to end s": round(time.perf_counter() - started, 1),
                "step ms (device)": round(statistics.median(steps[1:] or steps) * 1e3, 3),
                "generate s": round(hf_total, 1),
                "setup": " ".join(f"{k}={v:.1f}" for k, v in engine.setup_parts.items()),
            }
        )
    if tuned:  # the target: a cold start's step within 10% of the tuned one's
        cold_step, tuned_step = (r["step ms (device)"] for r in rows[-2:])
        rows[-2]["step / tuned"] = round(cold_step / tuned_step, 3)
        rows[-1]["step / tuned"] = 1.0


def print_tables(rows: list[dict[str, Any]]) -> None:
    """One markdown table per part among ``rows`` (printed at once, flushed)."""
    for part in dict.fromkeys(r["part"] for r in rows):
        chunk = [r for r in rows if r["part"] == part]
        columns = list(dict.fromkeys(c for r in chunk for c in r if c != "part"))
        print(f"\n{part}\n| " + " | ".join(columns) + " |")
        print("|" + "|".join("---" for _ in columns) + "|")
        for row in chunk:
            print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="check,two,exact,gemma,cold")
    ap.add_argument(
        "--gemma",
        default="gemma-2-2b:32,gemma-2-9b:32,gemma-3-12b:32",
        help="shape:batch/batch,... for the gemma part",
    )
    ap.add_argument(
        "--gemma-attention",
        default="kernel",
        help="kernel and/or torch (comma-separated): the gemma part's attention, the fused "
        "kernel or torch operations in the compiled step (both: the same shapes twice)",
    )
    ap.add_argument(
        "--profile-no-pdl",
        action="store_true",
        help="profile part: launch kernels without programmatic dependent launch, so each "
        "kernel's span is its own time, not also its wait for the kernel before",
    )
    add_csv_option(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (no timings)")
    args = ap.parse_args()
    os.environ.setdefault("TRACEKIT_STEP_TUNING", "0")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.smoke:
        SMOKE["device"] = "cpu"
        args.gemma = "gemma2-tiny:2,gemma3-tiny:2"
        bw, name = float("nan"), "cpu"
    else:
        bw, _ = bandwidth(torch.device("cuda"), 2 << 30, reps=10)
        name = torch.cuda.get_device_name()
    print(f"device {name}  torch {torch.__version__}  HBM {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict[str, Any]] = []
    parts = args.parts.split(",")
    started = time.perf_counter()
    batches = {
        shape: [int(b) for b in sizes.split("/")]
        for shape, sizes in (item.split(":") for item in args.gemma.split(","))
    }
    # each part's table as soon as it is done (the longest, gemma, last)
    runs: list[tuple[str, Callable[[list[dict[str, Any]]], None]]] = [
        ("check", part_check),
        ("two", part_two),
        ("exact", part_exact),
        ("cold", lambda out: part_cold(out, tuned="tuned" in parts)),
        ("gemma", lambda out: part_gemma(out, bw, batches, args.gemma_attention.split(","))),
        (
            "profile",
            lambda out: part_profile(
                out, batches, args.gemma_attention.split(","), not args.profile_no_pdl
            ),
        ),
    ]
    for name, run in runs:
        if name in parts or (name == "cold" and "tuned" in parts):
            chunk: list[dict[str, Any]] = []
            run(chunk)
            empty_cache()  # the part's models
            if name != "gemma":  # that one prints each shape's rows as they come
                print_tables(chunk)
            print(f"({time.perf_counter() - started:.0f} s so far)", flush=True)
            rows.extend(chunk)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    write_csv(args.csv, rows)
    sys.exit(0)


if __name__ == "__main__":
    main()
