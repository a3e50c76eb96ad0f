"""Fast generation with capture: static KV cache, CUDA-graph decode steps, sampling on the device.

:class:`FastDecoder` owns the decode loop of tracekit's CUDA engine (docs/engine.md). It works
on a raw Hugging Face causal LM and left-padded token ids, so it can be tested and benchmarked
on its own; :class:`tracekit.engines.cuda.engine.CudaEngine` wraps it in the engine interface.
It asks the architecture (:mod:`.arch`) for the model's block math and weights, builds one
:class:`~tracekit.engines.cuda.runner.Runner` per decode shape from its
:class:`~tracekit.engines.cuda.plan.DecoderPlan`, and decides per batch size which kernels the
step runs.

How one batch runs:

1. **Prefill**: one forward over the padded prompts, through the engine's own block function
   or the HF model itself, pooling ``prompt_last`` / ``prompt_avg``; its keys and values fill
   a preallocated static cache ``[batch, kv_heads, prompt_len + max_new_tokens, head_dim]``
   per layer.
2. **Decode** runs the architecture's functional decoder block over the static cache, one
   token per row per step. Every piece of per-step state lives in device tensors owned by the
   runner (current token, step counter, finished flags, pooled sums), so a whole step, sampling
   and capture included, is recorded once as a CUDA graph and replayed ``max_new_tokens``
   times with no host work but the replay call. The pointwise parts are fused by
   ``torch.compile`` (:mod:`.compiled`), one compiled region per block boundary; each linear
   layer runs the way :func:`tracekit.engines.cuda.ops.gemv.choose` timed fastest for the
   batch size.
3. **Stopping** is per row on the device (``alive`` flags); the host reads one flag every
   ``check_every`` steps and stops early once every row is done.
4. **Capture** adds each chosen layer's state, weighted by 1 for tokens that belong to the
   response and 0 otherwise, into float32 sums in graph-owned buffers.

Definitions shared with the reference engine (``response_avg``): the mean over the response
tokens' residual states, where a token's state is the one computed when the token is fed to the
model, so the last response token is fed once more at the end (its logits are discarded). The
eos token that ends a row is not part of the response unless ``include_eos`` is set.

On CPU (and wherever CUDA graphs are off) the same code runs eagerly; this is how the CPU tests
check it against the HF reference.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tracekit.engines.batching import is_out_of_memory as is_oom
from tracekit.engines.cuda.arch import architecture_for
from tracekit.engines.cuda.ops.gemv import mode_for_splits
from tracekit.engines.cuda.plan import (
    FUSED_ATTENTION_MAX_LEN,
    NO_GEMV,
    AttentionShape,
    BlockSplits,
    DecoderPlan,
    Dims,
    GemvChoice,
    RunKey,
)
from tracekit.engines.cuda.runner import Runner, StepModel, settle, step_functions
from tracekit.engines.cuda.sampling import argmax_chunk_for
from tracekit.engines.cuda.tuning import StepTuner
from tracekit.engines.interface import HostCopy, to_device
from tracekit.errors import InputError, ModelError
from tracekit.models.layers import LayerHandles

if TYPE_CHECKING:
    import torch

    from tracekit.engines.cuda.state import StepState
    from tracekit.engines.steering import Steering

logger = logging.getLogger(__name__)


@dataclass
class FastResult:
    """Output of :meth:`FastDecoder.generate` (host tensors)."""

    tokens: list[list[int]]
    """Response token ids per row (eos excluded unless ``include_eos``)."""
    finish_reasons: list[str]
    """``"eos"`` or ``"length"`` per row."""
    pooled: dict[str, torch.Tensor]
    """pooling name -> float32 [B, n_layers, hidden] (layers in the order asked)."""
    decode_steps: int
    """Decode steps run (graph replays, or eager steps)."""


class FastDecoder:
    """Generate with capture from an HF causal LM of a family the fast path knows (see
    :mod:`.arch`); fast on CUDA, eager elsewhere. ``plan`` says what to capture and how the
    steps run (:class:`~tracekit.engines.cuda.plan.DecoderPlan`; its device defaults are
    filled for the model's device). Building a decoder re-lays the model's q/k/v and gate/up
    weights into fused buffers when the plan fuses them (values unchanged; default on CUDA).
    """

    def __init__(self, model: Any, plan: DecoderPlan) -> None:
        import torch

        arch = architecture_for(model)
        handles = LayerHandles.of(model)
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        plan = plan.resolved(device)
        if plan.use_graphs and device.type != "cuda":
            raise ModelError("CUDA graphs need the model on a CUDA device")
        bad = [layer for layer in plan.layers if not 0 <= layer < handles.n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range 0-{handles.n_layers - 1}")
        self.plan = plan
        self.arch = arch
        spec = self.spec = arch.decoder_spec(model)
        tensors = arch.model_tensors(model)
        with torch.no_grad():
            weights = arch.collect_weights(model, handles, bool(plan.fuse_weights))
        self.model = StepModel(
            arch=arch,
            spec=spec,
            hf_model=model,
            handles=handles,
            device=device,
            dtype=dtype,
            weights=weights,
            embed=tensors.embed,
            final_norm=tensors.final_norm,
            lm_head=tensors.lm_head,
            rotary=tensors.rotary,
            eos_ids=torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device),
            fns=step_functions(arch, bool(plan.compile), bool(plan.pdl)),
            cos_table=torch.empty(0),
            sin_table=torch.empty(0),
        )
        self.dims = Dims(
            n_heads=spec.n_heads,
            n_kv=spec.n_kv_heads,
            head_dim=spec.head_dim,
            eps=spec.eps,
            scaling=spec.scaling,
            window=spec.sliding_window,
            write_kv=bool(plan.compile),
            gemv=NO_GEMV,
            argmax_chunk=argmax_chunk_for(spec.vocab) if device.type == "cuda" else 0,
            extra=spec.extra,
        )
        self.tuner = StepTuner(self)
        self._runners: OrderedDict[RunKey, Runner] = OrderedDict()
        self._fused_ok: dict[int, bool] = {}
        self._last_run: LaunchedRun | None = None

    # -- what the model and the plan fix ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def weights(self) -> list[Any]:
        """Per-block weights, in the architecture's layout."""
        return self.model.weights

    @property
    def setup_parts(self) -> dict[str, float]:
        """Time spent preparing decode steps, by part (:attr:`StepModel.setup_parts`)."""
        return self.model.setup_parts

    @property
    def setup_seconds(self) -> float:
        """Time spent preparing decode steps (the sum of :attr:`setup_parts`)."""
        return sum(self.setup_parts.values())

    @property
    def step_timings(self) -> dict[int, dict[str, float]]:
        """Per batch size tuned here: microseconds per decode step of each candidate timed."""
        return self.tuner.timings

    # -- per batch size: which kernels the step runs -------------------------------------------
    def gemv_choice(self, batch: int) -> GemvChoice:
        """Which linear layers run the Triton matrix-vector kernel at ``batch`` rows."""
        plan = self.plan
        if plan.gemv == "off":
            return NO_GEMV._replace(pdl=bool(plan.pdl))
        from tracekit.engines.cuda.ops import gemv as ops_gemv

        force = {"on": ops_gemv.TRITON, "splitk": ops_gemv.SPLIT_K2}.get(plan.gemv)
        w = self.weights[0]
        tuned = self.tuner.modes(batch) if plan.tune_steps else {}
        pinned = plan.pinned

        def choose(role: str, weight: torch.Tensor | None) -> int:
            if weight is None:
                return 0
            mode = pinned.get(role, tuned.get(role, force))
            if mode is None and not plan.time_kernels:  # kept decisions only, no timing
                return ops_gemv.kept_choice(batch, weight)
            return ops_gemv.choose(batch, weight, mode)

        return GemvChoice(
            pdl=bool(plan.pdl),
            qkv=choose("qkv", getattr(w, "qkv", None)),
            o=choose("o", getattr(w, "o", None)),
            gate_up=choose("gate_up", getattr(w, "gate_up", None)),
            down=choose("down", getattr(w, "down", None)),
            head=choose("head", self.model.lm_head),
        )

    def block_splits_for(self, batch: int) -> BlockSplits | None:
        """K slices of the fused block products at ``batch`` rows, or ``None`` where the step
        keeps its compiled pieces: ``fused_block`` off or not for this architecture, no Triton,
        weights not in half precision or not fused, an ``o_proj`` bias, a q/k norm, or a
        product that failed its check."""
        import torch

        w = self.weights[0]
        if (
            not self.plan.fused_block
            or not self.arch.fused_block
            or self.dtype not in (torch.bfloat16, torch.float16)
            or w.qkv is None
            or w.gate_up is None
            or w.o_bias is not None
            or w.q_norm is not None
        ):
            return None
        from tracekit.engines.cuda.ops.block import choose_splits

        got = [
            choose_splits(role, batch, weight)
            for role, weight in (
                ("norm", w.qkv),
                ("residual", w.o),
                ("gated", w.gate_up),
                ("residual", w.down),
            )
        ]
        if any(s is None for s in got):
            return None
        qkv, o, _, down = got
        assert qkv is not None and o is not None and down is not None
        return BlockSplits(qkv=qkv, o=o, down=down)

    def fused_attention_for(self, batch: int, length: int, gemv_qkv: int) -> bool:
        """Whether decode steps of ``batch`` rows over a cache of ``length`` slots use the
        fused attention kernel: ``on``/``auto`` for an architecture it computes, with fused
        q/k/v weights and q/k norms only where the kernel applies them (Gemma's), where the
        kernel agreed with its reference on this model's shape (block 0's: a local layer's
        window, at most 64 slots so the check's cache passes it); ``auto`` only up to
        :data:`FUSED_ATTENTION_MAX_LEN` slots (the configurations that split the cache walk
        into shares have not been timed on long caches yet)."""
        mode = self.plan.fused_attention
        w = self.weights[0]
        if mode == "off" or not self.arch.fused_attention or w.qkv is None:
            return False
        shape = self._attention_shape()
        if w.q_norm is not None and shape.qk_norm_eps is None:
            return False
        if mode == "auto" and length > FUSED_ATTENTION_MAX_LEN:
            return False
        from tracekit.engines.cuda.ops import attention as ops_attention
        from tracekit.engines.cuda.ops import gemv as ops_gemv

        splits = ops_gemv.splits_of(gemv_qkv) if gemv_qkv >= ops_gemv.SPLIT_K2 else 1
        if splits not in self._fused_ok:
            window = None if shape.window is None else min(shape.window, 64)
            self._fused_ok[splits] = ops_attention.works(
                batch=min(batch, 4),
                length=min(length, 200),
                shape=shape._replace(window=window),
                splits=splits,
                has_bias=w.qkv_bias is not None,
                dtype=self.dtype,
                device=self.device,
                pdl=bool(self.plan.pdl),
            )
        return self._fused_ok[splits]

    def attention_config_for(
        self, batch: int, length: int, prompt_len: int, gemv_qkv: int, fused: bool
    ) -> tuple[int, ...] | None:
        """The fused attention kernel's configuration for decode steps of ``batch`` rows over
        a cache of ``length`` slots after a prompt of ``prompt_len``: timed where the steps
        are captured (:func:`tracekit.engines.cuda.ops.attention.kernel_config`, at the middle
        of the generation, both rounded up to 64 slots), the default one otherwise; ``None``
        without the kernel."""
        if not fused:
            return None
        from tracekit.engines.cuda.ops import attention as ops_attention
        from tracekit.engines.cuda.ops import gemv as ops_gemv

        if self.plan.attention_config is not None:
            return self.plan.attention_config
        if not self.plan.use_graphs or not self.plan.time_kernels:
            return ops_attention.DEFAULT_CONFIG
        splits = ops_gemv.splits_of(gemv_qkv) if gemv_qkv >= ops_gemv.SPLIT_K2 else 1
        shape = self._attention_shape()
        # timed at lengths rounded up to 64 slots: nearby shapes share one timing
        rounded = -(-length // 64) * 64
        return ops_attention.kernel_config(
            batch=batch,
            length=rounded,
            slot=min(-(-(prompt_len + length) // 128) * 64, rounded - 1),
            splits=splits,
            shape=shape,
            dtype=self.dtype,
            device=self.device,
            pdl=bool(self.plan.pdl),
        )

    def _attention_shape(self) -> AttentionShape:
        """Block 0's fused attention constants (:attr:`Architecture.attention_shape`): what the
        kernel is checked and timed with (Gemma: a local layer, its window and soft-cap)."""
        assert self.arch.attention_shape is not None
        shape: AttentionShape = self.arch.attention_shape(self.dims, self.weights[0])
        return shape

    def step_dims(
        self, key: RunKey, gemv: GemvChoice, block: BlockSplits | None
    ) -> tuple[Dims, tuple[int, ...] | None]:
        """The step's constants at ``key``'s shape with ``gemv``'s kernels (and ``block``'s
        fused products, kept only with the fused attention kernel), and the attention
        kernel's configuration."""
        total = key.prompt_len + key.max_new_tokens
        # with fused blocks, the attention kernel sums the norm product's partials
        qkv_mode = gemv.qkv if block is None else mode_for_splits(block.qkv)
        fused = self.fused_attention_for(key.batch, total, qkv_mode)
        dims = self.dims._replace(gemv=gemv, fused_attention=fused, block=block if fused else None)
        config = self.attention_config_for(key.batch, total, key.prompt_len, qkv_mode, fused)
        return dims, config

    # -- rotary tables and runners --------------------------------------------------------------
    def _ensure_rope(self, length: int) -> None:
        m = self.model
        if m.cos_table.shape[0] >= length:
            return
        size = max(length, 2 * m.cos_table.shape[0])
        m.cos_table, m.sin_table = self.arch.rope_tables(m.rotary, size, m.dtype, m.device)
        # graphs captured earlier read the old tables: drop them
        settle(self.device)
        self._runners.clear()

    def drop_runners(self) -> None:
        """Drop every runner (KV caches, graphs), once the device is done with them."""
        settle(self.device)
        self._runners.clear()

    def _runner(self, key: RunKey) -> Runner:
        runner = self._runners.get(key)
        if runner is not None:
            self._runners.move_to_end(key)
            return runner
        while len(self._runners) >= int(self.plan.max_runners):
            settle(self.device)
            self._runners.popitem(last=False)
        before = self.setup_seconds
        started = time.perf_counter()
        gemv = self.gemv_choice(key.batch)
        # the fused block kernels add the residual inside the product: a steered step keeps
        # the compiled pieces, whose capture points add the steering
        block = self.block_splits_for(key.batch) if key.steer is None else None
        dims, attn_config = self.step_dims(key, gemv, block)
        runner = Runner(self.plan, self.model, key, dims, attn_config)
        self.setup_parts["kernel_choice"] += time.perf_counter() - started
        if self.plan.use_graphs:
            started = time.perf_counter()
            try:
                warm, record = runner.capture()
                self.setup_parts["compile_warmup"] += warm
                self.setup_parts["graph_capture"] += record
            except Exception as exc:  # a capture failure must not lose the user's run
                self.setup_parts["graph_capture"] += time.perf_counter() - started
                if is_oom(exc):
                    raise  # the caller halves the batch; eager decoding would not fit either
                logger.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
                runner.graph = None
                runner.reset_dummy()
        if self.plan.tune_steps and runner.graph is not None and self.tuner.roles():
            self.tuner.tune_once(runner)
        self._runners[key] = runner
        logger.info("decode step for %s ready in %.1f s", key, self.setup_seconds - before)
        return runner

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_p: float | Sequence[float] = 1.0,
        seeds: Sequence[int] | None = None,
        steering: Steering | None = None,
    ) -> FastResult:
        """Generate up to ``max_new_tokens`` per row from left-padded ``input_ids``."""
        return self.launch(
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seeds=seeds,
            steering=steering,
        ).result()

    def launch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float | Sequence[float] = 1.0,
        top_p: float | Sequence[float] = 1.0,
        seeds: Sequence[int] | None = None,
        steering: Steering | None = None,
    ) -> LaunchedRun:
        """:meth:`generate`'s work queued on the device; :meth:`LaunchedRun.result` waits for it.

        ``steering`` adds ``coef * v`` to the residual stream as the reference engine does
        (:mod:`tracekit.engines.steering`): in the prefill at the chosen positions, and in
        every decode step's captured graph (``response``, ``all``) through a buffer the graph
        reads, so another coefficient at the same layer and positions replays the same graph.
        A zero coefficient (or vector) runs the unsteered step.

        Returns once the prefill, every decode step and the copies of the results are queued
        (on CUDA the host runs a few checks behind the device, see :class:`_DoneCheck`). The
        results are copied out of the runner's buffers before anything queued later can touch
        them, so the next batch may be launched before this one's result is taken: the host
        then prepares the next batch and turns this one's tokens into lists while the device
        works. Host tensors (CPU ``input_ids``) keep the host from waiting for the device here;
        device tensors work too, with one blocking read of the mask."""
        import torch

        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise InputError("input_ids and attention_mask must both be [batch, seq]")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        mask_host = attention_mask.detach().to("cpu", torch.long)
        lengths = mask_host.sum(dim=1)
        if bool((lengths == 0).any()):
            raise InputError("a prompt has no tokens (attention mask all zero)")
        seq = input_ids.shape[1]
        expected = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]
        if not torch.equal(mask_host.bool(), expected):
            raise InputError(
                "prompts must be left-padded with a contiguous attention mask",
                "tokenize with padding_side='left' (tracekit's load_model does)",
            )
        batch = input_ids.shape[0]
        bucket = int(self.plan.prompt_bucket)
        prompt_len = ((seq + bucket - 1) // bucket) * bucket
        extra = prompt_len - seq
        # host tensors go over pinned and non-blocking: the previous batch may still run
        ids, mask = to_device(input_ids, self.device), to_device(mask_host, self.device)
        if extra:
            ids = torch.cat([ids.new_full((batch, extra), self.plan.pad_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros((batch, extra)), mask], dim=1)

        sampling = bool(do_sample)
        temps = _per_row(temperature, batch, "temperature")
        tops = _per_row(top_p, batch, "top_p")
        use_top_p = sampling and any(p < 1.0 for p in tops)
        steer = None
        if steering is not None:
            from tracekit.engines.steering import check_fits

            check_fits(self.model.handles, steering)
            if steering.coef == 0 or not steering.vector.any():
                # adding zero is the unsteered run: run its step, so the outputs are its own
                # bit for bit (a step compiled with the add may fuse and tune its kernels
                # differently, and differ in the last bit)
                steering = None
            else:
                steer = (steering.layer, str(steering.positions))
        key = RunKey(batch, prompt_len, int(max_new_tokens), sampling, use_top_p, steer)
        try:
            # the decoder's GPU as the current one: CUDA graph capture, the replays' streams
            # and Triton's launches use the current device, which need not be the model's
            # (one process with --device cuda:1)
            with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
                self._set_steering(steering)
                return self._launch(key, ids, mask, temps, tops, seeds)
        except Exception as exc:
            if is_oom(exc):
                # free every cache and graph now, so a retry at a smaller batch can fit
                self.drop_runners()
                torch.cuda.empty_cache()
            raise

    def _set_steering(self, steering: Steering | None) -> None:
        """Copy ``steering``'s ``coef * v`` into the decoder's steering buffer (queued behind
        the work already on the stream: an earlier batch's steps still read the old value)."""
        import torch

        m = self.model
        m.steering = steering
        if steering is None:
            return
        # the reference engine's arithmetic: float32 product on the host, then the model dtype
        value = (torch.from_numpy(steering.vector) * steering.coef).to(m.dtype)
        if m.steer_delta is None:
            m.steer_delta = torch.zeros(value.shape, dtype=m.dtype, device=m.device)
        m.steer_delta.copy_(to_device(value, m.device))

    def _launch(
        self,
        key: RunKey,
        ids: torch.Tensor,
        mask: torch.Tensor,
        temps: list[float],
        tops: list[float],
        seeds: Sequence[int] | None,
    ) -> LaunchedRun:
        import torch

        prompt_len, max_new_tokens = key.prompt_len, key.max_new_tokens
        with torch.no_grad():
            self._ensure_rope(prompt_len + max_new_tokens)
            runner = self._runner(key)
            prefill_events = _start_span(self.device)  # the prefill's share, read afterwards
            seed_list = list(seeds) if seeds is not None else [0] * key.batch
            if len(seed_list) != key.batch:
                raise InputError(f"{len(seed_list)} seeds given for {key.batch} rows")
            prompt_pooled = runner.prefill(ids, mask, temps, tops, seed_list)
            _end_span(prefill_events)
            steps = 0
            check = _DoneCheck(runner.st, self.device)
            ring = runner.ring_size
            decode_events = _start_span(self.device)
            for steps in range(1, max_new_tokens + 1):
                runner.replay()
                if ring and steps % ring == 0:
                    runner.flush(ring)
                if steps % self.plan.check_every == 0 and steps < max_new_tokens and check.done():
                    break
            if ring:
                runner.flush(steps % ring)
            _end_span(decode_events)
            run = self.collect(runner, prompt_pooled, steps, prefill_events, decode_events)
            self._last_run = run
            return run

    @property
    def last_prefill_seconds(self) -> float | None:
        """Device time of the last generate call's prefill, the first token's choice included
        (CUDA events; None off CUDA)."""
        return None if self._last_run is None else self._last_run.prefill_seconds

    @property
    def last_decode_seconds(self) -> float | None:
        """Device time of the last generate call's decode steps, first to last (CUDA events;
        None off CUDA): the steps alone, without the prefill, the host's preparation of the
        batch and the copies of the results."""
        return None if self._last_run is None else self._last_run.decode_seconds

    def collect(
        self,
        runner: Runner,
        pooled: dict[str, torch.Tensor],
        steps: int,
        prefill_events: tuple[Any, Any] | None,
        decode_events: tuple[Any, Any] | None,
    ) -> LaunchedRun:
        """Queue the copies of a run's results (tokens, lengths, captures) behind its steps."""
        import torch

        st = runner.st
        device_out: dict[tuple[str, str], torch.Tensor] = {
            ("state", "n_kept"): st.n_kept,
            ("state", "tokens"): st.out_tokens[:, : runner.key.max_new_tokens],
            ("state", "eos_hit"): st.eos_hit,
        }
        for name, value in pooled.items():
            device_out[("pooled", name)] = value
        if "response_avg" in self.plan.poolings:
            denom = st.n_kept.to(torch.float32).clamp(min=1)[:, None, None]
            sums = torch.stack([runner.caps[layer] for layer in self.plan.layers], dim=1)
            device_out[("pooled", "response_avg")] = sums / denom
        return LaunchedRun(
            HostCopy(device_out), self.plan.poolings, steps, prefill_events, decode_events
        )


class LaunchedRun:
    """A :meth:`FastDecoder.launch` in flight: its results are being copied to the host."""

    def __init__(
        self,
        copy: HostCopy,
        poolings: Sequence[str],
        steps: int,
        prefill_events: tuple[Any, Any] | None,
        decode_events: tuple[Any, Any] | None,
    ) -> None:
        self._copy = copy
        self._poolings = tuple(poolings)
        self._steps = steps
        self._prefill_events = prefill_events
        self._decode_events = decode_events

    @property
    def prefill_seconds(self) -> float | None:
        """Device time of this run's prefill (CUDA events; waits for it; None off CUDA)."""
        return _span_seconds(self._prefill_events)

    @property
    def decode_seconds(self) -> float | None:
        """Device time of this run's decode steps (CUDA events; waits for them)."""
        return _span_seconds(self._decode_events)

    def result(self) -> FastResult:
        """Wait for the copies and build the token lists."""
        out = self._copy.wait()
        n_kept = out[("state", "n_kept")].tolist()
        tokens_all = out[("state", "tokens")]
        tokens = [tokens_all[r, :n].tolist() for r, n in enumerate(n_kept)]
        reasons = ["eos" if hit else "length" for hit in out[("state", "eos_hit")].tolist()]
        pooled = {name: out[("pooled", name)] for name in self._poolings}
        return FastResult(tokens, reasons, pooled, self._steps)


def _start_span(device: torch.device) -> tuple[Any, Any] | None:
    """Two timing events, the first recorded now (``None`` off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    events[0].record()
    return events


def _end_span(events: tuple[Any, Any] | None) -> tuple[Any, Any] | None:
    """Record the second event of a :func:`_start_span` pair; returns the pair."""
    if events is not None:
        events[1].record()
    return events


def _span_seconds(events: tuple[Any, Any] | None) -> float | None:
    """Seconds between a recorded pair of events (waits for the second), or ``None``."""
    if events is None:
        return None
    events[1].synchronize()
    return float(events[0].elapsed_time(events[1])) / 1e3


class _DoneCheck:
    """Whether every row is done (none still emitting, none with its last response token still
    to be fed for capture), asked every ``check_every`` decode steps.

    On CUDA the answer is copied to pinned memory without blocking, and :meth:`done` returns
    the answer queued at the *previous* check: by then it has long landed, so the host never
    waits for the GPU and the GPU never waits for the host between steps. The loop stops one
    check later than a blocking check would; the extra steps change nothing (finished rows are
    frozen on the device). Elsewhere the check is a plain blocking read.
    """

    def __init__(self, st: StepState, device: torch.device) -> None:
        self.st = st
        self.cuda = device.type == "cuda"
        self._pending: tuple[Any, torch.Tensor] | None = None

    def done(self) -> bool:
        import torch

        st = self.st
        busy = (st.alive | (st.feed_weight > 0)).any()
        if not self.cuda:
            return not bool(busy)
        previous = self._pending
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(busy.reshape(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, flag)
        if previous is None:
            return False
        previous[0].synchronize()
        return not bool(previous[1][0])


def _per_row(value: float | Sequence[float], batch: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * batch
    else:
        values = [float(v) for v in value]
    if len(values) != batch:
        raise InputError(f"{len(values)} values of {name} given for {batch} rows")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise InputError(f"{name} must be finite and non-negative")
    return values
