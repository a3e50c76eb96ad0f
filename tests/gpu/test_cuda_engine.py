"""The CUDA engine on a GPU: CUDA graphs + torch.compile against the reference engine.

Random-init Llama (tracekit.models.random_model, nothing downloaded). Tolerances:
float32 with TF32 off — tokens identical, pooled activations within 1e-3 (relative, by norm);
bfloat16 — pooled activations within 2e-2 of a teacher-forced forward over the engine's own
output (bf16 rounding of two different kernel sequences).
"""

from __future__ import annotations

import time

import pytest
import torch

from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.hf import HFEngine
from tracekit.engines.interface import (
    CaptureSpec,
    GenerationParams,
    GenerationRequest,
    resolve_engine_name,
)
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.models.random_model import random_llama

pytestmark = pytest.mark.gpu

ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=gen).tolist()
    return [torch.randint(2, 512, (k,), generator=gen).tolist() for k in lengths]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.fixture(scope="module")
def fp32_model():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return random_llama("tiny", device="cuda", dtype="float32", seed=0)


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_equals_reference_with_graphs(fp32_model, batch):
    prompts = _prompts(batch, seed=batch)
    params = GenerationParams(max_new_tokens=32, temperature=0)
    capture = CaptureSpec(layers=(0, 1, 3, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(fp32_model).generate(prompts, params, capture)
    engine = CudaEngine(fp32_model)
    assert resolve_engine_name("auto", fp32_model) == "cuda"
    out = engine.generate(prompts, params, capture)
    runners = list(engine._decoder(capture)._runners.values())
    assert runners and all(r.graph is not None for r in runners)  # replayed, not eager
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], ref.pooled[pooling]) < 1e-3, pooling
    # a second batch of the same shape replays the captured graph with fresh state
    again = engine.generate(prompts, params, capture)
    assert again.response_ids == out.response_ids


def test_started_batches_queue_without_waiting_and_equal_single_calls(fp32_model):
    """``start`` returns while the device still works on what is queued before it, and
    batches started back to back give what each gives alone: on one captured step (the same
    buffers) and across two prompt lengths (two runners, whose prefill graphs share one memory
    pool), each batch's results are copied out before the next batch's prefill."""
    params = GenerationParams(max_new_tokens=16, temperature=0)  # two checks: none waits
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    first = _prompts(8, seed=5)
    second = [[(t + 7) % 500 + 2 for t in p] for p in first]  # the same lengths
    short = [p[:10] for p in first]  # another prompt-length bucket: a second runner
    sets = [first, short, second]
    engine = CudaEngine(fp32_model)
    alone = [engine.generate(p, params, capture) for p in sets]
    assert alone[0].response_ids != alone[2].response_ids
    # the prefills are graphs replayed over new prompts: each set equals the reference
    runners = list(engine._decoder(capture)._runners.values())
    assert len(runners) == 2
    assert all(isinstance(r.prefill_graph, torch.cuda.CUDAGraph) for r in runners)
    reference = HFEngine(fp32_model)
    for prompts, out in zip(sets, alone, strict=True):
        ref = reference.generate(prompts, params, capture)
        assert out.response_ids == ref.response_ids
        for pooling in ALL_POOLINGS:
            assert _rel(out.pooled[pooling], ref.pooled[pooling]) < 1e-3, pooling
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of device time queued ahead of the batches
    started = time.perf_counter()
    pending = [engine.start(GenerationRequest(p, params, capture)) for p in sets]
    host_seconds = time.perf_counter() - started
    assert not torch.cuda.current_stream().query(), "start waited for the device"
    for one, single in zip(pending, alone, strict=True):
        out = one.result()
        assert out.response_ids == single.response_ids
        assert out.texts == single.texts
        for pooling in ALL_POOLINGS:
            assert torch.equal(out.pooled[pooling], single.pooled[pooling]), pooling
        assert one.launched.decode_seconds is not None and one.launched.decode_seconds > 0
    assert host_seconds < 0.4, host_seconds


