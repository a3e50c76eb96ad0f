"""What a decode step is built from: the decoder's plan and the constants a step specialises on.

:class:`DecoderPlan` is every choice a :class:`~tracekit.engines.cuda.decoder.FastDecoder`
takes, frozen and checked when built; :meth:`DecoderPlan.resolved` fills the defaults that
depend on the device. The runner (:mod:`.runner`) reads the plan; per batch size the decoder
adds what it measured (:class:`GemvChoice`, :class:`BlockSplits`) into :class:`Dims`, the
Python constants the compiled step functions specialise on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from tracekit.engines.cuda.ops.gemv import MODE_NAMES, SWIGLU

if TYPE_CHECKING:
    import torch

POOLINGS = ("response_avg", "prompt_last", "prompt_avg")

GEMV_ROLES = ("qkv", "o", "gate_up", "down", "head")
"""The linear layers whose kernel ``DecoderPlan(gemv_modes=...)`` can pin."""

PREFILL_GRAPH_TOKENS = 16384
"""Largest prefill (batch x padded prompt length) replayed as a CUDA graph; longer prompts
keep the eager prefill, whose launch cost is small next to their device time."""

SETUP_PARTS = ("kernel_choice", "compile_warmup", "graph_capture", "step_tuning")

CAPTURE_RING = 8
"""Decode steps per flush of the capture rings (:mod:`tracekit.engines.cuda.ops.ring`), by
default with captured steps."""

FUSED_ATTENTION_MAX_LEN = 1024
"""Longest cache (prompt + new tokens) for which ``fused_attention="auto"`` uses the kernel."""


def step_tuning_default() -> bool:
    """Whether step tuning is on where ``DecoderPlan(tune_steps=None)``: yes, unless the
    environment says ``TRACEKIT_STEP_TUNING=0`` (or ``off``/``false``/``no``), for machines that
    live too briefly to repay a minute or two per batch size (the tuning's warning names it)."""
    value = os.environ.get("TRACEKIT_STEP_TUNING", "1").strip().lower()
    return value not in ("0", "off", "false", "no")


def mode_fits(role: str, mode: int) -> bool:
    """Whether ``mode`` can run layer ``role``: :data:`SWIGLU` is the gate/up product's only."""
    return mode != SWIGLU or role == "gate_up"


def pinned_modes(modes: Mapping[str, str] | None) -> tuple[tuple[str, int], ...]:
    """``{role: mode name}`` (``DecoderPlan(gemv_modes=...)``) as ops.gemv modes, checked."""
    pinned: dict[str, int] = {}
    for role, name in (modes or {}).items():
        if role not in GEMV_ROLES:
            raise ValueError(
                f"gemv_modes: unknown layer {role!r}; choose from {', '.join(GEMV_ROLES)}"
            )
        if name not in MODE_NAMES:
            raise ValueError(
                f"gemv_modes: unknown mode {name!r} for {role}; choose from {', '.join(MODE_NAMES)}"
            )
        if not mode_fits(role, MODE_NAMES.index(name)):
            raise ValueError(f"gemv_modes: swiglu is a mode of gate_up only, not of {role}")
        pinned[role] = MODE_NAMES.index(name)
    return tuple(pinned.items())


@dataclass(frozen=True)
class DecoderPlan:
    """How a :class:`~tracekit.engines.cuda.decoder.FastDecoder` generates and captures.

    ``layers`` are tracekit layers (0 = embedding output, ``i`` = after block ``i - 1``);
    ``poolings`` a subset of :data:`POOLINGS`. ``None`` means the default for the model's
    device (:meth:`resolved`): ``use_graphs``, ``compile`` and ``fuse_weights`` (re-lay the
    model's q/k/v and gate/up weights into fused buffers, values unchanged) are on for CUDA and
    off elsewhere.

    The step's knobs (defaults are what the benchmarks chose; docs/engine.md gives the numbers):
    ``gemv`` (``auto``: per shape the fastest correct of ``F.linear``, the transposed product
    and the Triton kernels; ``on``: the split-N Triton kernel wherever correct; ``splitk``: the
    split-K one in two slices wherever correct; ``off``: ``F.linear``), ``gemv_modes`` (pins
    the kernel of single layers over ``gemv``, e.g. ``{"o": "splitk8"}``: roles
    :data:`GEMV_ROLES`, modes :data:`tracekit.engines.cuda.ops.gemv.MODE_NAMES`; a pinned mode
    that fails its check runs ``F.linear``; only where ``gemv`` is not ``off``), ``tune_steps``
    (with ``gemv="auto"`` and captured steps, the default unless ``TRACEKIT_STEP_TUNING=0``: the
    first step captured at a batch size re-decides some layers' kernels by timing whole steps,
    :mod:`tracekit.engines.cuda.tuning`), ``fused_attention`` (``auto``/``on``/``off``: rotary,
    KV write and attention in one Triton kernel), ``attention_config`` (pins that kernel's
    (slots per block, warps, stages[, shares of the cache walk]), one of
    :data:`tracekit.engines.cuda.ops.attention.CONFIGS`;
    ``None``: timed per shape), ``pdl`` (programmatic dependent launch of the step's Triton and
    inductor kernels; ``None``: wherever available), ``fast_prefill`` (the prompt through the
    engine's own block functions instead of the HF model; ``None``: with ``compile``),
    ``fused_block`` (every block as the five fused kernels of
    :mod:`tracekit.engines.cuda.ops.block`; off: slower on an H200), ``capture_ring`` (the step
    stores captured states in rings of this many steps that the host adds into the response
    sums, :mod:`tracekit.engines.cuda.ops.ring`; 0: the step adds into the sums; ``None``:
    :data:`CAPTURE_RING` with captured steps, 0 otherwise; not with ``fused_block``),
    ``check_every`` (decode steps between host checks for "all rows done"), ``prompt_bucket``
    (prompt lengths are padded up to a multiple, so batches share captured graphs),
    ``max_runners`` (captured shapes kept alive, each with its own KV cache) and
    ``pad_batches`` (a batch smaller than the caller's ``pad_to`` runs padded to it; default
    with compiled or captured steps).
    """

    layers: tuple[int, ...] = ()
    poolings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    include_eos: bool = False
    use_graphs: bool | None = None
    compile: bool | None = None
    fuse_weights: bool | None = None
    gemv: str = "auto"
    gemv_modes: Mapping[str, str] | tuple[tuple[str, int], ...] = ()
    tune_steps: bool | None = None
    fused_attention: str = "auto"
    attention_config: tuple[int, ...] | None = None
    pdl: bool | None = None
    fast_prefill: bool | None = None
    fused_block: bool = False
    capture_ring: int | None = None
    check_every: int = 8
    prompt_bucket: int = 16
    max_runners: int = 2
    pad_batches: bool | None = None
    time_kernels: bool = True
    """Time the linear layers' and the attention kernel's candidates (and tune whole steps)
    where no decision is kept yet. False: the kept decisions where there are any, else
    cuBLAS and the attention kernel's default configuration, no timing (a first batch in
    seconds instead of minutes; :meth:`CudaEngine.plan_job` sets it for short jobs)."""
    resolved_for: str | None = field(default=None, compare=False)
    """The device type whose defaults :meth:`resolved` filled in (``None``: not yet)."""

    def __post_init__(self) -> None:
        bad_pool = [p for p in self.poolings if p not in POOLINGS]
        if bad_pool:
            raise ValueError(f"unknown pooling(s) {bad_pool}: choose from {', '.join(POOLINGS)}")
        if not self.eos_token_ids:
            raise ValueError("give at least one eos token id")
        if self.gemv not in ("auto", "on", "splitk", "off"):
            raise ValueError(f"gemv must be auto, on, splitk or off, not {self.gemv!r}")
        if self.fused_attention not in ("auto", "on", "off"):
            raise ValueError(
                f"fused_attention must be auto, on or off, not {self.fused_attention!r}"
            )
        if self.capture_ring is not None and self.capture_ring < 0:
            raise ValueError(f"capture_ring must be 0 or more, not {self.capture_ring}")
        config = self.attention_config
        if config is not None:
            block_n, warps, stages, splits = (*config, 1)[:4] if len(config) in (3, 4) else (0,) * 4
            if (
                block_n < 16
                or block_n & (block_n - 1)
                or warps < 1
                or stages < 1
                or splits < 1
                or splits & (splits - 1)
            ):
                raise ValueError(
                    "attention_config is (slots per block: a power of 2 from 16, warps, stages"
                    f"[, shares of the cache walk: a power of 2]), not {config!r}"
                )
            config = tuple(int(x) for x in config)
        modes = self.gemv_modes
        fields: dict[str, Any] = {
            # a layer list without poolings (or the reverse) captures nothing
            "layers": tuple(int(x) for x in self.layers) if self.poolings else (),
            "poolings": tuple(str(p) for p in self.poolings) if self.layers else (),
            "eos_token_ids": tuple(int(x) for x in self.eos_token_ids),
            "attention_config": config,
            "gemv_modes": pinned_modes(modes) if isinstance(modes, Mapping) else tuple(modes),
            "check_every": max(1, int(self.check_every)),
            "prompt_bucket": max(1, int(self.prompt_bucket)),
            "max_runners": max(1, int(self.max_runners)),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def pinned(self) -> dict[str, int]:
        """``gemv_modes`` as ``{role: ops.gemv mode}``."""
        return dict(self.gemv_modes)  # type: ignore[arg-type]

    @property
    def pad_id(self) -> int:
        """The id of padding tokens (the first eos id unless ``pad_token_id`` is given)."""
        return int(self.pad_token_id if self.pad_token_id is not None else self.eos_token_ids[0])

    def resolved(self, device: torch.device) -> DecoderPlan:
        """This plan with every ``None`` default filled in for a model on ``device``, and the
        knobs the device cannot honour turned off (Triton products without fused weights,
        programmatic dependent launch without compiled CUDA-graph steps on a recent GPU)."""
        if self.resolved_for is not None:
            return self
        import logging

        from tracekit.engines.cuda.ops.gemv import pdl_available

        on_cuda = device.type == "cuda"
        graphs = on_cuda if self.use_graphs is None else bool(self.use_graphs)
        compiled = on_cuda if self.compile is None else bool(self.compile)
        fuse = on_cuda if self.fuse_weights is None else bool(self.fuse_weights)
        fused_block = self.fused_block and fuse
        ring = (CAPTURE_RING if graphs else 0) if self.capture_ring is None else self.capture_ring
        fused_attention = self.fused_attention if fuse else "off"
        if fused_attention == "auto" and not on_cuda:
            # "on" also off CUDA (the Triton interpreter runs it there, for tests)
            fused_attention = "off"
        gemv = self.gemv if on_cuda and fuse else "off"
        # programmatic dependent launch saves the ramp and tail of each of the step's kernels
        can_pdl = compiled and graphs and pdl_available(device)
        if self.pdl and not can_pdl:
            logging.getLogger(__name__).warning(
                "programmatic dependent launch needs compiled CUDA-graph steps on a Hopper or "
                "later GPU with a recent Triton: not used"
            )
        tune = step_tuning_default() if self.tune_steps is None else bool(self.tune_steps)
        return replace(
            self,
            use_graphs=graphs,
            compile=compiled,
            fuse_weights=fuse,
            gemv=gemv,
            tune_steps=tune and graphs and gemv == "auto" and not fused_block and self.time_kernels,
            fused_attention=fused_attention,
            pdl=can_pdl if self.pdl is None else bool(self.pdl) and can_pdl,
            # on with compiled steps: +10% tokens/s end to end at batch 32 on an H200
            fast_prefill=compiled if self.fast_prefill is None else bool(self.fast_prefill),
            fused_block=fused_block,
            capture_ring=0 if fused_block else int(ring),
            pad_batches=(compiled or graphs) if self.pad_batches is None else self.pad_batches,
            resolved_for=device.type,
        )

    def with_capture(self, layers: Sequence[int], poolings: Sequence[str]) -> DecoderPlan:
        """This plan capturing ``poolings`` at ``layers``."""
        return replace(self, layers=tuple(layers), poolings=tuple(poolings))


@dataclass(frozen=True)
class RunKey:
    """The shape of one runner: its buffers and captured step serve exactly this."""

    batch: int
    prompt_len: int
    max_new_tokens: int
    do_sample: bool
    use_top_p: bool
    steer: tuple[int, str] | None = None
    """Steering's ``(layer, positions)`` (:class:`~tracekit.engines.steering.Steering`), or
    ``None``: where the step adds the decoder's steering delta. Its value is not part of the
    key: a sweep's coefficients share one captured step."""


class GemvChoice(NamedTuple):
    """Per linear layer, how it runs (:mod:`tracekit.engines.cuda.ops.gemv` modes; 0 = F.linear)."""

    qkv: int = 0
    o: int = 0
    gate_up: int = 0
    down: int = 0
    head: int = 0
    pdl: bool = False
    """The Triton kernels (products and attention) as programmatic dependent launches."""


NO_GEMV = GemvChoice()


class BlockSplits(NamedTuple):
    """K slices of each fused block product (:mod:`tracekit.engines.cuda.ops.block`)."""

    qkv: int
    o: int
    down: int


class AttentionShape(NamedTuple):
    """The fused attention kernel's constants (:mod:`.ops.attention` specialises on them)."""

    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    window: int | None
    softcap: float | None = None
    """Gemma-2's attention logit soft-cap; ``None``: scores not capped."""
    qk_norm_eps: float | None = None
    """Set: q and k heads normalised (Gemma's (1 + w) RMSNorm, this epsilon) before the
    rotary embedding; their float32 scales are :func:`decode_attention`'s ``q_norm``/``k_norm``."""


class Dims(NamedTuple):
    """Python constants the step functions specialise on (one compilation per value set)."""

    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    scaling: float
    window: int | None
    write_kv: bool
    """True: compiled code writes the KV cache; False (eager steps): the caller writes it."""
    gemv: GemvChoice
    """Which linear layers use the Triton matrix-vector kernel (per batch size)."""
    argmax_chunk: int
    """Chunk length of the two-stage argmax over the vocabulary (0: one stage)."""
    fused_attention: bool = False
    """True: rotary, KV write and attention in one Triton kernel per block
    (:mod:`tracekit.engines.cuda.ops.attention`), called between the compiled pieces."""
    block: BlockSplits | None = None
    """Set: every block runs as the fused products of :mod:`tracekit.engines.cuda.ops.block`
    around the fused attention kernel (K slices per product); only the embedding and the
    head are compiled pieces."""
    extra: tuple[Any, ...] = ()
    """The architecture's own constants (:attr:`DecoderSpec.extra`), hashable."""
