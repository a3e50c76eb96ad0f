"""Pooling of captured hidden states into one vector per row, layer and pooling.

One accumulator serves both paths that must agree: capture during generation (prefill, then
one position per decode step) and the teacher-forced forward over prompt + response
(``tracekit extract activations``). Everything stays on the model's device as running float32
sums; no hidden-state tuple is ever kept.

Definitions (``P`` = real prompt length of a row, response tokens ``r_0 .. r_{n-1}`` exclude
the eos token that stopped the row; a state "at" a token is the residual stream computed when
that token is the *input* at its position):

- ``prompt_last``: the state at the last prompt token (position ``P - 1``). With a chat
  template this is the last token of the assistant header, i.e. the state that predicts the
  first response token.
- ``prompt_avg``: the mean of the states at the ``P`` real prompt tokens (padding excluded).
- ``response_avg``: the mean of the states at the ``n`` response tokens ``r_0 .. r_{n-1}``
  (positions ``P .. P + n - 1``). A row with an empty response (eos first) gets zeros.

During generation the state at the last response token of a row that stopped by length is not
computed by the decode loop, so the reference engine feeds those tokens once more (one extra
decode step for the whole batch, only when ``response_avg`` is asked for). The teacher-forced
path computes the same positions directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator

if TYPE_CHECKING:
    import torch


class Pooling(StrEnum):
    """How a row's hidden states at one layer are pooled into one vector."""

    response_avg = "response_avg"
    prompt_last = "prompt_last"
    prompt_avg = "prompt_avg"


def parse_poolings(values: Sequence[str | Pooling]) -> tuple[Pooling, ...]:
    """Unique poolings in the order given; raises ``ValueError`` naming a bad one."""
    out: list[Pooling] = []
    for value in values:
        for part in str(value).split(","):
            name = part.strip()
            if not name:
                continue
            try:
                pooling = Pooling(name)
            except ValueError:
                valid = ", ".join(p.value for p in Pooling)
                raise ValueError(f"unknown pooling '{name}': use one of {valid}") from None
            if pooling not in out:
                out.append(pooling)
    if not out:
        raise ValueError("no pooling given: use response_avg, prompt_last or prompt_avg")
    return tuple(out)


def _poolings_field(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    return parse_poolings(value) if isinstance(value, (list, tuple)) else value


Poolings = Annotated[tuple[Pooling, ...], BeforeValidator(_poolings_field)]
"""Config field type: ``"response_avg,prompt_last"`` or a list, parsed by :func:`parse_poolings`."""


class PooledAccumulator:
    """Running masked sums per pooling, shaped ``[batch, n_layers, hidden]``, on the device.

    Callers hand it each layer's hidden states with masks saying which positions are real prompt
    tokens and which are response tokens; :meth:`result` divides by the counts.
    """

    def __init__(
        self,
        layers: Sequence[int],
        poolings: Sequence[Pooling],
        batch: int,
        hidden: int,
        device: torch.device,
    ) -> None:
        import torch

        self.layers = tuple(layers)
        self.poolings = tuple(poolings)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        shape = (batch, len(self.layers), hidden)
        self._sums = {p: torch.zeros(shape, dtype=torch.float32, device=device) for p in poolings}
        # token counts per row, per pooling (layers see the same positions)
        self._counts = {p: torch.zeros(batch, dtype=torch.float32, device=device) for p in poolings}
        self._counted: set[tuple[Pooling, int]] = set()

    @property
    def wants_response(self) -> bool:
        return Pooling.response_avg in self._sums

    def add(
        self,
        layer: int,
        hidden: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        prompt_last_index: torch.Tensor | None = None,
        step: int = 0,
    ) -> None:
        """Accumulate ``hidden`` ``[batch, seq, hidden]`` of ``layer``.

        ``prompt_mask``/``response_mask`` are ``[batch, seq]`` (1 = real prompt / response
        token); ``prompt_last_index`` ``[batch]`` is the position of each row's last prompt
        token. ``step`` identifies the forward call, so counts are added once per call (not once
        per layer).
        """
        slot = self._slot.get(layer)
        if slot is None:
            return
        h = hidden.detach()
        for pooling, total in self._sums.items():
            if pooling is Pooling.prompt_last:
                if prompt_last_index is None:
                    continue
                rows = torch_arange(h.shape[0], h.device)
                total[:, slot] += h[rows, prompt_last_index].float()
                self._count(pooling, step, None, h.shape[0])
                continue
            mask = prompt_mask if pooling is Pooling.prompt_avg else response_mask
            if mask is None:
                continue
            total[:, slot] += masked_sum(h, mask)
            self._count(pooling, step, mask.float().sum(dim=1), h.shape[0])

    def _count(self, pooling: Pooling, step: int, amount: torch.Tensor | None, batch: int) -> None:
        key = (pooling, step)
        if key in self._counted:
            return
        self._counted.add(key)
        if amount is None:
            self._counts[pooling] += 1.0
        else:
            self._counts[pooling] += amount

    def result(self, to_host: bool = True) -> dict[Pooling, torch.Tensor]:
        """Means per pooling, ``[batch, n_layers, hidden]`` float32 (0 where empty), on the CPU
        or (``to_host=False``) still on the device, so the caller can overlap the copy. The
        host copy goes through pinned memory (a pageable copy of tens of MB is several times
        slower)."""
        from tracekit.engines.host_copy import HostCopy

        out = {}
        for pooling, total in self._sums.items():
            count = self._counts[pooling].clamp(min=1.0).view(-1, 1, 1)
            out[pooling] = total / count
        return HostCopy(out).wait() if to_host else out


def masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(hidden * mask[..., None]).sum(dim=1)`` in float32: ``[batch, hidden]``.

    One batched matrix product ``mask[:, None, :] @ hidden`` (see :func:`masked_sums`) instead of
    a float32 copy of the whole ``[batch, seq, hidden]`` tensor and a product.
    """
    if hidden.shape[1] == 1:  # a decode step: nothing to reduce
        import torch

        return hidden[:, 0].float() * mask.to(torch.float32)
    return masked_sums(hidden, mask.unsqueeze(1)).squeeze(1)


def masked_sums(hidden: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``masks @ hidden`` in float32: ``[batch, k, hidden]`` for ``masks`` ``[batch, k, seq]``.

    On CUDA a bf16/fp16 ``hidden`` is read once, in its own dtype, with float32 accumulation and
    output (0/1 mask values are exact in any float type), so pooling every layer of a long
    teacher-forced batch costs one read of each layer's states, whatever the number of masks.
    """
    import torch

    if hidden.dtype == torch.float32:
        return torch.bmm(masks.to(torch.float32), hidden)
    if hidden.is_cuda and _BMM_OUT_DTYPE.get("ok", True):
        try:
            return torch.bmm(masks.to(hidden.dtype), hidden, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without ``bmm(..., out_dtype=)``
            _BMM_OUT_DTYPE["ok"] = False
    return torch.bmm(masks.to(torch.float32), hidden.float())


_BMM_OUT_DTYPE: dict[str, bool] = {}


def torch_arange(n: int, device: torch.device) -> torch.Tensor:
    import torch

    return torch.arange(n, device=device)