def test_fast_prefill_equals_reference(fp32_model):
    prompts = _prompts(8, seed=11)
    params = GenerationParams(max_new_tokens=24, temperature=0)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    ref = HFEngine(fp32_model).generate(prompts, params, capture)
    engine = CudaEngine(fp32_model)  # the default with compiled steps
    out = engine.generate(prompts, params, capture)
    assert engine._decoder(capture).plan.fast_prefill
    assert 0 < engine._decoder(capture).last_prefill_seconds < 60  # CUDA-event timing
    assert out.response_ids == ref.response_ids
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], ref.pooled[pooling]) < 1e-3, pooling
    # another prompt length reuses the compiled block (dynamic batch and length)
    shorter = [p[:3] for p in prompts[:5]]
    again = engine.generate(shorter, params, capture)
    assert again.response_ids == HFEngine(fp32_model).generate(shorter, params).response_ids


def test_eos_stopping_matches_reference(fp32_model):
    prompts = _prompts(8, seed=3)
    params = GenerationParams(max_new_tokens=40, temperature=0)
    first = CudaEngine(fp32_model).generate(prompts, params).response_ids
    stop = first[0][5]
    fp32_model.model.generation_config.eos_token_id = stop
    try:
        capture = CaptureSpec(layers=(2, 4), poolings=(Pooling.response_avg,))
        ref = HFEngine(fp32_model).generate(prompts, params, capture)
        out = CudaEngine(fp32_model).generate(prompts, params, capture)
    finally:
        fp32_model.model.generation_config.eos_token_id = 0
    assert "eos" in out.finish_reasons
    assert out.response_ids == ref.response_ids
    assert out.finish_reasons == ref.finish_reasons
    rel = _rel(out.pooled[Pooling.response_avg], ref.pooled[Pooling.response_avg])
    assert rel < 1e-3


def test_sampling_on_device_is_per_row(fp32_model):
    prompts = _prompts(6, seed=4)
    params = GenerationParams(max_new_tokens=24, temperature=0.8, top_p=0.9)
    engine = CudaEngine(fp32_model)
    together = engine.generate(prompts, params, row_seeds=list(range(6))).response_ids
    alone = engine.generate(prompts[4:5], params, row_seeds=[4]).response_ids
    assert alone[0] == together[4]
    assert len({tuple(r) for r in together}) == 6


def test_bf16_captures_match_teacher_forced():
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=5)
    prompts = _prompts(8, seed=5)
    capture = CaptureSpec(layers=tuple(range(5)), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=32, temperature=0)
    out = CudaEngine(loaded).generate(prompts, params, capture)
    forced = pooled_forward(loaded, prompts, out.response_ids, capture)
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], forced[pooling]) < 2e-2, pooling


def test_bf16_capture_rings_match_an_add_per_step():
    """The captured step stores states in rings (the default on CUDA) that the host flushes
    every 8 steps and at the end (13 steps: 8 + 5). Kernels pinned, so both engines run the
    same products. Not bit for bit: the step that adds into the float32 sums adds the residual
    sum before its rounding to bfloat16 (inductor keeps a fused kernel's intermediates in
    float32), the ring stores the rounded state, the one the next block reads. The difference
    is that rounding (~1e-3 of an element, less on average); a slot lost or flushed twice would
    move the averages by a whole step's share (1/13)."""
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=6)
    prompts = _prompts(8, seed=6)
    capture = CaptureSpec(layers=tuple(range(5)), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=13, temperature=0)
    pinned = {"gemv": "off", "fused_attention": "on", "attention_config": (64, 4, 2)}
    ringed = CudaEngine(loaded, **pinned)
    got = ringed.generate(prompts, params, capture)
    want = CudaEngine(loaded, capture_ring=0, **pinned).generate(prompts, params, capture)
    runner = next(iter(ringed._decoder(capture)._runners.values()))
    assert runner.ring_size == 8 and runner.graph is not None
    assert got.response_ids == want.response_ids
    assert _rel(got.pooled[Pooling.response_avg], want.pooled[Pooling.response_avg]) < 2e-3
    for pooling in (Pooling.prompt_last, Pooling.prompt_avg):  # the prefill: no ring
        assert torch.equal(got.pooled[pooling], want.pooled[pooling]), pooling


def test_ring_flush_kernel_adds_slots_in_order():
    from tracekit.engines.cuda.ops.ring import CaptureRings

    sums = {layer: torch.randn(5, 3000, device="cuda") for layer in (0, 3, 7)}
    start = {layer: buf.clone() for layer, buf in sums.items()}
    rings = CaptureRings(sums, 4, torch.bfloat16)
    assert rings._use_kernel
    for ring in rings.rings.values():
        ring.normal_()
    rings.flush(3)
    for layer, buf in sums.items():
        want = start[layer]
        for k in range(3):  # slot 3 is not added
            want = want + rings.rings[layer][k].float()
        assert torch.equal(buf, want), layer


