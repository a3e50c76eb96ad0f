"""The fused attention kernel's torch reference in place of the Triton kernel, for CPU tests.

Triton is not installed where the CPU suite runs, so the decode step built around the fused
attention kernel cannot run there as it is. :func:`use_attention_reference` swaps in the
kernel's reference (:func:`tracekit.engines.cuda.ops.attention.reference`: the arithmetic the
kernel is checked against on a GPU before every use) and admits it, so the step's other pieces
(what feeds the kernel and what reads its output) run on CPU.
"""

from __future__ import annotations

from typing import Any


def use_attention_reference(monkeypatch: Any) -> None:
    from tracekit.engines.cuda.ops import attention as ops_attention

    def kernel_reference(qkv, bias, cos, sin, k, v, slot, pad, shape, pdl=False, config=None,
                         q_norm=None, k_norm=None):  # fmt: skip
        return ops_attention.reference(qkv, bias, cos, sin, k, v, slot, pad, shape, q_norm, k_norm)

    monkeypatch.setattr(ops_attention, "works", lambda **_: True)
    monkeypatch.setattr(ops_attention, "decode_attention", kernel_reference)
