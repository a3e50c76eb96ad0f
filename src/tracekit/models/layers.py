"""Layer handles: where each tracekit layer lives inside a Hugging Face causal LM.

tracekit numbers layers as ``output_hidden_states`` does: layer 0 is the input of the first
decoder block (the embedding output, with positional embeddings and scaling where the
architecture adds them) and layer ``i >= 1`` is the residual stream leaving decoder block
``i - 1``. The last layer is taken before the model's final norm (HF's last hidden state is
after it). A model with ``L`` decoder blocks has ``L + 1`` layers, ``0..L``.

The decoder blocks are found from the config's layer count, without a per-model table: the
``ModuleList`` whose length equals ``num_hidden_layers`` (or ``n_layer``/``num_layers``). That
covers Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, Phi and most decoder-only models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracekit.errors import ModelError

if TYPE_CHECKING:
    from torch import nn


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def count_blocks(config: Any) -> int:
    """Number of decoder blocks a config declares."""
    cfg = _text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError("cannot tell how many decoder layers this model has from its config")


def hidden_size(config: Any) -> int:
    """Width of the residual stream a config declares."""
    cfg = _text_config(config)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError("cannot tell the hidden size of this model from its config")


@dataclass(frozen=True)
class LayerHandles:
    """The decoder blocks of one model and the tracekit layer numbering over them."""

    blocks: nn.ModuleList
    path: str
    hidden_size: int

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_layers(self) -> int:
        """Selectable layers: the embedding output plus one per block."""
        return len(self.blocks) + 1

    @classmethod
    def of(cls, model: nn.Module) -> LayerHandles:
        from torch import nn

        expected = count_blocks(model.config)
        candidates = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == expected
        ]
        # multimodal wrappers also hold vision/audio towers; prefer the language stack
        candidates.sort(key=lambda item: any(k in item[0] for k in ("vision", "audio", "visual")))
        if not candidates:
            raise ModelError(
                f"cannot find the {expected} decoder blocks of {type(model).__name__}",
                "tracekit supports decoder-only models whose blocks sit in one ModuleList",
            )
        name, blocks = candidates[0]
        return cls(blocks=blocks, path=name, hidden_size=hidden_size(model.config))
