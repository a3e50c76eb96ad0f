"""Teacher-forced pooled activations: one forward over prompt + response per batch.

This is stage 2 (``tracekit extract activations``) and the reference the generation capture is
tested against. It uses the same :class:`~tracekit.engines.pooling.PooledAccumulator` and the
same definitions (see :mod:`tracekit.engines.pooling`): rows are ``prompt_ids + response_ids``
left-padded into one batch; prompt and response positions get their own masks.

``engine="cuda"`` (what ``auto`` picks for a supported model on a CUDA device) runs the compiled
forward of :mod:`tracekit.engines.cuda.forward` instead: same definitions, right padding and
causal flash attention, equal within floating-point tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tracekit.engines.hf import check_capture_layers, forward_kwargs, input_device
from tracekit.engines.interface import (
    CaptureSpec,
    HostCopy,
    left_pad,
    position_ids_from_mask,
    resolve_engine_name,
    to_device,
)
from tracekit.engines.pooling import PooledAccumulator, Pooling
from tracekit.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

    from tracekit.models.loading import LoadedModel


TEACHER_FORCED_ENGINES = ("auto", "hf", "cuda")


def resolve_forward_engine(name: str, loaded: LoadedModel) -> str:
    """``auto`` -> ``cuda`` for a supported model on one CUDA device, else ``hf``; ``cuda`` on
    a model the fast forward cannot run raises :class:`ModelError` saying why."""
    from tracekit.engines.cuda.arch import unsupported_reason

    if name not in TEACHER_FORCED_ENGINES:
        raise ConfigError(
            f"unknown engine '{name}'", f"choose one of {', '.join(TEACHER_FORCED_ENGINES)}"
        )
    if name != "cuda":  # auto: the same rule as the generation engines
        return resolve_engine_name(name, loaded)
    reason = unsupported_reason(loaded.model)
    if reason is not None:
        raise ModelError(
            f"the fast teacher-forced forward cannot run this model: {reason}",
            "use --engine hf (the reference path runs every causal LM)",
        )
    return name


def pooled_forward(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    capture: CaptureSpec,
    to_host: bool = True,
    engine: str = "auto",
) -> dict[Pooling, torch.Tensor]:
    """Pooled states ``[batch, n_layers, hidden]`` per pooling (float32) for one batch: on the
    CPU, or with ``to_host=False`` on the model's device, the work possibly still queued (hand
    them to :class:`~tracekit.engines.interface.HostCopy`, as :func:`pooled_batches` does).
    ``engine``: see :func:`resolve_forward_engine`."""
    import torch

    from tracekit.models.capture import LayerTaps

    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids must have the same number of rows")
    check_capture_layers(loaded, capture)
    if resolve_forward_engine(engine, loaded) == "cuda":
        from tracekit.engines.cuda.forward import fast_forward

        pad_id = int(loaded.tokenizer.pad_token_id or 0)
        pooled = fast_forward(loaded.model).pooled(
            prompt_ids, response_ids, capture.layers, capture.poolings, pad_id
        )
        return HostCopy(pooled).wait() if to_host else pooled
    device = input_device(loaded)
    batch = len(prompt_ids)
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    pad_id = int(loaded.tokenizer.pad_token_id)
    ids, mask = left_pad(rows, pad_id, device)
    width = ids.shape[1]
    positions = torch.arange(width, device=device).unsqueeze(0)
    resp_len = to_device(torch.tensor([len(r) for r in response_ids]), device).unsqueeze(1)
    response_start = width - resp_len
    response_mask = (positions >= response_start).long()
    prompt_mask = mask * (1 - response_mask)
    prompt_last = (response_start.squeeze(1) - 1).clamp(min=0)

    acc = PooledAccumulator(capture.layers, capture.poolings, batch, loaded.hidden_size, device)

    def on_layer(layer: int, hidden: torch.Tensor) -> None:
        acc.add(
            layer,
            hidden.to(device),
            prompt_mask=prompt_mask,
            response_mask=response_mask,
            prompt_last_index=prompt_last,
            step=0,
        )

    kwargs: dict[str, Any] = forward_kwargs(loaded.model)
    with torch.inference_mode(), LayerTaps(loaded.handles, capture.layers, on_layer):
        loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            **kwargs,
        )
    return acc.result(to_host=to_host)


def pooled_batches(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    capture: CaptureSpec,
    batch_size: int,
    engine: str = "auto",
) -> Iterator[tuple[int, int, dict[Pooling, torch.Tensor]]]:
    """:func:`pooled_forward` over consecutive batches: ``(start, end, pooled on the CPU)``.

    One batch in flight: batch *i + 1* is queued on the device before batch *i*'s results are
    waited for, so their host copy (and whatever the caller does with them) overlaps the next
    forward.
    """
    engine = resolve_forward_engine(engine, loaded)
    pending: tuple[int, int, HostCopy] | None = None
    for start in range(0, len(prompt_ids), batch_size):
        end = min(start + batch_size, len(prompt_ids))
        pooled = pooled_forward(
            loaded,
            prompt_ids[start:end],
            response_ids[start:end],
            capture,
            to_host=False,
            engine=engine,
        )
        queued = (start, end, HostCopy(pooled, snapshot=False))  # fresh tensors
        if pending is not None:
            yield pending[0], pending[1], pending[2].wait()
        pending = queued
    if pending is not None:
        yield pending[0], pending[1], pending[2].wait()
