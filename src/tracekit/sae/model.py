"""Sparse autoencoders as tracekit encodes with them: parameters, activation rule, encoding.

One :class:`SparseAutoencoder` holds what encoding needs (``W_enc``, ``b_enc``, ``b_dec``,
``threshold``) as float32 torch tensors, plus provenance (format, file, average L0). The decoder
is never loaded: extraction only encodes, and ``W_dec`` is as large as ``W_enc``.

Encoding follows the reference implementations exactly:

- Gemma Scope (JumpReLU): ``pre = x @ W_enc + b_enc``; ``acts = relu(pre) * (pre > threshold)``.
- SAELens: ``x`` optionally normalised (``normalize_activations``), minus ``b_dec`` when
  ``apply_b_dec_to_input``; ``pre = x @ W_enc + b_enc``; then ReLU, JumpReLU (as above) or
  TopK (the ``k`` largest pre-activations, ReLU'd, all others zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Activation = Literal["relu", "jumprelu", "topk"]
SaeFormat = Literal["gemma-scope", "saelens"]
InputNorm = Literal["none", "constant_norm_rescale", "layer_norm"]


@dataclass(frozen=True)
class SparseAutoencoder:
    """The encoder half of one SAE, ready to encode residual-stream vectors."""

    W_enc: torch.Tensor  # [d_in, width]
    b_enc: torch.Tensor  # [width]
    b_dec: torch.Tensor | None  # [d_in]; only used when apply_b_dec_to_input
    threshold: torch.Tensor | None  # [width]; JumpReLU only
    activation: Activation
    format: SaeFormat
    path: Path
    k: int | None = None  # TopK only
    apply_b_dec_to_input: bool = False
    input_norm: InputNorm = "none"
    average_l0: float | None = None
    hook_name: str | None = None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def average_l0_or_nan(self) -> float:
        return math.nan if self.average_l0 is None else float(self.average_l0)

    def to(self, device: torch.device | str) -> SparseAutoencoder:
        """A copy whose tensors live on ``device`` (float32 stays float32)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            W_enc=self.W_enc.to(device),
            b_enc=self.b_enc.to(device),
            b_dec=move(self.b_dec),
            threshold=move(self.threshold),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., width]`` for residual vectors ``x`` ``[..., d_in]``.

        ``x`` is cast to float32 (the SAE's dtype) first, so bf16 models encode exactly as the
        SAE's authors do.
        """
        import torch

        sae_in = x.to(self.W_enc.dtype)
        if self.input_norm == "constant_norm_rescale":
            sae_in = sae_in * (math.sqrt(self.d_in) / sae_in.norm(dim=-1, keepdim=True))
        elif self.input_norm == "layer_norm":
            mu = sae_in.mean(dim=-1, keepdim=True)
            centred = sae_in - mu
            std = centred.std(dim=-1, keepdim=True)
            sae_in = centred / (std + 1e-5)
        if self.apply_b_dec_to_input and self.b_dec is not None:
            sae_in = sae_in - self.b_dec
        pre = sae_in @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            assert self.threshold is not None  # guaranteed by the loaders
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        assert self.k is not None
        top = torch.topk(pre, k=self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def describe(self) -> dict[str, object]:
        """Provenance for manifests and tables."""
        return {
            "format": self.format,
            "path": str(self.path),
            "activation": self.activation,
            "width": self.width,
            "d_in": self.d_in,
            "average_l0": self.average_l0,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "input_norm": self.input_norm,
            "hook_name": self.hook_name,
        }