@pytest.mark.parametrize("rows", [1, 8, 32, 64])
def test_triton_gemv_matches_linear(rows):
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    gemv = cuda_gemv._build()
    assert gemv is not None
    for n, k in [(384, 256), (3072, 2048), (100, 130)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        y = gemv(x, w)
        want = x.float() @ w.float().T
        assert _rel(y.float(), want) < 1e-2
        for mode in (cuda_gemv.SPLIT_K2, cuda_gemv.SPLIT_K4, cuda_gemv.SPLIT_K8):
            splits = cuda_gemv.splits_of(mode)
            if k % splits:
                continue
            partials = torch.ops.tracekit.gemv_splitk(x, w, splits)
            assert partials.shape == (splits, rows, n) and partials.dtype == torch.float32
            # each slice is its own product over K / splits columns
            part = x[:, : k // splits].float() @ w[:, : k // splits].float().T
            assert _rel(partials[0], part) < 1e-2
            assert _rel(cuda_gemv.linear(x, w, mode).float(), want) < 1e-2


@pytest.mark.parametrize("rows", [8, 32])
def test_every_swapped_gemv_configuration_matches_torch(rows):
    """Each configuration of the swapped-operand kernel that the timing may pick, for each
    product it computes (plain, gated input, swiglu output; one slice and four), against
    torch. 200 weight rows (not a multiple of any block) and 1,280 columns (in four slices of
    320: a K block of 128 or 256 leaves a part block, 64 does not), so both load paths run.
    A configuration whose tiles do not fit in shared memory is never timed, so never used:
    with the gated input or the swiglu output (more tiles) that is allowed here."""
    import torch.nn.functional as F
    from triton.runtime.errors import OutOfResources

    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    assert cuda_gemv._build() is not None
    run = cuda_gemv._STATE["run"]
    gen = torch.Generator(device="cuda").manual_seed(rows)
    n, k = 200, 1280

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)

    x, w, gate_up, w2 = randn(rows, k), randn(n, k), randn(rows, 2 * k), randn(2 * n, k)
    gate, up = gate_up.float().chunk(2, dim=-1)
    gated_x = (F.silu(gate) * up).to(torch.bfloat16)
    wants = {
        "": (x, w, x.float() @ w.float().T),
        "gated": (gate_up, w, gated_x.float() @ w.float().T),
        "swiglu": (x, w2, cuda_gemv.swiglu(x, w2, cuda_gemv.LINEAR).float()),
    }
    checked = 0
    for splits, configs in ((1, cuda_gemv.SPLIT_N_CONFIGS), (4, cuda_gemv.SPLIT_K_CONFIGS)):
        for config in [c for c in configs if c[4]]:
            for kind, (inp, weight, want) in wants.items():
                if kind == "swiglu" and splits > 1:
                    continue  # the swiglu product is one slice only
                y = torch.empty((splits, rows, want.shape[1]), device="cuda",
                                dtype=torch.float32 if splits > 1 else torch.bfloat16)  # fmt: skip
                try:
                    run(inp, weight, y if splits > 1 else y[0], splits, False, kind, config)
                except OutOfResources:  # the timing leaves out what does not fit, too
                    # only the gated input's second tile or the swiglu's doubled one may not
                    assert kind, (config, splits)
                    continue
                assert _rel(y.float().sum(0), want) < 1e-2, (config, kind, splits)
                checked += 1
    assert checked >= 20


def test_gemv_configuration_is_timed_once_kept_and_checked(tmp_path, monkeypatch):
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path))  # a fresh decisions file
    monkeypatch.setattr(cuda_gemv, "_CONFIGS", {})
    assert cuda_gemv._build() is not None
    w = torch.randn(1536, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ w.float().T

    def product() -> torch.Tensor:
        return cuda_gemv.sum_partials(torch.ops.tracekit.gemv_splitk(x, w, 4))

    assert _rel(product(), want) < 1e-2
    (name,) = [k for k in cuda_gemv.read_decisions() if k.startswith("gemv-k4-")]
    first = cuda_gemv.read_decisions()[name]
    key = (8, 1536, 2048, 4, False, "", str(w.dtype))
    assert cuda_gemv._CONFIGS[key] == cuda_gemv.SPLIT_K_CONFIGS[first]
    # a later process takes the kept configuration, whichever it is, without timing again
    other = (first + 1) % len(cuda_gemv.SPLIT_K_CONFIGS)
    cuda_gemv.save_decisions({name: other})
    cuda_gemv._CONFIGS.clear()
    assert _rel(product(), want) < 1e-2
    assert cuda_gemv._CONFIGS[key] == cuda_gemv.SPLIT_K_CONFIGS[other]
    # an index that is no configuration (another version's list) is timed again and replaced
    cuda_gemv.save_decisions({name: 63})
    cuda_gemv._CONFIGS.clear()
    assert _rel(product(), want) < 1e-2
    assert cuda_gemv.read_decisions()[name] < len(cuda_gemv.SPLIT_K_CONFIGS)


needs_pdl = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="programmatic dependent launch needs a Hopper or later GPU",
)


