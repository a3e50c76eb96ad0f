"""One decode shape's buffers and captured step: KV caches, step state, pooled sums, graphs.

A :class:`Runner` serves exactly one :class:`~tracekit.engines.cuda.plan.RunKey` (batch,
padded prompt length, new tokens, sampling flags). It reads the decoder's plan and the model's
tensors (:class:`StepModel`), and the per-batch constants the decoder decided (:class:`Dims`,
the attention kernel's configuration); it owns every tensor a step reads and writes, so the
whole step, sampling and capture included, is recorded once as a CUDA graph and replayed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from tracekit.engines.batching import is_out_of_memory as is_oom
from tracekit.engines.cuda.ops.gemv import capture_graph, on_side_stream
from tracekit.engines.cuda.plan import PREFILL_GRAPH_TOKENS, SETUP_PARTS, DecoderPlan, Dims, RunKey
from tracekit.engines.cuda.state import Caches, Sink, StepState
from tracekit.engines.pooling import masked_sum
from tracekit.errors import ModelError
from tracekit.models.capture import LayerTaps
from tracekit.models.compat import output_cache

if TYPE_CHECKING:
    import torch

    from tracekit.engines.cuda.arch import Architecture, DecoderSpec
    from tracekit.engines.steering import Steering
    from tracekit.models.layers import LayerHandles

logger = logging.getLogger(__name__)


class StepFunctions(NamedTuple):
    """The architecture's step functions as the runner calls them: compiled, or eager."""

    first: Any
    middle: Any
    last: Any
    advance: Any
    first_fused: Any
    middle_fused: Any
    embed_norm: Any
    head_advance: Any
    block_kv: Any


def step_functions(arch: Architecture, compile: bool, pdl: bool) -> StepFunctions:
    """``arch``'s step functions, each compiled once per process where ``compile``."""
    from tracekit.engines.cuda.sampling import advance

    eager = StepFunctions(
        first=arch.first,
        middle=arch.middle,
        last=arch.last,
        advance=advance,
        first_fused=arch.first_fused,
        middle_fused=arch.middle_fused,
        embed_norm=arch.embed_norm,
        head_advance=arch.head_advance,
        block_kv=arch.block_kv,
    )
    if not compile:
        return eager
    from tracekit.engines.cuda.compiled import compiled, compiled_dynamic

    fns = {
        name: compiled(f"{arch.name}.{name}", fn, pdl)
        for name, fn in eager._asdict().items()
        if name != "block_kv"
    }
    # the prefill's block: batch and prompt length dynamic, one compilation for all
    fns["block_kv"] = compiled_dynamic(f"{arch.name}.block_kv", arch.block_kv)
    return StepFunctions(**fns)


@dataclass
class StepModel:
    """What the steps read of the model, shared by a decoder's runners: the architecture, the
    weights in its layout, the rotary tables (grown by the decoder, which then drops its
    runners), the step functions; and the decoder's setup clock and prefill graph pool."""

    arch: Architecture
    spec: DecoderSpec
    hf_model: Any
    handles: LayerHandles
    device: torch.device
    dtype: torch.dtype
    weights: list[Any]
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    rotary: Any
    eos_ids: torch.Tensor
    fns: StepFunctions
    cos_table: Any = None
    sin_table: Any = None
    prefill_pool: Any = None
    """Memory pool of the runners' prefill graphs (:meth:`Runner.prefill`)."""
    steer_delta: Any = None
    """Steering's ``coef * v`` ``[hidden]`` in the model's dtype, allocated at the first steered
    batch and never replaced (the runners' graphs read it): each steered batch copies its value
    in (:meth:`FastDecoder.launch`)."""
    steering: Steering | None = None
    """The steering of the batch now launched (the HF prefill's hook reads it)."""
    setup_parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SETUP_PARTS, 0.0))
    """Time spent preparing decode steps, by part: kernel choice (timing the linear-layer
    kernels, checking the attention kernel, allocating buffers), compile + warm-up steps,
    graph capture (a failed capture included), step tuning."""


