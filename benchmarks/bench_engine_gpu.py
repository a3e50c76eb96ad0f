"""GPU benchmark of tracekit's CUDA engine against ``model.generate`` (issue 5's table).

Random-init Llama-3.2-1B-shaped model (bf16), prompt 64 random tokens, 128 new tokens, no early
stop (eos never matches). For each batch size it times, in one process:

- ``tracekit cuda +capture``: CudaEngine, all layers, response_avg + prompt_last + prompt_avg;
- ``tracekit cuda``: CudaEngine without capture;
- ``... streamed``: the same two, ``--stream N`` batches per timed call, each started before
  the previous one's result is taken (``CudaEngine.start``, as ``tracekit generate`` runs its
  batches): the host's per-batch work overlaps the device's next batch; times per batch;
- ``tracekit cuda <variant>``: engine variants without capture (``--variants``);
- ``tracekit hf +capture``: the reference engine with the same capture (``--with-reference``);
- ``generate dynamic``: ``model.generate`` with the default dynamic cache;
- ``generate static+compile``: ``model.generate(cache_implementation="static")`` (transformers
  compiles the decode step itself) — slow to compile, so only with ``--with-static``.

The floor per decode step is (weight bytes + KV-cache bytes the step must read) over the HBM
bandwidth measured here with a device-to-device copy of ~2 GB (bytes read + written). Decode
time per step is the median over the timed calls of (call time - prefill time) / steps: for
tracekit's engines each call's own prefill (CUDA events in the decoder; the default prefill runs
the engine's own compiled blocks), for ``model.generate`` one HF forward over the prompts timed
separately. For tracekit's engines the decode step is also measured on the device alone: CUDA
events around the decode loop of each timed call, over its steps, median over the calls ("step
ms (device)"): the steps without
the per-call work around them (the host preparing the batch, copying and detokenizing results),
which the first measure spreads over the steps and the e2e column counts in full.
``--steer`` adds the same two engine rows while steering (``... steered``: a random vector of
norm 8 at the middle layer, ``response`` positions, every step of every row) and prints what
steering costs per decode step on the device (target: at most 5%, issue 30); ``--steer-only``
runs just the capture row and its steered twin.
``--no-kernel-timing`` runs cuBLAS and the attention kernel's default configuration (or the
decisions kept on disk) without timing kernels or tuning steps: a first batch in seconds, for
quick checks such as the steering cost.
``--teacher-forced`` also times the teacher-forced pooled forward over all layers (batch 32 x
256 tokens) against the bf16 matmul rate measured here.

Run: ``python benchmarks/bench_engine_gpu.py [--batches 1,8,32,128] [--with-static]``.
``--shape tiny`` runs the same on a tiny model (a smoke check; CPU works with ``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_generate import bandwidth, step_read_bytes  # this folder: the same measures
from results import add_csv_option, write_csv

from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import CaptureSpec, GenerationParams, GenerationRequest
from tracekit.engines.pooling import Pooling
from tracekit.models.random_model import random_llama


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str, reps: int, times: list[float] | None = None) -> tuple[float, Any]:
    """Median wall seconds of ``fn`` over ``reps`` runs after one warm-up run; each run's
    seconds are appended to ``times`` when given."""
    result = fn()
    sync(device)
    times = [] if times is None else times
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gpu_clocks() -> str:
    """The GPU's current and maximum SM clock, memory clock, power limit and temperature, as
    ``nvidia-smi`` reports them ("" where it cannot): decode steps are latency-bound, and the
    same kernels ran 4-6% apart on different lent H200s, so a run records its machine's state."""
    import subprocess

    fields = "clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    names = ("SM clock", "max SM clock", "memory clock", "power limit", "temperature")
    return ", ".join(f"{n} {v.strip()}" for n, v in zip(names, out.split(","), strict=False))


