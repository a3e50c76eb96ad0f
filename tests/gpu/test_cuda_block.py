"""The fused block products (tracekit.engines.cuda.ops.block) on a GPU.

Each product against plain torch at the Llama-3.2-1B shapes the benchmark uses, in every K
split, twice in a row (the split-K counters must reset themselves), with programmatic
dependent launch where the GPU has it; then the engine with fused blocks against a
teacher-forced forward and against the compiled step.
"""

from __future__ import annotations

import pytest
import torch

from tracekit.engines.cuda.engine import CudaEngine
from tracekit.engines.cuda.ops import block as cuda_block
from tracekit.engines.cuda.ops import gemv as cuda_gemv
from tracekit.engines.interface import CaptureSpec, GenerationParams
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import pooled_forward
from tracekit.models.random_model import random_llama

pytestmark = pytest.mark.gpu

ALL_POOLINGS = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
BF16 = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _pdl() -> bool:
    return cuda_gemv.pdl_available(torch.device("cuda"))


def _rand(*shape: int, scale: float = 1.0, dtype: torch.dtype = BF16) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("capture", [False, True])
def test_residual_product_matches_reference_twice(rows, splits, capture):
    torch.manual_seed(rows * 10 + splits)
    w = _rand(2048, 8192, scale=0.02)
    x, res = _rand(rows, 8192), _rand(rows, 2048)
    work = cuda_block.workspace(rows, 2048, torch.device("cuda"))
    weight = torch.rand(rows, device="cuda")
    for _ in range(2):  # the second launch finds its counters reset
        cap = torch.randn(rows, 2048, device="cuda")
        cap_ref = cap.clone()
        out, ss = cuda_block.residual_product(
            x, w, res, work, splits, (cap, weight) if capture else None, _pdl()
        )
        want, ss_want = cuda_block.residual_reference(
            x, w, res, (cap_ref, weight) if capture else None
        )
        assert out.dtype == BF16 and ss.dtype == torch.float32
        assert _rel(out, want) < 1e-2
        total = cuda_block.totals(ss, rows)
        assert _rel(total, cuda_block.totals(ss_want, rows)) < 1e-2
        assert _rel(cap, cap_ref) < 1e-3
        assert _rel(total, cuda_block.sum_of_squares(out)) < 1e-5  # of the stored states
    assert int(work.counters.abs().sum()) == 0
    # bitwise repeatable: the partials are added in a fixed order
    cap = torch.zeros(rows, 2048, device="cuda")
    again, ss_again = cuda_block.residual_product(
        x, w, res, work, splits, (cap, weight) if capture else None, _pdl()
    )
    assert torch.equal(again, out) and torch.equal(ss_again, ss)


@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("splits", [1, 4, 8])
def test_norm_product_matches_reference(rows, splits):
    torch.manual_seed(rows + splits)
    w = _rand(3072, 2048, scale=0.02)
    h = _rand(rows, 2048, scale=3.0)
    ln = (1 + 0.1 * torch.randn(2048, device="cuda")).to(BF16)
    ss = cuda_block.row_sums(h)
    got = cuda_block.norm_product(h, ss, ln, w, 1e-5, splits, _pdl())
    if splits > 1:
        assert got.shape == (splits, rows, 3072) and got.dtype == torch.float32
        got = cuda_gemv.sum_partials(got)
    want = cuda_block.norm_product_reference(h, ss, ln, w, 1e-5)
    assert _rel(got, want) < 1e-2
    # the same norm as the engine's compiled pieces compute it
    from tracekit.engines.cuda.llama import rms_norm

    assert _rel(want, torch.nn.functional.linear(rms_norm(h, ln, 1e-5), w)) < 1e-2


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_norm_gated_product_matches_reference(rows):
    torch.manual_seed(rows)
    gate_up = _rand(2 * 8192, 2048, scale=0.02)
    h = _rand(rows, 2048)
    ln = (1 + 0.1 * torch.randn(2048, device="cuda")).to(BF16)
    ss = cuda_block.row_sums(h)
    got = cuda_block.norm_gated_product(h, ss, ln, gate_up, 1e-5, _pdl())
    want = cuda_block.norm_gated_reference(h, ss, ln, gate_up, 1e-5)
    assert got.shape == (rows, 8192)
    assert _rel(got, want) < 1e-2


def test_fused_block_engine_matches_teacher_forced_and_compiled_step():
    loaded = random_llama("tiny", device="cuda", dtype="bfloat16", seed=11)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 512, (int(k),), generator=gen).tolist() for k in range(5, 37, 4)]
    capture = CaptureSpec(layers=(0, 1, 2, 4), poolings=ALL_POOLINGS)
    params = GenerationParams(max_new_tokens=32, temperature=0)
    engine = CudaEngine(loaded, fused_block=True)
    out = engine.generate(prompts, params, capture)
    runner = next(iter(engine._decoder(capture)._runners.values()))
    assert runner.dims.block is not None and runner.graph is not None
    forced = pooled_forward(loaded, prompts, out.response_ids, capture)
    for pooling in ALL_POOLINGS:
        assert _rel(out.pooled[pooling], forced[pooling]) < 2e-2, pooling
    # the first token comes from the prefill, shared with the compiled step; later ones may
    # part at bf16 near-ties (the norms round differently), so only the first is compared
    plain = CudaEngine(loaded, fused_block=False).generate(prompts, params, capture)
    assert [r[:1] for r in plain.response_ids] == [r[:1] for r in out.response_ids]
    for pooling in (Pooling.prompt_last, Pooling.prompt_avg):
        assert _rel(out.pooled[pooling], plain.pooled[pooling]) < 1e-2, pooling
    # replays repeat bit for bit (no result read before it was finished)
    again = engine.generate(prompts, params, capture)
    assert again.response_ids == out.response_ids
    for pooling in ALL_POOLINGS:
        assert torch.equal(again.pooled[pooling], out.pooled[pooling]), pooling