@needs_pdl
def test_gemv_with_pdl_is_the_same_product():
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    assert cuda_gemv._build() is not None and cuda_gemv.pdl_available(torch.device("cuda"))
    w = torch.randn(3072, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    for mode in (cuda_gemv.TRITON, cuda_gemv.SPLIT_K4):
        plain = cuda_gemv.linear(x, w, mode)
        # dependent launches in a row: each waits for the one before, results are unchanged
        y = x
        for _ in range(3):
            y = cuda_gemv.linear(y, w[:2048], mode, pdl=True)
        want = x
        for _ in range(3):
            want = cuda_gemv.linear(want, w[:2048], mode)
        assert torch.equal(cuda_gemv.linear(x, w, mode, pdl=True), plain)
        assert torch.equal(y, want)


@needs_pdl
def test_pdl_step_matches_plain_step_and_repeats_exactly():
    """Programmatic dependent launch changes when kernels start, not what they compute: the
    same tokens as without it, pooled sums within bf16 rounding (inductor tunes its reduction
    kernels per compilation, so the two compilations may sum in different orders), and a
    second run bitwise equal to the first (an overlap that read unfinished results would not
    repeat exactly)."""
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=7)
    prompts = _prompts(8, seed=7)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=40, temperature=0)
    outs, engines = {}, {}
    for pdl in (True, False):
        engines[pdl] = CudaEngine(loaded, gemv="splitk", pdl=pdl)
        outs[pdl] = engines[pdl].generate(prompts, params, capture)
        runner = next(iter(engines[pdl]._decoder(capture)._runners.values()))
        assert runner.dims.gemv.pdl is pdl, (runner.dims.gemv, pdl)
        assert runner.graph is not None, pdl
    assert outs[True].response_ids == outs[False].response_ids
    again = engines[True].generate(prompts, params, capture)
    assert again.response_ids == outs[True].response_ids
    for pooling in ALL_POOLINGS:
        assert _rel(outs[True].pooled[pooling], outs[False].pooled[pooling]) < 1e-2, pooling
        assert torch.equal(again.pooled[pooling], outs[True].pooled[pooling]), pooling


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_gated_gemv_matches_silu_then_product(rows):
    import torch.nn.functional as F

    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    assert cuda_gemv._build() is not None
    w = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
    gate_up = torch.randn(rows, 2 * 8192, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = (F.silu(gate) * up).to(torch.bfloat16).float() @ w.float().T
    for mode in (cuda_gemv.TRITON, cuda_gemv.SPLIT_K4, cuda_gemv.SPLIT_K8):
        got = cuda_gemv.gated_linear(gate_up, w, mode).float()
        assert _rel(got, want) < 1e-2, mode


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_swiglu_gemv_matches_product_then_gating(rows):
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    assert cuda_gemv._build() is not None
    w = torch.randn(2 * 8192, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    want = cuda_gemv.swiglu(x, w, cuda_gemv.LINEAR).float()
    assert want.shape == (rows, 8192)
    for pdl in (False, cuda_gemv.pdl_available(w.device)):
        got = cuda_gemv.swiglu(x, w, cuda_gemv.SWIGLU, pdl).float()
        assert _rel(got, want) < 1e-2, pdl
    # forced, it is checked against the same reference and kept
    assert cuda_gemv.choose(rows, w, cuda_gemv.SWIGLU) == cuda_gemv.SWIGLU


def test_swiglu_engine_matches_teacher_forced():
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=10)
    prompts = _prompts(8, seed=10)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=24, temperature=0)
    engine = CudaEngine(loaded, gemv_modes={"gate_up": "swiglu"})
    out = engine.generate(prompts, params, capture)
    runner = next(iter(engine._decoder(capture)._runners.values()))
    assert runner.dims.gemv.gate_up == cuda_gemv.SWIGLU
    forced = pooled_forward(loaded, prompts, out.response_ids, capture)
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], forced[pooling]) < 2e-2, pooling


