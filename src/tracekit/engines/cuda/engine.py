"""The CUDA engine behind tracekit's interface: :class:`CudaEngine` on :class:`FastDecoder`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tracekit.engines.batching import is_out_of_memory as is_oom
from tracekit.engines.cuda.arch import unsupported_reason
from tracekit.engines.cuda.decoder import FastDecoder, LaunchedRun
from tracekit.engines.cuda.plan import SETUP_PARTS, DecoderPlan
from tracekit.engines.cuda.runner import settle
from tracekit.engines.interface import (
    CaptureSpec,
    GenerationEngine,
    GenerationOutput,
    GenerationRequest,
    Ready,
    encode_prompts,
    left_pad,
    sampling_seeds,
)
from tracekit.errors import ModelError

if TYPE_CHECKING:
    from tracekit.models.loading import LoadedModel

__all__ = ["CudaEngine", "CudaPending", "unsupported_reason"]


TIMING_PAYS_AFTER_S = 1000.0
"""Decode seconds (estimated) from which a job times its kernels where no decision is kept:
kernel choice and step tuning cost about 1.5 minutes per batch size on an H100/H200 at a 1B
shape and made the decode step up to ~10% faster; shorter jobs start with the kept decisions or
the defaults (:attr:`DecoderPlan.time_kernels`)."""

STEP_BANDWIDTH = 3.0e12
"""Bytes per second a decode step is assumed to read its weights at, for that estimate (an
H100's copy rate: the estimate is a lower bound of the decode time)."""


class CudaEngine(GenerationEngine):
    """:class:`~tracekit.engines.interface.GenerationEngine` on :class:`FastDecoder`.

    Registered as ``"cuda"``; ``"auto"`` picks it when the model sits on a CUDA device and
    :func:`unsupported_reason` has no objection
    (:func:`tracekit.engines.interface.resolve_engine_name`). It keeps the reference engine's
    contract (stop ids, eos excluded, pooling definitions, per-row seeds) except how a sampled
    row draws its randomness: a counter-based hash of its seed instead of a ``torch.Generator``,
    so sampled text differs from the reference engine's for the same seed (greedy is identical).
    """

    name = "cuda"
    supports_steering = True  # checked against hf on a GPU: tests/gpu/test_cuda_steering.py

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether the fast path runs ``model`` (:func:`unsupported_reason` says why not)."""
        return unsupported_reason(model) is None

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        use_graphs: bool | None = None,
        compile: bool | None = None,
        **decoder_options: Any,
    ) -> None:
        from tracekit.engines.interface import stop_token_ids

        self.loaded = loaded
        reason = unsupported_reason(loaded.model)
        if reason is not None:
            raise ModelError(
                f"the CUDA engine cannot run {loaded.name}: {reason}",
                "use --engine hf (the reference engine runs every causal LM)",
            )
        self.stop_ids = stop_token_ids(loaded) or [-1]  # -1 never matches: run to the limit
        # further DecoderPlan fields (benchmarks, tests) are checked here, before any work
        self.plan = DecoderPlan(
            eos_token_ids=tuple(self.stop_ids),
            pad_token_id=int(loaded.tokenizer.pad_token_id),
            use_graphs=use_graphs,
            compile=compile,
            **decoder_options,
        )
        self._decoders: OrderedDict[Any, FastDecoder] = OrderedDict()
        self._retired_setup_parts = dict.fromkeys(SETUP_PARTS, 0.0)

    @property
    def setup_seconds(self) -> float:
        """One-time work so far: kernel choice, compilation and CUDA graph capture of the
        decode steps (the rest of the time is generation proper)."""
        return sum(self.setup_parts.values())

    @property
    def setup_parts(self) -> dict[str, float]:
        """:attr:`setup_seconds` by part (see :attr:`FastDecoder.setup_parts`)."""
        parts = dict(self._retired_setup_parts)
        for dec in self._decoders.values():
            for name, seconds in dec.setup_parts.items():
                parts[name] += seconds
        return parts

    def _decoder(self, capture: CaptureSpec | None) -> FastDecoder:
        key = None if capture is None else (capture.layers, tuple(capture.poolings))
        dec = self._decoders.get(key)
        if dec is None:
            if len(self._decoders) >= 2:  # each decoder holds KV caches: keep few alive
                _, retired = self._decoders.popitem(last=False)
                settle(retired.device)
                for name, seconds in retired.setup_parts.items():
                    self._retired_setup_parts[name] += seconds
            # the stop ids as they are now (a benchmark sets [-1]: no row stops early)
            plan = replace(self.plan, eos_token_ids=tuple(self.stop_ids))
            if capture is not None:
                plan = plan.with_capture(capture.layers, [str(p) for p in capture.poolings])
            dec = FastDecoder(self.loaded.model, plan)
            self._decoders[key] = dec
        return dec

    def plan_job(self, rows: int, max_new_tokens: int, batch_size: int) -> bool:
        """Tell the engine the size of the job before its first batch: it times its kernels
        (and tunes whole steps) only where the job's decode time, estimated as every step
        reading all weights at :data:`STEP_BANDWIDTH`, reaches :data:`TIMING_PAYS_AFTER_S`;
        a shorter job runs with the decisions kept on disk, else cuBLAS and the attention
        kernel's default configuration. Returns whether it will time."""
        steps = -(-max(rows, 0) // max(batch_size, 1)) * max_new_tokens
        params = self.loaded.model.parameters()
        weights = sum(p.numel() * p.element_size() for p in params)
        timing = steps * weights / STEP_BANDWIDTH >= TIMING_PAYS_AFTER_S
        if timing != self.plan.time_kernels:
            self.plan = replace(self.plan, time_kernels=timing)
            self._decoders.clear()  # none has run a batch yet
        return timing

    def _start(self, request: GenerationRequest) -> CudaPending | Ready:
        """Launch the batch without waiting for the device: :meth:`CudaPending.result`
        detokenizes it once its results are copied. Starting the next batch first is safe: a
        batch's results are copied out of the decoder's buffers before the next batch's prefill
        is queued. ``steering`` is applied exactly as the reference engine does."""
        import torch

        from tracekit.engines.hf import check_capture_layers

        tokenizer, params, capture = self.loaded.tokenizer, request.params, request.capture
        rows = encode_prompts(tokenizer, request.prompts)
        batch = len(rows)
        if batch == 0:
            return Ready(GenerationOutput([], [], [], []))
        if capture is not None:
            check_capture_layers(self.loaded, capture)
        dec = self._decoder(capture)
        seeds = sampling_seeds(params, request.row_seeds, batch) or [0] * batch
        # a short batch (a run's last one, a resumed remainder) runs at the caller's batch size,
        # so it reuses the decode step prepared for it instead of compiling, timing kernels and
        # capturing a new one; the extra rows copy row 0 (prompt and seed), so they finish with
        # it and never keep the loop running, and they are dropped below
        pad_to = request.pad_to
        fill = max(0, pad_to - batch) if dec.plan.pad_batches and pad_to is not None else 0
        # host tensors: the decoder checks them and copies them over without waiting
        cpu = torch.device("cpu")
        ids, mask = left_pad(rows + rows[:1] * fill, int(tokenizer.pad_token_id), cpu)
        seeds += seeds[:1] * fill
        try:
            launched = dec.launch(
                ids,
                mask,
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                temperature=params.temperature,
                top_p=params.top_p,
                seeds=seeds,
                steering=request.steering,
            )
        except Exception as exc:
            if is_oom(exc):  # the caller retries smaller: drop every decoder's caches too
                for other in self._decoders.values():
                    other.drop_runners()
                torch.cuda.empty_cache()
            raise
        return CudaPending(launched, tokenizer, rows, capture)


class CudaPending:
    """A batch started by :meth:`CudaEngine.start`; :meth:`result` builds its output once."""

    def __init__(
        self,
        launched: LaunchedRun,
        tokenizer: Any,
        rows: Sequence[Sequence[int]],
        capture: CaptureSpec | None,
    ) -> None:
        self.launched = launched
        """The decoder's run (device times of its prefill and steps)."""
        self._output: GenerationOutput | None = None
        self._tokenizer = tokenizer
        self._rows = rows
        self._capture = capture

    def result(self) -> GenerationOutput:
        from tracekit.engines.pooling import Pooling

        if self._output is None:
            res = self.launched.result()
            batch = len(self._rows)
            tokens = res.tokens[:batch]  # rows beyond the batch were padding
            capture = self._capture
            self._output = GenerationOutput(
                response_ids=tokens,
                texts=self._tokenizer.batch_decode(tokens, skip_special_tokens=True),
                finish_reasons=res.finish_reasons[:batch],  # type: ignore[arg-type]
                prompt_lengths=[len(r) for r in self._rows],
                pooled={Pooling(name): value[:batch] for name, value in res.pooled.items()},
                layers=capture.layers if capture is not None else (),
            )
        return self._output