def settle(device: torch.device) -> None:
    """Wait for the device before runners (graphs, caches) are dropped: a batch started
    earlier may still be replaying a graph that is dropped."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_layer(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer of an HF cache (transformers >= 4.56 and 5.x layouts)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        layer = layers[index]
        return layer.keys, layer.values
    return cache.key_cache[index], cache.value_cache[index]


class Runner:
    """Static buffers (KV cache, state, pooled sums) and the captured step for one RunKey."""

    def __init__(
        self,
        plan: DecoderPlan,
        model: StepModel,
        key: RunKey,
        dims: Dims,
        attn_config: tuple[int, ...] | None,
    ) -> None:
        import torch

        self.plan = plan
        self.m = model
        self.key = key
        spec, dev = model.spec, model.device
        b, p, t = key.batch, key.prompt_len, key.max_new_tokens
        self.total_len = p + t
        if spec.sliding_window is not None and self.total_len > spec.sliding_window:
            # The prefill cache of HF keeps only the window; re-deriving it is not worth it here.
            raise ModelError(
                f"prompt + new tokens ({self.total_len}) exceed the sliding window "
                f"({spec.sliding_window}) of this model",
                "use --engine hf for sequences longer than the window",
            )
        cache_shape = (b, spec.n_kv_heads, self.total_len, spec.head_dim)
        dtype = model.dtype
        self.k_cache = [torch.zeros(cache_shape, dtype=dtype, device=dev) for _ in model.weights]
        self.v_cache = [torch.zeros(cache_shape, dtype=dtype, device=dev) for _ in model.weights]
        self.slot_range = torch.arange(self.total_len, device=dev)
        self.st = StepState(
            cur_tok=torch.zeros(b, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            start=torch.zeros(1, dtype=torch.long, device=dev),
            pad_len=torch.zeros(b, dtype=torch.long, device=dev),
            alive=torch.zeros(b, dtype=torch.bool, device=dev),
            feed_weight=torch.zeros(b, dtype=torch.float32, device=dev),
            n_kept=torch.zeros(b, dtype=torch.long, device=dev),
            eos_hit=torch.zeros(b, dtype=torch.bool, device=dev),
            out_tokens=torch.zeros(b, t + 1, dtype=torch.long, device=dev),
            temperature=torch.ones(b, dtype=torch.float32, device=dev),
            top_p=torch.ones(b, dtype=torch.float32, device=dev),
            seeds=torch.zeros(b, dtype=torch.long, device=dev),
        )
        # response sums per tracekit layer (0 = embedding output, i = after block i-1); separate
        # allocations, not views of one tensor, so compiled code updates each one in place
        cap_layers = plan.layers if "response_avg" in plan.poolings else ()
        self.caps: dict[int, torch.Tensor] = {
            layer: torch.zeros(b, spec.hidden, dtype=torch.float32, device=dev)
            for layer in cap_layers
        }
        self.dims = dims
        # the fused attention kernel's configuration (ops.attention.kernel_config)
        self.attn_config = attn_config
        self.work = None
        if dims.block is not None:
            from tracekit.engines.cuda.ops.block import workspace

            self.work = workspace(b, spec.hidden, dev)
        # the step stores captured states in rings, flushed into self.caps by the host
        # (ops.ring); not with fused blocks, whose kernels add into the sums themselves
        self.rings = None
        if self.caps and plan.capture_ring and dims.block is None:
            from tracekit.engines.cuda.ops.ring import CaptureRings

            self.rings = CaptureRings(self.caps, plan.capture_ring, dtype)
        self.graph: Any = None
        # the prefill as a CUDA graph (prefill_as_graph): captured on first use; False after
        # a failed capture (the prefill then runs eagerly)
        self.prefill_graph: Any = None
        self._prefill_in: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefill_out: dict[str, torch.Tensor] = {}

    def sink(self, layer: int) -> Sink | None:
        """What the step does with tracekit layer ``layer``'s state: the steering delta to add
        (at the steered layer, where decode steps steer) and its ring or its sums."""
        buf = (self.rings.rings if self.rings is not None else self.caps).get(layer)
        steer = self.key.steer
        steered = steer is not None and steer[0] == layer and steer[1] in ("response", "all")
        if buf is None and not steered:
            return None
        st = self.st
        delta = self.m.steer_delta if steered else None
        return Sink(buf, st.feed_weight, st.slot, st.start, delta)

    def _steer_prompt(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[batch, seq, d]`` of the prefill at tracekit layer ``layer``, steered
        where the key steers there: every position (``prompt``, ``all``) or the last one
        (``response``: left padding puts every row's last prompt token in the last column)."""
        steer = self.key.steer
        if steer is None or steer[0] != layer:
            return hidden
        delta = self.m.steer_delta
        if steer[1] != "response":
            return hidden + delta
        steered = hidden.clone()
        steered[:, -1, :] += delta
        return steered

    @property
    def ring_size(self) -> int:
        """Steps between flushes of the capture rings (0: no rings)."""
        return 0 if self.rings is None else self.rings.size

    def flush(self, count: int) -> None:
        """Add the last ``count`` steps' captured states into the sums (:mod:`.ops.ring`)."""
        if self.rings is not None:
            self.rings.flush(count)

    # -- one decode step (eager Python that calls the compiled pieces) ------------------------
    def step(self) -> None:
        m, st = self.m, self.st
        d = self.dims
        if d.block is not None:
            self._step_block()
            return
        if d.fused_attention:
            self._step_fused()
            return
        slot = st.slot
        caches = [Caches(k, v) for k, v in zip(self.k_cache, self.v_cache, strict=True)]
        weights = m.weights
        last = len(weights) - 1
        h, q, k, v, cos, sin, bias = m.fns.first(
            st.cur_tok,
            m.embed,
            slot,
            st.pad_len,
            self.slot_range,
            m.cos_table,
            m.sin_table,
            self.sink(0),
            weights[0],
            caches[0],
            d,
        )
        for i in range(last):
            if not d.write_kv:
                self._write_kv(caches[i], k, v, slot)
            h, q, k, v = m.fns.middle(
                h,
                q,
                caches[i],
                bias,
                weights[i],
                self.sink(i + 1),
                weights[i + 1],
                caches[i + 1],
                slot,
                cos,
                sin,
                d,
            )
        if not d.write_kv:
            self._write_kv(caches[last], k, v, slot)
        self._last(h, q, caches[last], bias)

    def _step_fused(self) -> None:
        """One decode step with the fused attention kernel between the compiled pieces."""
        m, d = self.m, self.dims
        weights = m.weights
        last = len(weights) - 1
        h, qkv, cos, sin = m.fns.first_fused(*self._step_start(), weights[0], d)
        for i, w in enumerate(weights):
            attn = self._attend(i, qkv, w.qkv_bias, cos, sin)
            if i < last:
                cap = self.sink(i + 1)
                h, qkv = m.fns.middle_fused(h, attn, w, cap, weights[i + 1], d)
        self._last(h, attn, None, None)

    def _step_block(self) -> None:
        """One decode step of fused block products (:mod:`tracekit.engines.cuda.ops.block`)
        and the fused attention kernel: five kernels per block."""
        from tracekit.engines.cuda.ops import block as cuda_block

        m, st, d = self.m, self.st, self.dims
        splits, pdl, work = d.block, d.gemv.pdl, self.work
        assert splits is not None and work is not None
        h, ss, cos, sin = m.fns.embed_norm(*self._step_start())
        for i, w in enumerate(m.weights):
            assert w.qkv is not None and w.gate_up is not None
            qkv = cuda_block.norm_product(h, ss, w.ln1, w.qkv, d.eps, splits.qkv, pdl)
            attn = self._attend(i, qkv, w.qkv_bias, cos, sin)
            h, ss = cuda_block.residual_product(attn, w.o, h, work, splits.o, None, pdl)
            act = cuda_block.norm_gated_product(h, ss, w.ln2, w.gate_up, d.eps, pdl)
            cap = self.caps.get(i + 1)  # no ring here (FastDecoder.capture_ring)
            capture = None if cap is None else (cap, st.feed_weight)
            h, ss = cuda_block.residual_product(act, w.down, h, work, splits.down, capture, pdl)
        m.fns.head_advance(h, m.final_norm, m.lm_head, *self._step_end())

    def _attend(
        self,
        i: int,
        qkv: torch.Tensor,
        bias: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """Block ``i``'s attention through the fused kernel: rotary, KV write, attention.
        ``cos``/``sin``: ``[B, head_dim]``, or ``[tables, B, head_dim]`` where the blocks
        use several rotary tables (each block's ``rope`` picks one)."""
        from tracekit.engines.cuda.ops.attention import decode_attention

        d, st, m = self.dims, self.st, self.m
        w = m.weights[i]
        assert m.arch.attention_shape is not None
        shape = m.arch.attention_shape(d, w)
        if cos.dim() == 3:
            cos, sin = cos[w.rope], sin[w.rope]
        k_cache, v_cache = self.k_cache[i], self.v_cache[i]
        pdl, config = d.gemv.pdl, self.attn_config
        return decode_attention(
            qkv, bias, cos, sin, k_cache, v_cache, st.slot, st.pad_len, shape, pdl, config,
            w.q_norm, w.k_norm,
        )  # fmt: skip

    def _last(
        self, h: torch.Tensor, q: torch.Tensor, cache: Caches | None, bias: torch.Tensor | None
    ) -> None:
        m = self.m
        end = self._step_end()
        m.fns.last(h, q, cache, bias, m.weights[-1], self.sink(len(m.weights)), m.final_norm,
                   m.lm_head, *end)  # fmt: skip

    def _step_start(self) -> tuple[Any, ...]:
        """What the start of a step (embedding, rotary rows) takes: ``(tokens, embedding,
        slot, left padding, cos table, sin table, layer 0's sink)``, the first arguments of
        the step functions ``first_fused`` and ``embed_norm``."""
        m, st = self.m, self.st
        return (st.cur_tok, m.embed, st.slot, st.pad_len, m.cos_table, m.sin_table, self.sink(0))

    def _step_end(self) -> tuple[Any, ...]:
        """What the end of a step (logits, sampling, per-row bookkeeping) takes after the
        final norm and head: ``(state, eos ids, pad id, max new tokens, include eos, sampling,
        top-p, dims)``, the last arguments of the step functions ``last`` and
        ``head_advance``."""
        key = self.key
        return (
            self.st,
            self.m.eos_ids,
            self.plan.pad_id,
            key.max_new_tokens,
            self.plan.include_eos,
            key.do_sample,
            key.use_top_p,
            self.dims,
        )

    @staticmethod
    def _write_kv(cache: Caches, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
        cache.k.index_copy_(2, slot, k[:, :, None, :])
        cache.v.index_copy_(2, slot, v[:, :, None, :])

    def reset_dummy(self) -> None:
        """Valid state for warm-up and capture (any token ids, step 0)."""
        st = self.st
        st.cur_tok.zero_()
        st.slot.fill_(self.key.prompt_len)
        st.start.fill_(self.key.prompt_len)
        st.pad_len.zero_()
        st.alive.zero_()
        st.feed_weight.zero_()

    def capture(self, warmup: int = 2) -> tuple[float, float]:
        """Warm up (compile, autotune, allocate) and record the step as a CUDA graph; returns
        the seconds of each part."""
        import torch

        started = time.perf_counter()

        def warm() -> None:
            for _ in range(warmup):
                self.reset_dummy()
                self.step()

        on_side_stream(warm, self.m.device)
        torch.cuda.synchronize(self.m.device)
        warmed = time.perf_counter()
        self.reset_dummy()
        graph = torch.cuda.CUDAGraph()
        with capture_graph(graph, self.m.device):
            self.step()
        self.graph = graph
        self.reset_dummy()
        return warmed - started, time.perf_counter() - warmed

    def _prefill_graph(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`_prefill_body` replayed as a CUDA graph over static copies of
        ``ids`` and ``mask``, captured on the first call. The launches of a prefill through
        the compiled blocks cost the host ~15 ms at 16 layers (measured on an H200), more than
        the device's work for short prompts; a replay costs microseconds. The returned
        poolings are the graph's static outputs: the next prefill overwrites them, so they
        are copied out first (the run's results are queued for the host before it)."""
        import torch

        m = self.m
        if self.prefill_graph is not None:
            assert self._prefill_in is not None
            self._prefill_in[0].copy_(ids)
            self._prefill_in[1].copy_(mask)
        else:
            started = time.perf_counter()
            try:
                inputs = self._prefill_in = (ids.clone(), mask.clone())
                on_side_stream(lambda: self._prefill_body(*inputs), m.device)
                # one memory pool for every prefill graph of the decoder, so its runners do
                # not each keep a prefill's activations. Safe because prefills never overlap
                # and a prefill's only outputs read later (its poolings) are copied out before
                # the next prefill is queued (FastDecoder.collect)
                if m.prefill_pool is None:
                    m.prefill_pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with capture_graph(graph, m.device, pool=m.prefill_pool):
                    self._prefill_out = self._prefill_body(*inputs)
                self.prefill_graph = graph
            except Exception as exc:  # the prefill can always run eagerly instead
                if is_oom(exc):
                    raise
                logger.warning("CUDA graph capture of the prefill failed (%s); run eagerly", exc)
                self.prefill_graph = False
                return self._prefill_body(ids, mask)
            finally:
                m.setup_parts["graph_capture"] += time.perf_counter() - started
        self.prefill_graph.replay()
        return self._prefill_out

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def set_step(self, dims: Dims, attn_config: tuple[int, ...] | None) -> None:
        """Run the step with other constants (step tuning's candidates); the caller captures
        again."""
        self.dims, self.attn_config = dims, attn_config

    def time_steps(self, rounds: int = 3) -> float:
        """Seconds per replay of the captured step: the best of ``rounds`` runs of up to 16
        replays from the dummy state (each replay advances the slot: no more replays than the
        cache has slots after the prompt; a real decode step writes its slot before any step
        reads it, so what these replays leave there is never read)."""
        import torch

        replays = max(1, min(16, self.key.max_new_tokens - 1))
        assert self.graph is not None
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(rounds):
            self.reset_dummy()
            start.record()
            for _ in range(replays):
                self.graph.replay()
            end.record()
            torch.cuda.synchronize(self.m.device)
            best = min(best, start.elapsed_time(end) / 1e3 / replays)
        self.reset_dummy()
        return best

    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        temps: list[float],
        tops: list[float],
        seeds: list[int],
    ) -> dict[str, torch.Tensor]:
        """The prompt through the model, the state reset and the first token chosen; the
        prompt poolings (device tensors, static ones where the prefill is a graph)."""
        import torch

        from tracekit.engines.interface import to_device

        st, dev = self.st, self.m.device
        # pinned, non-blocking: queued behind the previous batch's steps (which read them)
        st.temperature.copy_(to_device(torch.tensor(temps, dtype=torch.float32), dev))
        st.top_p.copy_(to_device(torch.tensor(tops, dtype=torch.float32), dev))
        st.seeds.copy_(to_device(torch.tensor(seeds, dtype=torch.long), dev))
        if self.prefill_as_graph():
            return self._prefill_graph(ids, mask)
        return self._prefill_body(ids, mask)

    def prefill_as_graph(self) -> bool:
        """Whether the prefill is replayed as a CUDA graph: with captured steps and the
        engine's own prefill, for prompts up to :data:`PREFILL_GRAPH_TOKENS` tokens in all (a
        graph keeps its activations' memory for as long as the runner lives)."""
        key = self.key
        return (
            self.graph is not None
            and bool(self.plan.fast_prefill)
            and self.prefill_graph is not False
            and key.batch * key.prompt_len <= PREFILL_GRAPH_TOKENS
        )

    def _prefill_body(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`prefill`'s device work: only tensor operations on device tensors (no host
        reads), so that it can be recorded as a CUDA graph."""
        import torch

        st, plan, m = self.st, self.plan, self.m
        prompt_len = ids.shape[1]
        n_real = mask.sum(dim=1)
        sums: dict[int, torch.Tensor] = {}
        lasts: dict[int, torch.Tensor] = {}

        def pool(layer: int, hidden: torch.Tensor) -> None:
            # left padding: the last column is every row's last prompt token
            lasts[layer] = hidden[:, -1].float()
            if "prompt_avg" in plan.poolings:
                sums[layer] = masked_sum(hidden, mask)

        # positions as HF generate builds them from the mask: 0 at each row's first real token
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # later cache slots may hold keys of an earlier batch; the mask never lets them in
        own = plan.fast_prefill or not self.m.arch.hf_prefill
        prefill = self._prefill_fast if own else self._prefill_hf
        logits = prefill(ids, mask, positions, pool)
        st.pad_len.copy_(prompt_len - n_real)
        st.slot.fill_(prompt_len - 1)
        st.start.fill_(prompt_len)
        st.alive.fill_(True)
        st.feed_weight.zero_()
        st.n_kept.zero_()
        st.eos_hit.zero_()
        st.out_tokens.fill_(plan.pad_id)
        for buf in self.caps.values():
            buf.zero_()
        # the first token goes through the same device bookkeeping as every decode step
        m.fns.advance(
            logits,
            st,
            m.eos_ids,
            plan.pad_id,
            self.key.max_new_tokens,
            plan.include_eos,
            self.key.do_sample,
            self.key.use_top_p,
            self.dims.argmax_chunk,
        )
        pooled: dict[str, torch.Tensor] = {}
        if "prompt_last" in plan.poolings:
            pooled["prompt_last"] = torch.stack([lasts[x] for x in plan.layers], dim=1)
        if "prompt_avg" in plan.poolings:
            denom = n_real.to(torch.float32)[:, None, None]
            pooled["prompt_avg"] = torch.stack([sums[x] for x in plan.layers], dim=1) / denom
        return pooled

    def _prefill_hf(
        self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, pool: Any
    ) -> torch.Tensor:
        """The prompt through the HF model itself (its hooks call ``pool(layer, states)``);
        keys and values copied into the cache; last-column logits (float32)."""
        from tracekit.engines.steering import SteeringHook

        m, layers = self.m, self.plan.layers
        steer = None
        if self.key.steer is not None:
            assert m.steering is not None
            steer = SteeringHook(m.handles, m.steering)  # before the taps: they see its add
            steer.__enter__()
        taps = LayerTaps(m.handles, layers, pool) if layers else None
        if taps is not None:
            taps.__enter__()
        try:
            out = m.hf_model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            if taps is not None:
                taps.__exit__(None, None, None)
            if steer is not None:
                steer.__exit__(None, None, None)
        cache = output_cache(out)
        prompt_len = ids.shape[1]
        for i in range(m.spec.n_blocks):
            keys, values = _cache_layer(cache, i)
            self.k_cache[i][:, :, :prompt_len].copy_(keys)
            self.v_cache[i][:, :, :prompt_len].copy_(values)
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    def _prefill_fast(
        self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, pool: Any
    ) -> torch.Tensor:
        """:meth:`_prefill_hf` through the architecture's own block function (compiled once,
        batch and length dynamic, as the teacher-forced forward's): left-padded rows with a
        boolean mask (:func:`prefill_mask`), per-row rotary positions, each block's keys and
        values written straight into the cache."""
        import torch

        m, compiled = self.m, bool(self.plan.compile)
        spec = m.spec
        # [batch, seq, head_dim] (or [batch, seq, tables, head_dim] for several tables)
        cos, sin = m.cos_table[position_ids], m.sin_table[position_ids]
        attn_mask = prefill_mask(mask)
        wanted = set(self.plan.layers)
        prompt_len = ids.shape[1]
        h = self._steer_prompt(0, m.arch.embed(ids, m.embed, spec.extra))
        if 0 in wanted:
            pool(0, h)

        def mark_dynamic(t: torch.Tensor, *dims: int) -> None:
            # one compilation for every batch size and prompt length
            for d in dims if compiled else ():
                torch._dynamo.maybe_mark_dynamic(t, d)

        mark_dynamic(cos, 0, 1)
        mark_dynamic(sin, 0, 1)
        mark_dynamic(attn_mask, 0, 2, 3)
        for i, w in enumerate(m.weights):
            mark_dynamic(h, 0, 1)
            h, keys, values = m.fns.block_kv(
                h,
                w,
                cos,
                sin,
                attn_mask,
                *spec.block_constants,
            )
            self.k_cache[i][:, :, :prompt_len].copy_(keys)
            self.v_cache[i][:, :, :prompt_len].copy_(values)
            h = self._steer_prompt(i + 1, h)
            if i + 1 in wanted:
                pool(i + 1, h)
        logits: torch.Tensor = m.arch.head(
            h[:, -1], m.final_norm, m.lm_head, spec.eps, extra=spec.extra
        )
        return logits


def prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[batch, 1, seq, seq]`` for left-padded rows (``mask`` is the
    0/1 ``[batch, seq]`` attention mask): causal over each row's real tokens. A pad position
    attends to itself only, so no row of the softmax is empty (an empty one is NaN, and a NaN
    key or value in the cache would reach later steps through a zero weight)."""
    import torch

    seq = mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(seq, dtype=torch.bool, device=mask.device)
    return ((causal[None] & mask.bool()[:, None, :]) | eye[None])[:, None]