def test_compiled_norms_are_one_pass_kernels():
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from tracekit.engines.cuda.compiled import compiled
    from tracekit.engines.cuda.llama import rms_norm

    gen = torch.Generator(device="cpu").manual_seed(0)
    h, r = (torch.randn(32, 2048, generator=gen).cuda().bfloat16() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(2048, generator=gen)).cuda().bfloat16()

    def norm(h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(h + r, weight, 1e-5)

    want = norm(h, r, weight).float()
    with inductor_config.patch(fx_graph_cache=False):
        # tracekit's compilation, and inductor's own heuristics
        for fn, kind in (
            (compiled("test_norm", norm), "triton_per_"),
            (torch.compile(norm), "triton_red_"),
        ):
            got, codes = run_and_get_code(fn, h, r, weight)
            assert kind in "".join(codes), kind  # one pass over the row, or two loops
            assert _rel(got.float(), want) < 1e-2


def test_pinned_linear_modes_are_used():
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=6)
    prompts = _prompts(8, seed=6)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=24, temperature=0)
    engine = CudaEngine(loaded, gemv="off")
    engine_pinned = CudaEngine(loaded, gemv_modes={"o": "splitk2", "down": "linear"})
    out = engine_pinned.generate(prompts, params, capture)
    choice = next(iter(engine_pinned._decoder(capture)._runners.values())).dims.gemv
    assert (choice.o, choice.down) == (cuda_gemv.SPLIT_K2, cuda_gemv.LINEAR)
    forced = pooled_forward(loaded, prompts, out.response_ids, capture)
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], forced[pooling]) < 2e-2, pooling
    # off: pins are not used (every layer F.linear)
    engine.generate(prompts, params, capture)
    assert not any(next(iter(engine._decoder(capture)._runners.values())).dims.gemv[:5])


def test_step_tuning_times_whole_steps_and_keeps_its_decision(tmp_path, monkeypatch):
    from tracekit.engines.cuda.tuning import TUNED_ROLES, modes_label

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path))  # a fresh decisions file
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=10)
    prompts = _prompts(8, seed=10)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=24, temperature=0)
    engine = CudaEngine(loaded)
    out = engine.generate(prompts, params, capture)
    dec = engine._decoder(capture)
    assert dec.plan.tune_steps and dec.setup_parts["step_tuning"] > 0
    tried = dec.step_timings[8]
    assert len(tried) >= 1 + len(TUNED_ROLES)  # the first choice and at least one more each
    runner = next(iter(dec._runners.values()))
    chosen = modes_label(runner.dims.gemv)
    assert tried[chosen] <= min(tried.values()) / 0.99  # the fastest, or within the margin
    forced = pooled_forward(loaded, prompts, out.response_ids, capture)
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], forced[pooling]) < 2e-2, pooling
    # a new engine (as a later run) takes the kept decision without tuning, same tokens
    again_engine = CudaEngine(loaded)
    again = again_engine.generate(prompts, params, capture)
    again_dec = again_engine._decoder(capture)
    assert again_dec.step_timings == {} and again_dec.setup_parts["step_tuning"] == 0
    assert modes_label(next(iter(again_dec._runners.values())).dims.gemv) == chosen
    assert again.response_ids == out.response_ids


def test_two_stage_argmax_matches_argmax():
    from tracekit.engines.cuda.sampling import argmax, argmax_chunk_for

    chunk = argmax_chunk_for(128256)
    values = torch.randn(9, 128256, device="cuda")
    values[3, 17] = values[3, 90000] = 1e4  # ties resolve to the first maximum
    assert torch.equal(argmax(values, chunk), values.argmax(dim=-1))


