"""Rows through any engine in batches: the next batch started before the previous one's output
is taken, and the batch size halved on out-of-memory (the batch retried)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tracekit.errors import ModelError

if TYPE_CHECKING:
    from tracekit.engines.interface import CaptureSpec, GenerationEngine, GenerationParams
    from tracekit.engines.steering import Steering

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Batcher:
    """Runs rows through the engine in batches, halving the batch size on out-of-memory."""

    def __init__(self, engine: GenerationEngine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._warned = False

    def run(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        params: GenerationParams,
        capture: CaptureSpec | None,
        on_output: Callable[[int, int, Any], None],
        run_rows: int | None = None,
        steering: Steering | None = None,
    ) -> None:
        """``run_rows``: rows of this polarity in the whole run (all processes); short batches
        are padded (by engines that pad) to the batch size, or to ``run_rows`` if fewer, so a
        run smaller than one batch is not padded and every process pads alike.

        Each batch is started before the previous one's output is taken
        (:meth:`~tracekit.engines.interface.GenerationEngine.start`), so the host
        builds one batch's records while the device generates the next. A finished batch is
        handed to ``on_output`` before an error of the next one is raised or handled."""
        from tracekit.engines.interface import GenerationRequest

        pending: tuple[int, int, Any] | None = None

        def take_pending() -> None:
            nonlocal pending
            if pending is not None:
                first, last, launched = pending
                pending = None
                on_output(first, last, launched.result())

        start = 0
        while start < len(prompts):
            end = min(start + self.batch_size, len(prompts))
            try:
                pad_to = min(self.batch_size, run_rows or self.batch_size)
                batch = GenerationRequest(
                    prompts[start:end], params, capture, seeds[start:end], pad_to, steering
                )
                launched = self.engine.start(batch)
            except BaseException as exc:  # an interrupt too: the batch before is done, keep it
                take_pending()
                if not is_out_of_memory(exc):
                    raise
                if self.batch_size == 1:
                    raise ModelError(
                        "out of memory even at batch size 1",
                        "use a smaller --max-new-tokens, a smaller dtype or --device-map auto",
                    ) from exc
                self._halve()
                continue
            take_pending()
            pending = (start, end, launched)
            start = end
        take_pending()

    def _halve(self) -> None:
        import torch

        self.batch_size = max(1, self.batch_size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self._warned:
            logger.warning("out of memory: continuing with batch size %d", self.batch_size)
            self._warned = True
        else:
            logger.info("out of memory again: batch size %d", self.batch_size)
