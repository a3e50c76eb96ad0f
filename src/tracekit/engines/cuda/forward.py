"""Teacher-forced pooled forward on the fast path: compiled blocks, causal flash attention.

The fast path of ``tracekit extract activations`` (and of
:func:`tracekit.engines.teacher_forced.pooled_forward` with ``engine="cuda"``). It runs the
same functional decoder block as the CUDA engine (the architecture's ``block_kv``,
:mod:`tracekit.engines.cuda.arch`: fused q/k/v and gate/up products, the model's own rotary
tables) over whole sequences, and pools each
chosen layer's states as the block that makes them finishes.

Two choices make it fast:

- **Right padding, no attention mask.** Rows are ``prompt + response`` padded on the *right*, so
  every real token sits at positions ``0 .. n-1`` and every pad token comes after all of them.
  Under a causal mask no real token can see a pad token, so plain causal attention is exact for
  the real tokens (the pad positions compute values nobody reads), and
  ``scaled_dot_product_attention`` can take its flash kernel. The reference path
  (:mod:`tracekit.engines.teacher_forced`) pads on the left and passes a mask.
- **One compiled block.** Every block runs the same function, compiled once by ``torch.compile``
  with the batch and sequence dimensions dynamic, so the norms, rotary embedding, SiLU and the
  residual adds fuse into a few kernels around cuBLAS products. Batches of any length reuse it.

Pooling reads each chosen layer's ``[batch, seq, hidden]`` states once: one batched product with
the ``[batch, 2, seq]`` prompt/response masks (float32 accumulation) and one gather for
``prompt_last``. Only the blocks up to the deepest chosen layer run.

On CPU the same code runs eagerly; the tests check it there against the reference path.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tracekit.engines.cuda.arch import architecture_for
from tracekit.engines.pooling import Pooling, masked_sums
from tracekit.models.layers import LayerHandles

if TYPE_CHECKING:
    import torch

SEQ_MULTIPLE = 8
"""Sequence lengths are padded up to a multiple of this (pad positions are never read)."""


def _states_only(block_kv: Any) -> Any:
    """The architecture's sequence block returning only its output states (no keys, values)."""

    def block(*args: Any) -> Any:
        return block_kv(*args)[0]

    return block