@pytest.mark.parametrize("gemv", ["on", "splitk", "off"])
def test_bf16_gemv_engine_matches_teacher_forced(gemv):
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=6)
    prompts = _prompts(8, seed=6)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=24, temperature=0)
    engine = CudaEngine(loaded, gemv=gemv)
    out = engine.generate(prompts, params, capture)
    choice = next(iter(engine._decoder(capture)._runners.values())).dims.gemv
    modes = (choice.qkv, choice.o, choice.gate_up, choice.down, choice.head)
    assert all(modes) == (gemv != "off")
    if gemv == "splitk":  # every K of the tiny model splits in two
        from tracekit.engines.cuda.ops import gemv as cuda_gemv

        assert set(modes) == {cuda_gemv.SPLIT_K2}
    forced = pooled_forward(loaded, prompts, out.response_ids, capture)
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], forced[pooling]) < 2e-2, pooling


@pytest.mark.parametrize(
    "heads,kv,head_dim,splits,bias,window,dtype",
    [
        (32, 8, 64, 1, False, None, torch.bfloat16),  # Llama-3.2-1B's attention
        (32, 8, 64, 4, False, None, torch.bfloat16),  # split-K partials summed in the kernel
        (14, 2, 64, 2, True, None, torch.bfloat16),  # a group of 7 heads, q/k/v bias (Qwen2)
        (8, 8, 80, 1, False, 40, torch.float16),  # head_dim not a power of 2, sliding window
        (12, 4, 64, 8, True, None, torch.float32),
    ],
)
def test_fused_attention_kernel_matches_reference(heads, kv, head_dim, splits, bias, window, dtype):
    from tracekit.engines.cuda.ops import attention as cuda_attention
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    pdl_modes = (False, True) if cuda_gemv.pdl_available(torch.device("cuda")) else (False,)
    cases = [(b, n, pdl) for b, n in ((1, 7), (5, 150), (3, 700)) for pdl in pdl_modes]
    for batch, length, pdl in cases:  # one slot block, several, many; plain and dependent launch
        assert cuda_attention.works(
            batch=batch,
            length=length,
            shape=cuda_attention.AttentionShape(heads, kv, head_dim, head_dim**-0.5, window),
            splits=splits,
            has_bias=bias,
            dtype=dtype,
            device=torch.device("cuda"),
            pdl=pdl,
        ), (batch, length, pdl)


@pytest.mark.parametrize(
    "heads,kv,splits,window,softcap,qk_norm",
    [
        (8, 4, 1, 40, 50.0, False),  # Gemma-2-2B (head_dim 256), a local layer's window
        (8, 4, 4, None, 50.0, False),  # a global layer, split-K partials
        (16, 8, 1, 40, None, True),  # Gemma-3-12B: q/k norms, no soft-cap
        (16, 8, 2, None, 2.0, True),  # a soft-cap low enough to bend most scores
    ],
)
def test_fused_attention_kernel_computes_gemma(heads, kv, splits, window, softcap, qk_norm):
    """Gemma's attention in the fused kernel: head_dim 256, ``query_pre_attn_scalar``
    scaling, soft-capped scores, (1 + w) q/k norms, windows; short and long slot blocks, the
    cache walk in one program or in 8 shares.
    (At head_dim 256 the configurations with long blocks and several stages do not fit in
    shared memory: they fail to launch, and the timing never picks them.)"""
    from tracekit.engines.cuda.ops import attention as cuda_attention
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    pdl = cuda_gemv.pdl_available(torch.device("cuda"))
    eps = 1e-6 if qk_norm else None
    shape = cuda_attention.AttentionShape(heads, kv, 256, 224**-0.5, window, softcap, eps)
    for config in ((16, 1, 3), cuda_attention.DEFAULT_CONFIG, (128, 4, 2), (64, 4, 2, 8)):
        for batch, length in ((1, 7), (5, 150), (3, 700)):
            assert cuda_attention.works(
                batch=batch,
                length=length,
                shape=shape,
                splits=splits,
                has_bias=False,
                dtype=torch.bfloat16,
                device=torch.device("cuda"),
                pdl=pdl,
                config=config,
            ), (config, batch, length)


