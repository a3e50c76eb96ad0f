"""How far an engine's bfloat16 captures sit from float32, next to HF's own bfloat16 forward.

A bf16 engine cannot match a float32 forward; what it owes is to be no further from it than the
model's own bf16 forward is. :func:`bf16_errors` measures both against the same float32
reference: the model in float32, teacher-forced (the reference engine) over the prompts and the
tokens the bf16 engine generated, so all three see the same tokens. Errors are relative by norm
over the batch, per pooling and layer: ``|x - ref| / |ref|``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tracekit.models.loading import LoadedModel


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` (Frobenius norms, float32)."""
    diff = (got.float() - want.float()).norm()
    return float(diff / want.float().norm().clamp(min=1e-12))


def as_bf16(loaded32: LoadedModel) -> LoadedModel:
    """A bfloat16 copy of a float32 model (same weights, rounded once)."""
    import torch

    model = copy.deepcopy(loaded32.model).to(torch.bfloat16)
    handles = type(loaded32.handles).of(model)
    return dataclasses.replace(loaded32, model=model, dtype=torch.bfloat16, handles=handles)


def bf16_errors(
    loaded32: LoadedModel,
    prompts: Sequence[Sequence[int]],
    new_tokens: int = 32,
    engine: str = "cuda",
) -> dict[str, dict[str, list[float]]]:
    """Per pooling: ``{"engine": [error per layer], "hf": [error per layer]}`` of the engine's
    bf16 captures (greedy generation, every layer captured) and of HF's bf16 teacher-forced
    forward, both against the float32 teacher-forced forward of ``loaded32``'s weights."""
    from tracekit.engines.interface import CaptureSpec, GenerationParams, create_engine
    from tracekit.engines.pooling import Pooling
    from tracekit.engines.teacher_forced import pooled_forward

    loaded16 = as_bf16(loaded32)
    poolings = (Pooling.response_avg, Pooling.prompt_last, Pooling.prompt_avg)
    capture = CaptureSpec(layers=tuple(range(loaded32.n_layers)), poolings=poolings)
    params = GenerationParams(max_new_tokens=new_tokens, temperature=0)
    fast = create_engine(engine, loaded16)
    plan_job = getattr(fast, "plan_job", None)
    if plan_job is not None:  # one batch: no kernel timing (what a short job runs)
        plan_job(len(prompts), new_tokens, len(prompts))
    out = fast.generate(prompts, params, capture)
    ref = pooled_forward(loaded32, prompts, out.response_ids, capture, engine="hf")
    hf16 = pooled_forward(loaded16, prompts, out.response_ids, capture, engine="hf")
    errors: dict[str, dict[str, list[float]]] = {}
    for pooling in poolings:
        layers = range(loaded32.n_layers)
        errors[str(pooling)] = {
            "engine": [
                relative_error(out.pooled[pooling][:, i], ref[pooling][:, i]) for i in layers
            ],
            "hf": [relative_error(hf16[pooling][:, i], ref[pooling][:, i]) for i in layers],
        }
    return errors