class FastForward:
    """Pooled teacher-forced states of an HF model the fast path runs (see the module docstring).

    ``compile`` and ``fuse_weights`` default to on for CUDA and off elsewhere. Fusing re-lays
    the model's q/k/v and gate/up weights into one buffer each (values unchanged; the HF model
    keeps working and shares them), as the CUDA engine does.
    """

    def __init__(
        self, model: Any, *, compile: bool | None = None, fuse_weights: bool | None = None
    ) -> None:
        import torch

        self.model = model
        arch = architecture_for(model)  # raises ModelError for unsupported models
        self.spec = arch.decoder_spec(model)
        self.handles = LayerHandles.of(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        tensors = arch.model_tensors(model)
        self.arch = arch
        self.embed = tensors.embed
        self.rotary = tensors.rotary
        self.rope_tables = arch.rope_tables
        with torch.no_grad():
            fuse = on_cuda if fuse_weights is None else fuse_weights
            self.weights = arch.collect_weights(model, self.handles, bool(fuse))
        self.cos_table = self.sin_table = torch.empty(0)
        self.fn_block = _states_only(arch.block_kv)
        if self.compile:  # one compiled block for every batch size and length
            from tracekit.engines.cuda.compiled import compiled_dynamic

            self.fn_block = compiled_dynamic(f"{arch.name}.block", self.fn_block)

    @staticmethod
    def _length_dims(
        h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """The batch and sequence dimensions of the block's inputs (dynamic when compiled):
        ``cos``/``sin`` ``[seq, ...]``, ``mask`` ``[seq, seq]``."""
        dims = [(h, (0, 1)), (cos, (0,)), (sin, (0,))]
        if mask is not None:
            dims.append((mask, (0, 1)))
        return dims

    def _ensure_rope(self, length: int) -> None:
        if self.cos_table.shape[0] >= length:
            return
        size = max(length, 2 * self.cos_table.shape[0], 256)
        self.cos_table, self.sin_table = self.rope_tables(
            self.rotary, size, self.dtype, self.device
        )

    def _inputs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        pad_id: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the model's device (queued through pinned memory): the right-padded ids
        ``[batch, width]``, the prompt and response masks ``[batch, 2, width]`` in the model's
        dtype, and each row's last prompt position."""
        import torch

        dev = self.device
        batch = len(prompt_ids)
        p_len = [len(p) for p in prompt_ids]
        n_len = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        width = max(max(n_len, default=1), 1)
        width = -(-width // SEQ_MULTIPLE) * SEQ_MULTIPLE
        host_ids = torch.full((batch, width), int(pad_id), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            row = list(p) + list(r)
            if row:
                host_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        # masks [batch, 2, width]: row 0 = real prompt tokens, row 1 = response tokens
        cols = torch.arange(width)
        p_t, n_t = torch.tensor(p_len)[:, None], torch.tensor(n_len)[:, None]
        masks = torch.stack([cols[None] < p_t, (cols[None] >= p_t) & (cols[None] < n_t)], dim=1)
        last = (torch.tensor(p_len) - 1).clamp(min=0)
        pinned = dev.type == "cuda"
        if pinned:
            host_ids, masks, last = (t.pin_memory() for t in (host_ids, masks, last))
        ids = host_ids.to(dev, non_blocking=pinned)
        return (
            ids,
            masks.to(dev, non_blocking=pinned).to(self.dtype),
            last.to(dev, non_blocking=pinned),
        )

    def pooled(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        layers: Sequence[int],
        poolings: Sequence[Pooling],
        pad_id: int = 0,
    ) -> dict[Pooling, torch.Tensor]:
        """Per pooling, ``[batch, len(layers), hidden]`` float32 on the model's device (the
        work possibly still queued). Definitions as in :mod:`tracekit.engines.pooling`."""
        import torch

        if len(prompt_ids) != len(response_ids):
            raise ValueError("prompt_ids and response_ids must have the same number of rows")
        bad = [layer for layer in layers if not 0 <= layer < self.handles.n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range 0-{self.handles.n_layers - 1}")
        spec, dev = self.spec, self.device
        batch = len(prompt_ids)
        ids, masks, last = self._inputs(prompt_ids, response_ids, pad_id)
        width = ids.shape[1]
        counts = masks.float().sum(dim=2).clamp(min=1.0)  # [batch, 2]

        self._ensure_rope(width)
        cos, sin = self.cos_table[:width], self.sin_table[:width]
        window_mask = None
        if spec.sliding_window is not None and width > spec.sliding_window:
            pos = torch.arange(width, device=dev)
            near = pos[None, :] > pos[:, None] - spec.sliding_window
            window_mask = (pos[None, :] <= pos[:, None]) & near

        slots = {layer: n for n, layer in enumerate(layers)}
        want_avg = [p for p in poolings if p is not Pooling.prompt_last]
        out = {
            p: torch.zeros(batch, len(layers), spec.hidden, dtype=torch.float32, device=dev)
            for p in poolings
        }
        rows = torch.arange(batch, device=dev)

        def pool(layer: int, h: torch.Tensor) -> None:
            slot = slots.get(layer)
            if slot is None:
                return
            if want_avg:
                sums = masked_sums(h, masks) / counts[:, :, None]  # [batch, 2, hidden]
                for p in want_avg:
                    out[p][:, slot] = sums[:, 0 if p is Pooling.prompt_avg else 1]
            if Pooling.prompt_last in out:
                out[Pooling.prompt_last][:, slot] = h[rows, last].float()

        deepest = max(layers, default=0)
        with torch.inference_mode():
            h = self.arch.embed(ids, self.embed, spec.extra)
            pool(0, h)
            for i in range(deepest):
                if self.compile:  # one compiled block for every batch size and length
                    for t, dims in self._length_dims(h, cos, sin, window_mask):
                        for d in dims:
                            torch._dynamo.maybe_mark_dynamic(t, d)
                h = self.fn_block(
                    h,
                    self.weights[i],
                    cos,
                    sin,
                    window_mask,
                    *spec.block_constants,
                )
                pool(i + 1, h)
        # an empty prompt (or response) has count 0: its mean is 0, as in the reference path
        return out


_FORWARDS: weakref.WeakKeyDictionary[Any, FastForward] = weakref.WeakKeyDictionary()


def fast_forward(model: Any) -> FastForward:
    """The :class:`FastForward` of ``model``, built once per model object."""
    ff = _FORWARDS.get(model)
    if ff is None:
        ff = _FORWARDS[model] = FastForward(model)
    return ff
