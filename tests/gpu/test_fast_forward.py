"""The compiled teacher-forced forward (cuda_forward) on a GPU against the HF reference path.

Random-init Llama (nothing downloaded). float32 with TF32 off: pooled states within 1e-4
(relative, by norm); bfloat16: within 2e-2 (bf16 rounding of two different kernel sequences).
Several lengths and batch sizes go through one compiled block (dynamic shapes).
"""

from __future__ import annotations

import pytest
import torch

from tracekit.engines.interface import CaptureSpec
from tracekit.engines.pooling import Pooling
from tracekit.engines.teacher_forced import (
    pooled_batches,
    pooled_forward,
    resolve_forward_engine,
)
from tracekit.models.random_model import random_llama

pytestmark = pytest.mark.gpu

ALL = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)


def _rows(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    p_len = torch.randint(3, 60, (n,), generator=gen).tolist()
    r_len = torch.randint(0, 70, (n,), generator=gen).tolist()
    prompts = [torch.randint(2, 512, (k,), generator=gen).tolist() for k in p_len]
    responses = [torch.randint(2, 512, (k,), generator=gen).tolist() for k in r_len]
    return prompts, responses


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_compiled_forward_matches_reference(dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    loaded = random_llama("tiny", device="cuda", dtype=dtype, seed=1)
    assert resolve_forward_engine("auto", loaded) == "cuda"
    capture = CaptureSpec((0, 1, 2, loaded.n_layers - 1), ALL)
    prompts, responses = _rows(19, seed=3)
    fast = list(pooled_batches(loaded, prompts, responses, capture, 8, "cuda"))
    ref = list(pooled_batches(loaded, prompts, responses, capture, 8, "hf"))
    assert [(s, e) for s, e, _ in fast] == [(0, 8), (8, 16), (16, 19)]
    for pooling in ALL:
        got = torch.cat([p[pooling] for _, _, p in fast])
        want = torch.cat([p[pooling] for _, _, p in ref])
        assert got.shape == want.shape == (19, 4, loaded.hidden_size)
        assert _rel(got, want) < tol, pooling
    from tracekit.engines.cuda.forward import fast_forward

    assert fast_forward(loaded.model).compile  # the compiled path ran, not the eager one


def test_compiled_forward_one_row_equals_its_batch():
    loaded = random_llama("tiny", device="cuda", dtype="float32", seed=2)
    capture = CaptureSpec((3,), (Pooling.response_avg,))
    prompts, responses = _rows(5, seed=4)
    together = pooled_forward(loaded, prompts, responses, capture, engine="cuda")
    for i in range(5):
        alone = pooled_forward(loaded, prompts[i : i + 1], responses[i : i + 1], capture)
        assert _rel(alone[Pooling.response_avg][0], together[Pooling.response_avg][i]) < 1e-4
