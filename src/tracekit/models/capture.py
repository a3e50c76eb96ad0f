"""Forward hooks that hand each chosen layer's hidden states to a callback.

``LayerTaps`` is the one capture mechanism shared by generate, extract and log: consumers
decide what to keep (pooled sums, every position, ...); the taps only deliver
``(layer, hidden)`` with ``hidden`` shaped ``[batch, seq, hidden_size]`` for every forward call
the model makes inside the ``with`` block (one per decode step during generation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tracekit.models.layers import LayerHandles

if TYPE_CHECKING:
    import torch

LayerCallback = Callable[[int, "torch.Tensor"], None]


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class LayerTaps:
    """Register hooks for ``layers`` (tracekit numbering) on enter; remove them on exit."""

    def __init__(self, handles: LayerHandles, layers: Sequence[int], callback: LayerCallback):
        bad = [layer for layer in layers if not 0 <= layer < handles.n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range 0-{handles.n_layers - 1}")
        self.handles = handles
        self.layers = tuple(layers)
        self.callback = callback
        self._hooks: list[Any] = []

    def __enter__(self) -> LayerTaps:
        for layer in self.layers:
            if layer == 0:
                self._hooks.append(
                    self.handles.blocks[0].register_forward_pre_hook(
                        self._pre_hook(), with_kwargs=True
                    )
                )
            else:
                self._hooks.append(
                    self.handles.blocks[layer - 1].register_forward_hook(self._post_hook(layer))
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _pre_hook(self) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.callback(0, hidden)

        return hook

    def _post_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.callback(layer, _first_tensor(output))

        return hook