def matmul_rate(device: str) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def teacher_forced_rows(
    loaded: Any, prompt_ids: Any, resp_ids: Any, capture: Any, dev: str, with_compile: bool
) -> dict[str, float]:
    """Seconds per teacher-forced batch: tracekit's pooled forward (fast ``cuda`` path and the
    ``hf`` reference path), and what bounds it (the same forward without capture, compiled, and
    the model's matrix products alone)."""
    import torch.nn.functional as F

    from tracekit.engines.interface import left_pad, position_ids_from_mask
    from tracekit.engines.teacher_forced import pooled_batches, pooled_forward

    model = loaded.model
    out: dict[str, float] = {}
    started = time.perf_counter()
    pooled_forward(loaded, prompt_ids, resp_ids, capture, engine="cuda")
    sync(dev)
    print(f"(first call of the cuda forward, compilation included: "
          f"{time.perf_counter() - started:.0f} s)")  # fmt: skip
    for engine in ("cuda", "hf"):
        out[f"tracekit pooled_forward, {engine} (one batch, to host)"], _ = timed(
            lambda e=engine: pooled_forward(loaded, prompt_ids, resp_ids, capture, engine=e),
            dev,
            3,
        )

        def pipelined(n: int = 4, e: str = engine) -> None:  # as extract activations runs them
            b = len(prompt_ids)
            for _ in pooled_batches(loaded, prompt_ids * n, resp_ids * n, capture, b, e):
                pass

        seconds, _ = timed(pipelined, dev, 2)
        out[f"same, {engine}, 4 batches pipelined (per batch)"] = seconds / 4
    # batches of other lengths, as a real dataset has them: the compiled block is shape-generic
    cuts = (8, 24, 40, 56)
    varied = [([p[: len(p) - c // 2] for p in prompt_ids], [r[: len(r) - c // 2] for r in resp_ids])
              for c in cuts]  # fmt: skip
    for p_ids, r_ids in varied:  # the first batch of each new length
        pooled_forward(loaded, p_ids, r_ids, capture, engine="cuda")

    def varied_batches() -> None:
        b = len(prompt_ids)
        p_all = [p for p_ids, _ in varied for p in p_ids]
        r_all = [r for _, r_ids in varied for r in r_ids]
        for _ in pooled_batches(loaded, p_all, r_all, capture, b, "cuda"):
            pass

    seconds, _ = timed(varied_batches, dev, 2)
    full = len(prompt_ids[0]) + len(resp_ids[0])
    mean_len = full - sum(cuts) / len(cuts)
    # stored as the time a full-length batch takes at this rate (FLOPs ~ proportional to length)
    out[f"cuda, 4 batches of {full - cuts[-1]}-{full - cuts[0]} tokens per row, pipelined "
        f"(per batch, scaled to {full})"] = seconds / len(cuts) * full / mean_len  # fmt: skip

    rows = [p + r for p, r in zip(prompt_ids, resp_ids, strict=True)]
    ids, mask = left_pad(rows, 0, torch.device(dev))
    positions = position_ids_from_mask(mask)

    def plain(m: Any = model) -> Any:
        with torch.inference_mode():
            return m(input_ids=ids, attention_mask=mask, position_ids=positions,
                     use_cache=False, logits_to_keep=1)  # fmt: skip

    out["HF forward, no capture"], _ = timed(plain, dev, 3)
    if with_compile:
        compiled = torch.compile(model)
        started = time.perf_counter()
        plain(compiled)
        sync(dev)
        print(f"(torch.compile of the forward: {time.perf_counter() - started:.0f} s)")
        out["HF forward, no capture, torch.compile"], _ = timed(lambda: plain(compiled), dev, 3)
        torch._dynamo.reset()
    # the matrix products alone: every linear layer of every block at b*s rows
    x = torch.randn(ids.numel(), model.config.hidden_size, device=dev, dtype=model.dtype)
    mlp_in = torch.randn(ids.numel(), model.config.intermediate_size, device=dev,
                         dtype=model.dtype)  # fmt: skip
    linears = []
    for layer in model.model.layers:
        for sub in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
                if hasattr(sub, name):
                    linears.append((x, getattr(sub, name).weight))
            if hasattr(sub, "down_proj"):
                linears.append((mlp_in, sub.down_proj.weight))

    def products() -> None:
        for a, w in linears:
            F.linear(a, w)

    out["its matrix products alone (cuBLAS)"], _ = timed(products, dev, 3)
    return out


def profile(fn: Any, steps: int, device: str) -> None:
    """Kernel table of one call (CUDA graph kernels included) and kernels per decode step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    sync(device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in events)
    print(
        f"profile: {len(events)} kernels ({len(events) / steps:.0f} per step), "
        f"{total_us / steps:.0f} us kernel time per step"
    )
    print(
        prof.key_averages().table(
            sort_by="device_time_total", row_limit=30, max_name_column_width=70
        )
    )


STEER_COST_TARGET = 0.05
"""Issue 30: steering on may cost at most 5% of a decode step (device time)."""


def steer_cost(rows: list[dict[str, Any]], batch: int) -> None:
    """Per engine row with a ``... steered`` twin at ``batch``: the steered device step's extra
    time over the unsteered one's, stored in the steered row (``steer_cost``) and printed."""
    at = {row["method"]: row for row in rows if row["batch"] == batch}
    for name, steered in at.items():
        plain = at.get(name.removesuffix(" steered"))
        if not name.endswith(" steered") or plain is None:
            continue
        cost = steered["step_dev_ms"] / plain["step_dev_ms"] - 1
        steered["steer_cost"] = cost
        verdict = "ok" if cost <= STEER_COST_TARGET else "OVER"
        print(
            f"b={batch:<4d} steering cost ({plain['method']}): {100 * cost:+.1f}% of a decode "
            f"step on device ({steered['step_dev_ms']:.3f} vs {plain['step_dev_ms']:.3f} ms; "
            f"target <= {100 * STEER_COST_TARGET:.0f}%: {verdict})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--stream", type=int, default=4, help="batches per streamed call (0: no streamed rows)"
    )
    ap.add_argument("--with-static", action="store_true")
    ap.add_argument("--with-reference", action="store_true")
    ap.add_argument(
        "--variants",
        default="",
        help=(
            "graph-eager,no-gemv,gemv-on,unfused,no-pdl,hf-prefill,fused-block,no-tuning,"
            "no-ring, pin:o=splitk8/qkv=splitk4 (layers' "
            "kernels pinned), attn:128/4/2 (the attention kernel's configuration pinned); a name "
            "ending in +capture runs with capture"
        ),
    )
    ap.add_argument("--steer", action="store_true", help="also time steered decode steps")
    ap.add_argument(
        "--steer-only",
        action="store_true",
        help="--steer with only the capture row and its steered twin (a quick cost check)",
    )
    ap.add_argument(
        "--no-kernel-timing", action="store_true", help="no kernel timing nor step tuning"
    )
    ap.add_argument("--static-batches", default=None, help="batches for static (default all)")
    ap.add_argument("--profile", type=int, default=0, help="profile one capture run at batch B")
    ap.add_argument("--teacher-forced", action="store_true")
    ap.add_argument("--tf-compile", action="store_true", help="also time a compiled HF forward")
    ap.add_argument("--tf-profile", action="store_true", help="profile one teacher-forced batch")
    ap.add_argument("--json", type=Path, default=None)
    add_csv_option(ap)
    args = ap.parse_args()
    dev = args.device
    dtype = "bfloat16" if dev.startswith("cuda") else "float32"
    loaded = random_llama(args.shape, device=dev, dtype=dtype, seed=0)
    model = loaded.model
    model.generation_config.eos_token_id = None  # every row runs to the limit
    model.generation_config.pad_token_id = 0
    cfg = model.config
    n_layers = loaded.n_layers
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = (
        cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    )  # bf16 keys + values
    # a ~2 GB copy, timed on the device (and by the host clock, which reads it ~1.7% low)
    bw, bw_host = (
        bandwidth(torch.device(dev), 2 << 30, reps=10)
        if dev.startswith("cuda")
        else (float("nan"),) * 2
    )
    mm = matmul_rate(dev) if dev.startswith("cuda") else float("nan")
    device_name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(
        f"device {device_name}  torch {torch.__version__}  HBM {bw / 1e12:.2f} TB/s "
        f"(host-timed {bw_host / 1e12:.2f})  "
        f"bf16 matmul {mm / 1e12:.0f} TFLOP/s  weights {weight_bytes / 1e9:.2f} GB",
        flush=True,
    )
    clocks_start = gpu_clocks() if dev.startswith("cuda") else ""
    if clocks_start:
        print(f"after the matmul: {clocks_start}", flush=True)
    capture = CaptureSpec(layers=tuple(range(n_layers)), poolings=tuple(Pooling))
    params = GenerationParams(max_new_tokens=args.new_tokens, temperature=0)
    timing_options: dict[str, Any] = {"time_kernels": False} if args.no_kernel_timing else {}
    cuda_engine = CudaEngine(loaded, **timing_options)
    cuda_engine.stop_ids = [-1]  # no early stop: every row makes max_new_tokens
    # variants without capture, to see what each choice is worth
    variant_options: dict[str, dict[str, Any]] = {
        "graph-eager": {"compile": False},  # CUDA graphs over eager kernels
        "no-gemv": {"gemv": "off"},  # cuBLAS for every linear layer
        "gemv-on": {"gemv": "on"},  # the Triton kernel for every linear layer it serves
        "unfused": {"fused_attention": "off"},  # attention as two products and a softmax
        "no-pdl": {"pdl": False},  # kernels wait for the previous one to end before starting
        # prompt through the HF model (the default runs it through the compiled block
        # functions)
        "hf-prefill": {"fast_prefill": False},
        # norms, residual adds and SiLU folded into the block's products (cuda_block)
        "fused-block": {"fused_block": True},
        # kernels chosen per product timed alone (the default re-times whole steps)
        "no-tuning": {"tune_steps": False},
        # captured states added into the sums in the step (the default: stored in rings that
        # the host flushes every 8 steps, cuda_ring)
        "no-ring": {"capture_ring": 0},
    }
    variants: dict[str, CudaEngine] = {}
    for name in filter(None, args.variants.split(",")):
        base = name.removesuffix("+capture")
        if base.startswith("pin:"):  # pin:o=splitk8/qkv=splitk8 pins those layers' kernels
            pins = dict(item.split("=", 1) for item in base.removeprefix("pin:").split("/"))
            variant_options[base] = {"gemv_modes": pins}
        if base.startswith("attn:"):  # attn:128/4/2 pins the attention kernel's configuration
            block_n, warps, stages = (int(v) for v in base.removeprefix("attn:").split("/"))
            variant_options[base] = {"attention_config": (block_n, warps, stages)}
        engine = CudaEngine(loaded, **variant_options[base], **timing_options)
        engine.stop_ids = [-1]
        variants[f"tracekit cuda {name}"] = engine
    ref_engine = HFEngine(loaded)
    ref_engine.stop_ids = []
    steering = None
    if args.steer or args.steer_only:
        from tracekit.engines.steering import Steering

        direction = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        steering = Steering(n_layers // 2, (direction * 8 / direction.norm()).numpy(), 1.0)
    rows: list[dict[str, Any]] = []
    T, P = args.new_tokens, args.prompt_len
    for batch in [int(b) for b in args.batches.split(",") if b]:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(2, cfg.vocab_size, (batch, P), generator=gen)
        prompts = ids.tolist()
        ids, mask = ids.to(dev), torch.ones_like(ids).to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens = batch * T
        # floor: every decode step reads the weights it uses once plus the KV cache written so far
        kv_avg = batch * kv_bytes_per_token * (P + (T - 1) / 2)
        # a step reads every weight but an untied input embedding (one row per sequence)
        floor_step = (step_read_bytes(model) + kv_avg) / bw

        def prefill(ids: Any = ids, mask: Any = mask, pos: Any = pos) -> Any:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)

        t_prefill, _ = timed(prefill, dev, args.reps)
        methods: list[tuple[str, Any]] = [
            ("tracekit cuda +capture", lambda p=prompts: cuda_engine.generate(p, params, capture)),
            ("tracekit cuda", lambda p=prompts: cuda_engine.generate(p, params)),
        ]
        if steering is not None:  # the same engine (same kernels), the steered decode step
            methods += [
                (
                    "tracekit cuda +capture steered",
                    lambda p=prompts: cuda_engine.generate(p, params, capture, steering=steering),
                ),
                (
                    "tracekit cuda steered",
                    lambda p=prompts: cuda_engine.generate(p, params, steering=steering),
                ),
            ]
        # batches per call of a method (streamed ones run several) and, for those, each
        # call's prefill and decode device times (means over its batches)
        per_call: dict[str, int] = {}
        stream_spans: dict[str, list[tuple[float | None, float | None]]] = {}
        for label, cap in (("tracekit cuda +capture", capture), ("tracekit cuda", None)):
            if args.stream < 1:
                continue
            name = f"{label} streamed"
            per_call[name] = args.stream
            stream_spans[name] = []

            def run_stream(
                p: Any = prompts,
                c: Any = cap,
                n: int = args.stream,
                spans: Any = stream_spans[name],
            ) -> Any:
                pending, done = None, []
                for _ in range(n):
                    started = cuda_engine.start(GenerationRequest(p, params, c))
                    if pending is not None:
                        pending.result()
                        done.append(pending)
                    pending = started
                out = pending.result()
                done.append(pending)
                prefills = [d.launched.prefill_seconds for d in done]
                decodes = [d.launched.decode_seconds for d in done]
                spans.append(
                    (None, None)
                    if None in prefills
                    else (statistics.mean(prefills), statistics.mean(decodes))
                )
                return out

            methods.append((name, run_stream))
        # each tracekit engine's own prefill (CUDA events in the decoder; the HF forward's
        # time for the rest)
        # and the device time of its decode steps alone (CUDA events around the decode loop)
        decoders: dict[str, Any] = {
            "tracekit cuda +capture": lambda: cuda_engine._decoder(capture),
            "tracekit cuda": lambda: cuda_engine._decoder(None),
            "tracekit cuda +capture steered": lambda: cuda_engine._decoder(capture),
            "tracekit cuda steered": lambda: cuda_engine._decoder(None),
        }
        for label, engine in variants.items():
            cap = capture if label.endswith("+capture") else None
            methods.append((label, lambda p=prompts, e=engine, c=cap: e.generate(p, params, c)))
            decoders[label] = lambda e=engine, c=cap: e._decoder(c)
        if args.with_reference:
            methods.append(
                ("tracekit hf +capture", lambda p=prompts: ref_engine.generate(p, params, capture))
            )

        def hf_generate(static: bool, ids: Any = ids, mask: Any = mask) -> Any:
            kwargs: dict[str, Any] = {"cache_implementation": "static"} if static else {}
            with torch.no_grad():
                return model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=T,
                    do_sample=False,
                    pad_token_id=0,
                    **kwargs,
                )

        methods.append(("generate dynamic", lambda: hf_generate(False)))
        if args.steer_only:  # the steering cost alone: the capture row and its steered twin
            keep = ("tracekit cuda +capture", "tracekit cuda +capture steered")
            methods = [(name, fn) for name, fn in methods if name in keep]
        static_batches = args.static_batches or args.batches
        if args.with_static and str(batch) in static_batches.split(","):
            methods.append(("generate static+compile", lambda: hf_generate(True)))
        results: dict[str, float] = {}
        for name, fn in methods:
            # each call's own prefill and decode-loop device time, read right after it, so that
            # a call's prefill is subtracted from that call (prefills vary by milliseconds)
            spans: list[tuple[float | None, float | None]] = []

            def call(
                fn: Any = fn,
                dec_of: Any = decoders.get(name),
                spans: Any = spans,
                streamed: Any = stream_spans.get(name),
            ) -> Any:
                out = fn()
                if streamed is not None:
                    spans.append(streamed[-1])
                elif dec_of is not None:
                    dec = dec_of()
                    spans.append((dec.last_prefill_seconds, dec.last_decode_seconds))
                return out

            each: list[float] = []
            start = time.perf_counter()
            seconds, out = timed(call, dev, args.reps, each)
            setup = time.perf_counter() - start - sum(each)
            n = per_call.get(name, 1)  # times per batch from here on
            seconds, each = seconds / n, [t / n for t in each]
            made = out.n_new_tokens if hasattr(out, "n_new_tokens") else tokens
            results[name] = seconds
            timed_spans = spans[-len(each) :] if spans else [(None, None)] * len(each)
            prefills = [t_prefill if p is None else p for p, _ in timed_spans]
            prefill_s = statistics.median(prefills)
            rests = [max(t - p, 1e-9) for t, p in zip(each, prefills, strict=True)]
            step = statistics.median(rests) / T
            # device time per decode step (T replays, no early stop), median over the calls
            decodes = [d for _, d in timed_spans if d is not None]
            step_dev = statistics.median(decodes) / T if decodes else step
            row = {
                "batch": batch,
                "method": name,
                "seconds": seconds,
                "tokens": made,
                "tok_s": made / seconds,
                "step_ms": step * 1e3,
                "floor_frac": floor_step / step,
                "step_dev_ms": step_dev * 1e3,
                "floor_frac_dev": floor_step / step_dev,
                "floor_frac_e2e": floor_step * T / seconds,
                "first_call_s": setup,
                "prefill_ms": prefill_s * 1e3,
            }
            rows.append(row)
            print(
                f"b={batch:<4d} {name:<30s} {row['tok_s']:>9.0f} tok/s  step "
                f"{row['step_ms']:.2f} ms ({row['step_dev_ms']:.2f} on device)  prefill "
                f"{row['prefill_ms']:.1f} ms  floor {100 * row['floor_frac']:.0f}% "
                f"({100 * row['floor_frac_dev']:.0f}% on device)  "
                f"(e2e {100 * row['floor_frac_e2e']:.0f}%)  first call {setup:.1f}s",
                flush=True,
            )
        base = results.get("generate dynamic")
        for row in rows:
            if row["batch"] == batch and base is not None:
                row["x_generate"] = base / row["seconds"]
        steer_cost(rows, batch)
        if args.profile == batch:
            profile(lambda p=prompts: cuda_engine.generate(p, params, capture), T, dev)
        print(
            f"b={batch:<4d} prefill {t_prefill * 1e3:.1f} ms  floor step {floor_step * 1e3:.3f} ms"
        )

    tf: dict[str, Any] = {}
    if args.teacher_forced:
        b, s = 32, 256
        gen = torch.Generator().manual_seed(7)
        prompt_ids = torch.randint(2, cfg.vocab_size, (b, s // 2), generator=gen).tolist()
        resp_ids = torch.randint(2, cfg.vocab_size, (b, s // 2), generator=gen).tolist()
        non_embed = weight_bytes / 2 - cfg.vocab_size * cfg.hidden_size
        flops = 2 * non_embed * b * s + 4 * cfg.num_hidden_layers * b * s * s * cfg.hidden_size / 2
        tf = {
            "batch": b,
            "seq": s,
            "flops": flops,
            "rows": teacher_forced_rows(
                loaded, prompt_ids, resp_ids, capture, dev, args.tf_compile
            ),
        }
        print(f"\nteacher-forced, all {n_layers} layers, three poolings, b={b} x {s} tokens")
        print("| what | ms | TFLOP/s | of bf16 matmul rate |\n|---|---|---|---|")
        for name, seconds in tf["rows"].items():
            print(
                f"| {name} | {1e3 * seconds:.1f} | {flops / seconds / 1e12:.0f} | "
                f"{100 * flops / seconds / mm:.0f}% |"
            )
        if args.tf_profile:
            from tracekit.engines.teacher_forced import pooled_forward

            profile(lambda: pooled_forward(loaded, prompt_ids, resp_ids, capture), 1, dev)
        tf["seconds"] = tf["rows"]["same, cuda, 4 batches pipelined (per batch)"]
        tf["matmul_frac"] = flops / tf["seconds"] / mm

    print(
        "\n| batch | method | tok/s | x generate | step ms (device) | floor (device steps) "
        "| step ms (call - prefill) | floor (call - prefill) | floor (e2e) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['batch']} | {row['method']} | {row['tok_s']:.0f} | "
            f"{row.get('x_generate', float('nan')):.1f}x | {row['step_dev_ms']:.2f} | "
            f"{100 * row['floor_frac_dev']:.0f}% | {row['step_ms']:.2f} | "
            f"{100 * row['floor_frac']:.0f}% | {100 * row['floor_frac_e2e']:.0f}% |"
        )
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    for label, engine in [("default options", cuda_engine), *variants.items()]:
        for dec in engine._decoders.values():
            for key, runner in dec._runners.items():
                print(f"decode step b={key.batch} len={runner.total_len}: fused attention "
                      f"{'on' if runner.dims.fused_attention else 'off'}, fused block "
                      f"{runner.dims.block}, steering {key.steer}")  # fmt: skip
            for batch, tried in dec.step_timings.items():
                print(f"step tuning b={batch} ({label}):")
                for label, us in sorted(tried.items(), key=lambda kv: kv[1]):
                    print(f"  {us:7.1f} us per step  {label}")
    from tracekit.engines.cuda.ops import block as cuda_block

    for key, times in cuda_block.timings().items():
        print(f"  fused {key[:4]}: us per product by K slices {times}")
    modes = cuda_gemv.MODE_NAMES
    print("linear layers (rows, N, K): chosen mode, microseconds per candidate")
    for key, mode in cuda_gemv.choices().items():
        times = ", ".join(f"{k} {v:.1f}" for k, v in cuda_gemv.timings().get(key, {}).items())
        print(f"  {key[:3]}: {modes[mode]}  ({times})")
    clocks_end = gpu_clocks() if dev.startswith("cuda") else ""
    if clocks_end:
        print(f"at the end: {clocks_end}")
    write_csv(args.csv, rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "clocks": {"after_matmul": clocks_start, "end": clocks_end},
                    "torch": torch.__version__,
                    "hbm_bytes_per_s": bw,
                    "hbm_bytes_per_s_host_timed": bw_host,
                    "matmul_flops": mm,
                    "weight_bytes": weight_bytes,
                    "rows": rows,
                    "teacher_forced": tf,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