def test_gemma_kernel_check_fails_without_the_soft_cap_or_norms():
    """The check that admits the kernel is not blind to Gemma's parts: the kernel run with a
    soft-cap (or q/k norms) disagrees with the reference run without them."""
    from tracekit.engines.cuda.ops import attention as cuda_attention

    gen = torch.Generator(device="cpu").manual_seed(0)
    dev = torch.device("cuda")
    batch, n_heads, n_kv, hd, length = 2, 8, 4, 256, 100
    qkv = torch.randn(batch, (n_heads + 2 * n_kv) * hd, generator=gen).to(dev, torch.bfloat16)
    angles = torch.rand(batch, hd, generator=gen).to(dev)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    cache = torch.randn(2, batch, n_kv, length, hd, generator=gen).to(dev, torch.bfloat16)
    slot = torch.tensor([length - 2], device=dev)
    pad = torch.zeros(batch, dtype=torch.long, device=dev)
    scale = 1.0 + torch.randn(hd, generator=gen).to(dev)
    plain = cuda_attention.AttentionShape(n_heads, n_kv, hd, 224**-0.5, None)

    def run(shape, fused):
        fn = cuda_attention.decode_attention if fused else cuda_attention.reference
        k, v = cache[0].clone(), cache[1].clone()
        return fn(qkv, None, cos, sin, k, v, slot, pad, shape, q_norm=scale, k_norm=scale)

    want = run(plain, False)
    for shape in (plain._replace(softcap=0.5), plain._replace(qk_norm_eps=1e-6)):
        got = run(shape, True)
        assert _rel(got, want) > 0.1, shape
        assert _rel(got, run(shape, False)) < 2e-2, shape


def test_every_attention_configuration_matches_reference():
    from tracekit.engines.cuda.ops import attention as cuda_attention
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    pdl = cuda_gemv.pdl_available(torch.device("cuda"))
    for config in cuda_attention.CONFIGS:
        for batch, length in ((5, 150), (2, 700)):  # a few slot blocks; many
            assert cuda_attention.works(
                batch=batch,
                length=length,
                shape=cuda_attention.AttentionShape(32, 8, 64, 64**-0.5, None),
                splits=1,
                has_bias=False,
                dtype=torch.bfloat16,
                device=torch.device("cuda"),
                pdl=pdl,
                config=config,
            ), (config, batch, length)


def test_attention_configuration_is_timed_once_kept_and_checked(tmp_path, monkeypatch):
    from tracekit.engines.cuda.ops import attention as cuda_attention
    from tracekit.engines.cuda.ops import gemv as cuda_gemv

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path))  # a fresh decisions file
    monkeypatch.setattr(cuda_attention, "_CONFIGS", {})
    shape = cuda_attention.AttentionShape(32, 8, 64, 0.125, None)
    where = dict(batch=16, length=192, slot=128, splits=1, shape=shape, dtype=torch.bfloat16)
    where.update(device=torch.device("cuda"), pdl=False)
    first = cuda_attention.kernel_config(**where)
    assert first in cuda_attention.CONFIGS
    (name,) = [k for k in cuda_gemv.read_decisions() if k.startswith("attention-")]
    assert "16x32x8x64x192@128" in name
    assert cuda_attention.CONFIGS[cuda_gemv.read_decisions()[name]] == first
    # a later process takes the kept configuration, whichever it is, without timing again
    other = (cuda_attention.CONFIGS.index(first) + 1) % len(cuda_attention.CONFIGS)
    cuda_gemv.save_decisions({name: other})
    cuda_attention._CONFIGS.clear()
    assert cuda_attention.kernel_config(**where) == cuda_attention.CONFIGS[other]
    # an index that is no configuration (another version's list) is timed again and replaced
    cuda_gemv.save_decisions({name: 63})
    cuda_attention._CONFIGS.clear()
    assert cuda_attention.kernel_config(**where) in cuda_attention.CONFIGS
    assert cuda_gemv.read_decisions()[name] < len(cuda_attention.CONFIGS)


def test_fused_attention_step_equals_unfused(fp32_model):
    prompts = _prompts(8, seed=9)
    params = GenerationParams(max_new_tokens=32, temperature=0)
    capture = CaptureSpec(layers=(0, 2, 4), poolings=ALL_POOLINGS)
    fused_engine = CudaEngine(fp32_model, fused_attention="on")
    fused = fused_engine.generate(prompts, params, capture)
    plain_engine = CudaEngine(fp32_model, fused_attention="off")
    plain = plain_engine.generate(prompts, params, capture)
    used = [r.dims.fused_attention for r in fused_engine._decoder(capture)._runners.values()]
    assert used == [True]
    assert not any(r.dims.fused_attention for r in plain_engine._decoder(capture)._runners.values())
    assert fused.response_ids == plain.response_ids
    for pooling in ALL_POOLINGS:
        assert _rel(fused.pooled[pooling], plain.pooled[pooling]) < 1e-4, pooling
