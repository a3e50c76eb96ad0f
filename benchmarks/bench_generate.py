"""tracekit generation (capture on and off) against plain ``model.generate`` on the same prompts.

Rows per batch size, all greedy, measured in one process and interleaved per repetition:

- ``model.generate`` — the baseline: Hugging Face generate with its dynamic cache, no capture;
- ``tracekit <engine>`` — the engine without capture;
- ``tracekit <engine> +capture`` — every layer, pooled response_avg + prompt_last + prompt_avg.

Tokens/s counts new tokens only; the ratio is against the baseline's tokens/s. Rows must make
the same number of tokens (checked), so the ratio compares equal work.

CPU mode (default): the embedded SmolLM2-135M-Instruct on chat-templated trait questions,
stopping at eos. ``--gpu``: a random-init Llama-3.2-1B-shaped model (16 blocks, d=2048, GQA
32/8, vocab 128256, tied, bf16), prompts of 64 random tokens, 128 new tokens with no early stop,
batches 1/8/32/128; it also reports the fraction of the memory-bandwidth floor per decode step:
``(weight bytes + KV-cache bytes read per step) / measured bandwidth`` divided by the measured
decode step time, the bandwidth from a ~2 GB device-to-device copy (read + write bytes, CUDA
events) in the same run. Decode step time = (generate time - prefill time) / new tokens, median
over the calls; the prefill is the engine's own where it reports one (the ``cuda`` engine's
CUDA-event time of that call's prefill), else one forward over the prompts (for the ``cuda``
engine that forward is ~2x longer than its graph-replayed prefill, and would make its steps
look shorter). ``--gpu --tiny`` runs the same code on a tiny model (CPU works) as a
smoke check. Engines are a flag (``--engines hf,cuda``) so new engines add rows.

Run: ``python benchmarks/bench_generate.py [--batches 1,8] [--max-new-tokens 32]`` or
``python benchmarks/bench_generate.py --gpu [--engines hf,cuda] [--batches 1,8,32,128]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from results import add_csv_option, write_csv

from tracekit.engines.interface import (
    CaptureSpec,
    GenerationParams,
    create_engine,
    left_pad,
    position_ids_from_mask,
)
from tracekit.engines.pooling import Pooling
from tracekit.models.loading import LoadedModel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, n_bytes: int, reps: int = 5) -> tuple[float, float]:
    """Bytes/s of a device-to-device copy of ``n_bytes`` (read + written bytes counted), median
    of ``reps`` copies: timed with CUDA events on a GPU (the measure), and with the host clock
    around each copy and its synchronize (on a CPU, the only one). The host clock also counts
    the launch and the synchronize, ~10-20 us on a ~1 ms copy: the bandwidth looked ~1.7%
    lower and the floor longer with it.
    ``bench_engine_gpu.py`` measures with this function too."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    on_device, on_host = [], []
    for _ in range(reps):
        sync(device)
        events = (
            [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            if device.type == "cuda"
            else []
        )
        start = time.perf_counter()
        if events:
            events[0].record()
        dst.copy_(src)
        if events:
            events[1].record()
        sync(device)
        on_host.append(time.perf_counter() - start)
        if events:
            on_device.append(events[0].elapsed_time(events[1]) / 1e3)
    n = 2 * src.numel() * src.element_size()
    host = n / statistics.median(on_host)
    return (n / statistics.median(on_device) if on_device else host), host


def weight_bytes(model: Any) -> int:
    """Bytes of every distinct parameter (tied embeddings counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def step_read_bytes(model: Any) -> int:
    """Bytes of the weights one decode step reads: every distinct parameter but an untied input
    embedding, of which a step reads one row per sequence (a tied one is read in full by the
    output head). Counting the whole input embedding overstated the floor by 1.05 GB at
    Llama-3.1-8B's shape."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embed.data_ptr():
        seen.pop(embed.data_ptr(), None)
    return sum(seen.values())


def kv_bytes_per_step(model: Any, batch: int, prompt: int, new: int) -> float:
    """KV-cache bytes one decode step reads, averaged over the ``new`` steps."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    element = next(model.parameters()).element_size()
    mean_context = prompt + (new - 1) / 2
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * mean_context * batch * element


def cpu_prompts(loaded: LoadedModel, n: int) -> list[list[int]]:
    from tracekit.models.templates import build_prompt
    from tracekit.traits import load_trait

    trait = load_trait("verbosity")
    questions = [trait.questions[i % len(trait.questions)] for i in range(n)]
    pairs = [trait.instruction[i % len(trait.instruction)].pos for i in range(n)]
    return [build_prompt(loaded.tokenizer, q, s).ids for q, s in zip(questions, pairs, strict=True)]


def random_prompts(loaded: LoadedModel, n: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.vocab_size
    return torch.randint(1, vocab, (n, length), generator=gen).tolist()


def plain_generate(
    loaded: LoadedModel, prompts: list[list[int]], new: int, no_stop: bool
) -> Callable[[], tuple[int, float | None]]:
    device = loaded.model.get_input_embeddings().weight.device
    pad = int(loaded.tokenizer.pad_token_id)
    ids, mask = left_pad(prompts, pad, device)
    eos = loaded.tokenizer.eos_token_id

    def run() -> tuple[int, float | None]:
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new if no_stop else 0,
                do_sample=False,
                pad_token_id=pad,
            )
        new_ids = out[:, ids.shape[1] :].tolist()
        if no_stop:
            return sum(len(r) for r in new_ids), None
        return sum(r.index(eos) if eos in r else len(r) for r in new_ids), None

    return run


def engine_run(
    loaded: LoadedModel,
    name: str,
    prompts: list[list[int]],
    new: int,
    capture: bool,
    no_stop: bool,
) -> Callable[[], tuple[int, float | None]]:
    """A call of ``engine.generate``: its new tokens and, where the engine reports it, the
    device seconds of that call's prefill."""
    engine = create_engine(name, loaded)
    if no_stop:
        engine.stop_ids = [-1]  # type: ignore[attr-defined]  # never matches: run to the limit
    spec = CaptureSpec(tuple(range(loaded.n_layers)), tuple(Pooling)) if capture else None
    params = GenerationParams(max_new_tokens=new, temperature=0)

    def run() -> tuple[int, float | None]:
        made = engine.generate(prompts, params, spec).n_new_tokens
        decoder = getattr(engine, "_decoder", None)  # the cuda engine's, after its call
        return made, None if decoder is None else decoder(spec).last_prefill_seconds

    return run


def prefill_seconds(loaded: LoadedModel, prompts: list[list[int]]) -> float:
    device = loaded.model.get_input_embeddings().weight.device
    ids, mask = left_pad(prompts, int(loaded.tokenizer.pad_token_id), device)
    with torch.inference_mode():
        loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        sync(device)
        start = time.perf_counter()
        loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="random-init Llama-3.2-1B shape")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: a tiny shape (smoke)")
    parser.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    parser.add_argument("--batches", default=None, help="default: 1,8 (CPU), 1,8,32,128 (GPU)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=64, help="--gpu prompt length")
    parser.add_argument("--engines", default="hf", help="tracekit engines to time, e.g. hf,cuda")
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    add_csv_option(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.gpu:
        from tracekit.models.random_model import random_llama

        device = args.device or "cuda"
        shape = "tiny" if args.tiny else "llama-3.2-1b"
        dtype = "float32" if device == "cpu" else "bfloat16"
        loaded = random_llama(shape, device=device, dtype=dtype)
        batches = [
            int(b) for b in (args.batches or ("1,8" if args.tiny else "1,8,32,128")).split(",")
        ]
        new = args.max_new_tokens or (8 if args.tiny else 128)
        copy_bytes = (64 << 20) if args.tiny or device == "cpu" else (2 << 30)
        bw = bandwidth(loaded.device, copy_bytes)[0]
        no_stop = True
    else:
        from tracekit.models import ModelConfig, load_model

        loaded = load_model(ModelConfig(device=args.device or "cpu"))
        batches = [int(b) for b in (args.batches or "1,8").split(",")]
        new = args.max_new_tokens or 32
        bw = None
        no_stop = False
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    print(f"model: {loaded.name} on {loaded.device} ({str(loaded.dtype)[6:]}), "
          f"{new} new tokens, engines: {', '.join(engines)}")  # fmt: skip
    if bw is not None:
        print(f"measured copy bandwidth: {bw / 1e9:,.1f} GB/s; weights "
              f"{weight_bytes(loaded.model) / 1e9:.3f} GB")  # fmt: skip

    rows: list[dict[str, Any]] = []
    for batch in batches:
        if args.gpu:
            prompts = random_prompts(loaded, batch, args.prompt_len)
        else:
            prompts = cpu_prompts(loaded, batch)
        runs: dict[str, Callable[[], tuple[int, float | None]]] = {
            "model.generate": plain_generate(loaded, prompts, new, no_stop)
        }
        for name in engines:
            runs[f"tracekit {name}"] = engine_run(loaded, name, prompts, new, False, no_stop)
            runs[f"tracekit {name} +capture"] = engine_run(
                loaded, name, prompts, new, True, no_stop
            )
        times: dict[str, list[float]] = {k: [] for k in runs}
        prefills: dict[str, list[float | None]] = {k: [] for k in runs}
        tokens: dict[str, int] = {}
        for run in runs.values():  # warm-up (allocations, kernels, compile)
            run()
        for _ in range(args.reps):
            for label, run in runs.items():
                sync(loaded.device)
                start = time.perf_counter()
                tokens[label], own_prefill = run()
                sync(loaded.device)
                times[label].append(time.perf_counter() - start)
                prefills[label].append(own_prefill)
        base_rate = tokens["model.generate"] / statistics.median(times["model.generate"])
        prefill = prefill_seconds(loaded, prompts) if bw is not None else None
        for label in runs:
            seconds = statistics.median(times[label])
            rate = tokens[label] / seconds
            row: dict[str, Any] = {
                "batch": batch,
                "path": label,
                "seconds": round(seconds, 4),
                "new_tokens": tokens[label],
                "tok_per_s": round(rate, 1),
                "ratio_vs_generate": round(rate / base_rate, 3),
            }
            if bw is not None and prefill is not None:
                # each call less its own prefill (the engine's, else the forward's)
                rests = [
                    max(t - (prefill if p is None else p), 1e-9)
                    for t, p in zip(times[label], prefills[label], strict=True)
                ]
                step = statistics.median(rests) / new
                kv = kv_bytes_per_step(loaded.model, batch, args.prompt_len, new)
                floor = (step_read_bytes(loaded.model) + kv) / bw
                row["step_ms"] = round(step * 1e3, 3)
                row["floor_ms"] = round(floor * 1e3, 3)
                row["fraction_of_floor"] = round(floor / step, 3)
            rows.append(row)
        if len(set(tokens.values())) != 1:
            print(f"warning: batch {batch}: paths made different token counts {tokens}")

    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    write_csv(args.csv, rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
