"""Teacher-forced pooled activations: one forward over prompt + response per batch.

This is stage 2 (``tracekit extract activations``) and the reference the generation capture is
tested against. It uses the same :class:`~tracekit.generation.pooling.PooledAccumulator` and the
same definitions (see :mod:`tracekit.generation.pooling`): rows are ``prompt_ids + response_ids``
left-padded into one batch; prompt and response positions get their own masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tracekit.generation.engine import CaptureSpec, left_pad, position_ids_from_mask, to_device
from tracekit.generation.hf_engine import check_capture_layers, forward_kwargs, input_device
from tracekit.generation.pooling import PooledAccumulator, Pooling

if TYPE_CHECKING:
    import torch

    from tracekit.models.loading import LoadedModel


def pooled_forward(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    capture: CaptureSpec,
    to_host: bool = True,
) -> dict[Pooling, torch.Tensor]:
    """Pooled states ``[batch, n_layers, hidden]`` per pooling (float32) for one batch: on the
    CPU, or with ``to_host=False`` on the model's device, the work possibly still queued (hand
    them to :class:`HostCopy` to overlap the copy with the next batch)."""
    import torch

    from tracekit.models.capture import LayerTaps

    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids must have the same number of rows")
    check_capture_layers(loaded, capture)
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


class HostCopy:
    """Device results copied to the host without blocking: the copies queue on the stream
    behind the forward that makes them, and :meth:`wait` returns them once they landed. A
    caller that starts the next batch before waiting keeps the GPU busy meanwhile."""

    def __init__(self, values: dict[Pooling, torch.Tensor]) -> None:
        import torch

        self._event: Any = None
        if not any(v.is_cuda for v in values.values()):
            self._values = {k: v.cpu() for k, v in values.items()}
            return
        self._values = {}
        for key, value in values.items():
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._values[key] = host.copy_(value, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> dict[Pooling, torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._values
