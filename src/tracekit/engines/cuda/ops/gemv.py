"""A Triton matrix-vector product for small-batch decode steps, chosen per shape by timing.

At batch 1-32 a decode step's linear layers are matrix-vector products: the cost is reading
the weight once. cuBLAS' kernels for these shapes reach about half of the HBM bandwidth on an
H200 (one tile of output rows per multiprocessor, too few bytes in flight); this kernel gives
each program a thin slab of weight rows and a pipelined loop over K, so every multiprocessor
streams. It is registered as the custom op ``tracekit::gemv`` so ``torch.compile`` treats it
like a cuBLAS call, and CUDA graphs capture it.

The same kernel, launched as ``tracekit::gemv_splitk``, also splits K into 2, 4 or 8 slices
(more programs, more bytes in flight for matrices with few output rows, such as ``o_proj`` and
``down_proj``) and returns the float32 partial products ``[splits, M, N]``; :func:`linear`
sums them, and inside the compiled decode step that sum fuses into the kernel that consumes
the product (the residual add, SiLU or rotary), so the split costs no extra kernel.

Nothing here is trusted blindly: :func:`choose` runs the kernel once per shape against
``F.linear`` (result within bf16 rounding) and times both; the engine uses the kernel only
where it is correct and faster. Without Triton or CUDA every shape keeps ``F.linear``.
The kernel's own configuration (block sizes, warps, pipeline stages, and whether the
multiply's operands are swapped: the kernel's ``SWAPPED`` form) is timed per shape the same
way, as the decode step launches it (:func:`kernel_config`), not by Triton's autotuner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_ROWS = 64
"""Largest batch (rows of x) the kernel serves; larger batches are matrix products."""

_STATE: dict[str, Any] = {}
_CHOICES: dict[tuple[int, int, int, str], int] = {}


KINDS = ("", "gated", "swiglu")
"""What the matrix-vector kernel computes: ``x @ w.T``; ``(silu(gate) * up) @ w.T`` from a
gate/up product ``x`` (the down product's input, gated in its prologue); ``silu(gate) * up``
of ``x @ w.T`` for a gate/up weight ``w`` (gated in its epilogue)."""


def _check_gated(x: torch.Tensor, w: torch.Tensor, gated: bool) -> None:
    """``x``'s width against ``w``'s K: ``K`` plain, ``2K`` (gate then up) gated."""
    want = 2 * w.shape[1] if gated else w.shape[1]
    if x.shape[1] != want or x.stride(1) != 1:
        raise ValueError(f"x of width {x.shape[1]} for a weight of K={w.shape[1]} (gated={gated})")


def import_kernel(module: str, name: str) -> tuple[Any, Any] | None:
    """``(triton, kernel)``: the kernel ``name`` of tracekit's Triton source module ``module``
    (``tracekit.engines.cuda.ops._*_kernel``); ``None`` without Triton."""
    import importlib

    try:
        import triton

        kernel = getattr(importlib.import_module(module), name)
    except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
        return None
    return triton, kernel


def autotuned(
    kernel: Any, configs: list[Any], key: list[str], restore: list[str] | None = None
) -> Any:
    """``kernel`` under Triton's autotuner over ``configs``, re-tuned per value of the ``key``
    arguments, with timings kept on disk (a second process or run reuses them) and short
    benchmarks: these kernels take microseconds, 20 ms of repetitions is plenty (the default
    125 ms per configuration costs seconds per shape and process). ``restore``: arguments the
    kernel updates in place, put back after each timed run. ``None`` under the CPU
    interpreter, which has no benchmarker (the caller launches one fixed configuration)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    import triton

    def bench(kernel_call: Any, quantiles: Any) -> Any:
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    extra: dict[str, Any] = {"restore_value": restore} if restore else {}
    try:
        tuner = triton.autotune(
            configs=configs, key=key, do_bench=bench, cache_results=True, **extra
        )
    except TypeError:  # pragma: no cover - an older Triton
        tuner = triton.autotune(configs=configs, key=key, **extra)
    return tuner(kernel)


def _build() -> Any:
    """Define the Triton kernel and the custom ops once per process; ``None`` without Triton."""
    if "op" in _STATE:
        return _STATE["op"]
    _STATE["op"] = None
    try:
        import torch
        import triton

        from tracekit.engines.cuda.ops._gemv_kernel import gemv_kernel
    except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
        return None

    def run(
        x: torch.Tensor,
        w: torch.Tensor,
        y: torch.Tensor,
        splits: int,
        pdl: bool,
        kind: str,
        config: Config,
    ) -> None:
        """One launch in ``config`` (BLOCK_N, BLOCK_K, warps, stages, operands swapped) of the
        product ``kind`` (:data:`KINDS`)."""
        m = x.shape[0]
        n, k = w.shape
        block_n, block_k, warps, stages, swapped = config
        # programmatic dependent launch: only asked for where :func:`pdl_available` said yes
        extra: dict[str, Any] = {"USE_PDL": True, "launch_pdl": True} if pdl else {}
        if kind == "gated":
            extra["GATED"] = True
        elif kind == "swiglu":
            extra["SWIGLU"] = True
            n //= 2
            if pdl:  # launched early, the down product's programs slowed it by ~2 us a layer
                extra["LATE_LAUNCH"] = True
        if swapped:
            extra["SWAPPED"] = True
        gemv_kernel[(triton.cdiv(n, block_n), splits)](
            x, w, y, m, n, k, x.stride(0), w.stride(0),
            SPLIT_K=splits, BLOCK_M=max(16, triton.next_power_of_2(m)),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **extra,
        )  # fmt: skip

    def launch(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, splits: int, pdl: bool,
               kind: str = "") -> None:  # fmt: skip
        def other(weight: torch.Tensor, config: Config) -> None:
            run(x, weight, y, splits, pdl, kind, config)

        run(x, w, y, splits, pdl, kind, kernel_config(x, w, splits, pdl, kind, other))

    # explicit schemas: this module's annotations are strings (``from __future__``)
    @torch.library.custom_op(
        "tracekit::gemv",
        mutates_args=(),
        schema="(Tensor x, Tensor w, bool pdl=False, bool gated=False) -> Tensor",
    )
    def gemv(
        x: torch.Tensor, w: torch.Tensor, pdl: bool = False, gated: bool = False
    ) -> torch.Tensor:
        """``x @ w.T`` for ``x`` [M <= 64, K] and ``w`` [N, K], both contiguous in K;
        ``pdl``: launched as a programmatic dependent launch; ``gated``: ``x`` is a gate/up
        product [M, 2K] and ``silu(gate) * up`` is multiplied instead."""
        _check_gated(x, w, gated)
        y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
        launch(x, w, y, 1, pdl, "gated" if gated else "")
        return y

    @gemv.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, pdl: bool = False, gated: bool = False) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.custom_op(
        "tracekit::gemv_splitk",
        mutates_args=(),
        schema="(Tensor x, Tensor w, int splits, bool pdl=False, bool gated=False) -> Tensor",
    )
    def gemv_splitk(
        x: torch.Tensor, w: torch.Tensor, splits: int, pdl: bool = False, gated: bool = False
    ) -> torch.Tensor:
        """Partial products ``[splits, M, N]`` (float32) of ``x @ w.T`` over K slices."""
        _check_gated(x, w, gated)
        if w.shape[1] % splits:
            raise ValueError(f"K={w.shape[1]} is not a multiple of {splits} slices")
        y = torch.empty((splits, x.shape[0], w.shape[0]), dtype=torch.float32, device=x.device)
        launch(x, w, y, splits, pdl, "gated" if gated else "")
        return y

    @gemv_splitk.register_fake
    def _(
        x: torch.Tensor, w: torch.Tensor, splits: int, pdl: bool = False, gated: bool = False
    ) -> torch.Tensor:
        return x.new_empty((splits, x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.custom_op(
        "tracekit::gemv_swiglu",
        mutates_args=(),
        schema="(Tensor x, Tensor w, bool pdl=False) -> Tensor",
    )
    def gemv_swiglu(x: torch.Tensor, w: torch.Tensor, pdl: bool = False) -> torch.Tensor:
        """``silu(gate) * up`` ``[M, N / 2]`` for ``x`` [M <= 64, K] and a gate/up weight
        ``w`` [N, K] (gate rows first): both products in one kernel, no SiLU kernel after."""
        _check_gated(x, w, False)
        if w.shape[0] % 2:
            raise ValueError(f"a gate/up weight has an even number of rows, not {w.shape[0]}")
        y = torch.empty((x.shape[0], w.shape[0] // 2), dtype=x.dtype, device=x.device)
        launch(x, w, y, 1, pdl, "swiglu")
        return y

    @gemv_swiglu.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, pdl: bool = False) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0] // 2))

    _STATE["splitk"] = gemv_splitk
    _STATE["run"] = run
    _STATE["op"] = gemv
    return gemv


LINEAR, TRANSPOSED, TRITON, SPLIT_K2, SPLIT_K4, SPLIT_K8, SWIGLU = range(7)
"""How a linear layer runs: ``F.linear``; ``(w @ x.T).T`` (cuBLAS sees the tall-skinny
orientation and picks other kernels); the Triton kernel; the split-K Triton kernel with K in
2, 4 or 8 slices; for the gate/up product only, the Triton kernel computing
``silu(gate) * up`` as it stores (:func:`swiglu`)."""
MODE_NAMES = ("linear", "transposed", "triton", "splitk2", "splitk4", "splitk8", "swiglu")
TUNED_MODES = (LINEAR, SPLIT_K2, SPLIT_K4, SPLIT_K8)
"""The modes step tuning tries per layer, besides the one chosen alone: not the transposed
product (cuBLAS again), nor the split-N kernel (in whole steps on an H200 it was never the
fastest for o, q/k/v or down at batch 8 or 32)."""


def pdl_available(device: torch.device) -> bool:
    """Whether this module's and the attention kernel's programmatic dependent launch can be
    used on ``device``: a CUDA GPU of compute capability 9.0 or later (Hopper) and a Triton
    with grid dependency control (``tl.extra.cuda.gdc_wait``); never under the interpreter.

    With it, a kernel can start while the one before it drains, and loads what does not
    depend on it (its first weight tile) before it waits: a decode step is ~140 dependent
    kernels of a few microseconds each, and each one's ramp and tail is time the weights are
    not streaming.
    """
    import torch

    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        from triton.language.extra import cuda as tl_cuda
    except ImportError:  # pragma: no cover - CUDA builds of torch ship Triton
        return False
    return hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")


def splits_of(mode: int) -> int:
    """K slices of a split-K mode (``SPLIT_K2`` -> 2, ...)."""
    return 2 ** (mode - SPLIT_K2 + 1)


def mode_for_splits(splits: int) -> int:
    """The Triton mode of ``splits`` K slices (1 -> ``TRITON``, 2 -> ``SPLIT_K2``, ...)."""
    return TRITON if splits == 1 else SPLIT_K2 + splits.bit_length() - 2


_TIMINGS: dict[tuple[int, int, int, str], dict[str, float]] = {}


def linear(x: torch.Tensor, w: torch.Tensor, mode: int, pdl: bool = False) -> torch.Tensor:
    """``x @ w.T`` the way :func:`choose` picked for this shape; ``pdl``: the Triton kernels
    as programmatic dependent launches (only where :func:`pdl_available`)."""
    import torch
    import torch.nn.functional as F

    if mode == SWIGLU:
        raise ValueError("the swiglu mode is the gate/up product's only: see swiglu()")
    if mode == TRITON:
        return torch.ops.tracekit.gemv(x, w, pdl)
    if mode >= SPLIT_K2:
        parts = torch.ops.tracekit.gemv_splitk(x, w, splits_of(mode), pdl)
        return sum_partials(parts).to(x.dtype)
    if mode == TRANSPOSED:
        return torch.mm(w, x.t()).t()
    return F.linear(x, w)


def gated_linear(
    gate_up: torch.Tensor, w: torch.Tensor, mode: int, pdl: bool = False
) -> torch.Tensor:
    """``(silu(gate) * up) @ w.T`` for a gate/up product ``[M, 2K]`` (gate first): in the Triton
    modes one kernel (the gating in its prologue); otherwise the gating, then :func:`linear`."""
    import torch
    import torch.nn.functional as F

    if mode == TRITON:
        return torch.ops.tracekit.gemv(gate_up, w, pdl, True)
    if mode >= SPLIT_K2:
        parts = torch.ops.tracekit.gemv_splitk(gate_up, w, splits_of(mode), pdl, True)
        return sum_partials(parts).to(gate_up.dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w, mode)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, mode: int, pdl: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of ``x`` and a gate/up weight (gate rows first): with
    :data:`SWIGLU` one Triton kernel, otherwise the product in ``mode``, then the gating."""
    import torch
    import torch.nn.functional as F

    if mode == SWIGLU:
        return torch.ops.tracekit.gemv_swiglu(x, gate_up, pdl)
    gate, up = linear(x, gate_up, mode, pdl).chunk(2, dim=-1)
    return F.silu(gate) * up


def sum_partials(parts: torch.Tensor) -> torch.Tensor:
    """``parts.sum(0)`` for split-K partial products ``[splits, M, N]``, as a chain of adds.

    Compiled, a chain of adds is a pointwise expression that fuses into whatever consumes the
    product (the residual add, SiLU, rotary). A ``sum(0)`` is a reduction over a strided
    dimension of length 2-8: in the decode step inductor made it (with the residual add) a
    reduction kernel of its own that took ~10 us per call on an H200, as long as the product.
    The order of the adds is fixed, so results stay deterministic.
    """
    out = parts[0]
    for i in range(1, parts.shape[0]):
        out = out + parts[i]
    return out


def _nbytes(w: torch.Tensor) -> int:
    return max(1, w.numel() * w.element_size())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` (Frobenius norms, float32): how a kernel is checked against
    its reference before it is used."""
    want_f = want.float()
    return float((got.float() - want_f).norm() / want_f.norm().clamp(min=1e-12))


def hbm_copies(w: torch.Tensor) -> list[torch.Tensor]:
    """``w`` and clones of it, together larger than L2 (up to 256 MB): timing a product over
    them cycles through weights read from HBM, as a decode step reads them."""
    return [w] + [w.clone() for _ in range(min(15, (256 << 20) // _nbytes(w)))]


def time_candidates(
    w: torch.Tensor, runs: dict[Any, Callable[..., Any]], what: str, quiet: bool = False
) -> dict[Any, float]:
    """Milliseconds per product of each candidate ``runs[c](weight)``, launched back to back
    over :func:`hbm_copies` of ``w`` and replayed from a CUDA graph (:func:`_time`), as a
    decode step streams its weights. A candidate that fails (it does not build or capture) is
    left out, logged as a warning (``quiet``: as info) naming ``what``."""
    copies = hbm_copies(w)
    times: dict[Any, float] = {}
    for name, run in runs.items():
        try:
            times[name] = _time(lambda run=run: [run(c) for c in copies]) / len(copies)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is not used
            log = logger.info if quiet else logger.warning
            log("%s: candidate %s not timed (%s)", what, name, exc)
    return times


def decision_key(rows: int, w: torch.Tensor, pdl: bool, role: str = "") -> str:
    """The name of a timed decision in the decisions file: shape, dtype, launch kind and, for
    the fused block products, their role."""
    key = f"{rows}x{w.shape[0]}x{w.shape[1]}:{str(w.dtype).removeprefix('torch.')}"
    return (f"{role}:" if role else "") + key + (":pdl" if pdl else "")


Config = tuple[int, int, int, int, bool]
"""A kernel configuration: (BLOCK_N, BLOCK_K, warps, stages, operands swapped)."""
SPLIT_N_CONFIGS: tuple[Config, ...] = (
    (16, 256, 4, 4, False), (16, 512, 4, 3, False), (32, 256, 4, 4, False),
    (32, 128, 4, 5, False), (64, 128, 4, 4, False),
    (128, 64, 4, 5, True), (128, 128, 4, 5, True), (128, 128, 8, 4, True),
    (64, 64, 4, 5, True), (64, 128, 4, 5, True),
)  # fmt: skip
"""(BLOCK_N, BLOCK_K, warps, stages, swapped) the kernel in one K slice is timed over: thin
slabs of rows, long pipelined loops over K. ``swapped``: the kernel's ``SWAPPED`` form (the
weight tile as the multiply's long side). At 32 rows on an H200 the fastest swapped
configuration beat the fastest unswapped one by 5-18% for each of the four products of a
Llama block (docs/engine.md)."""
SPLIT_K_CONFIGS: tuple[Config, ...] = (
    (16, 256, 4, 3, False), (32, 128, 4, 3, False), (32, 128, 4, 4, False),
    (64, 64, 4, 4, False), (64, 128, 4, 4, False), (64, 512, 4, 3, False),
    (128, 128, 4, 4, False), (128, 256, 8, 3, False),
    (64, 128, 4, 5, True), (64, 256, 4, 3, True), (128, 64, 4, 5, True),
    (64, 128, 4, 3, True), (64, 64, 4, 3, True), (64, 64, 8, 4, True), (64, 128, 8, 4, True),
)  # fmt: skip
"""The same for the split-K kernel: shorter loops. On an H200, timed as a decode step runs
them (chained dependent launches over weights read from HBM), the fastest of the unswapped
ones was up to 10% faster per product than the fastest of the five configurations Triton's
autotuner chose from before, and the ranking differs from one without the overlap: wider
blocks (64-128 rows) gain most from it."""
CONFIG_TAG = f"{zlib.crc32(repr((SPLIT_N_CONFIGS, SPLIT_K_CONFIGS)).encode()):08x}"[:6]
_CONFIGS: dict[tuple[int, int, int, int, bool, str, str], Config] = {}


def kernel_config(
    x: torch.Tensor,
    w: torch.Tensor,
    splits: int,
    pdl: bool,
    kind: str,
    run: Callable[[torch.Tensor, Config], Any],
) -> Config:
    """The kernel's configuration for the product of ``x`` and ``w``: the fastest of
    :data:`SPLIT_N_CONFIGS` / :data:`SPLIT_K_CONFIGS` (those whose K block fits the slice),
    timed once per shape and kept in the decisions file under the lock of :func:`deciding`, so
    every process of a data-parallel run launches the same one.

    ``run(weight, config)`` launches the product with another weight of the same shape. Timing
    as the decode step runs the kernel matters: over copies of the weight larger than L2
    together, back to back, as dependent launches where ``pdl`` (each one's first weight tile
    loads while the one before finishes). Triton's autotuner times each launch alone, and there
    a configuration that gains from the overlap looks slow. Not timed under the CPU interpreter
    (one fixed configuration) nor during a CUDA graph capture (the first usable one, not kept:
    the engine decides its kernels before it captures). ``kind`` (:data:`KINDS`): each
    product the kernel computes is timed and kept apart."""
    key = (x.shape[0], w.shape[0], w.shape[1], splits, pdl, kind, str(w.dtype))
    found = _CONFIGS.get(key)
    if found is not None:  # every launch after the first: nothing else on this path
        return found
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (16, 64, 4, 3, False)
    import torch

    configs = SPLIT_N_CONFIGS if splits == 1 else SPLIT_K_CONFIGS
    k_len = w.shape[1] // splits
    usable = [c for c in configs if c[1] <= k_len] or [min(configs, key=lambda c: c[1])]
    if len(usable) == 1 or torch.cuda.is_current_stream_capturing():
        return usable[0]
    role = f"gemv-k{splits}{'-' if kind else ''}{kind}-{CONFIG_TAG}"
    runs = {configs.index(c): (lambda weight, c=c: run(weight, c)) for c in usable}
    index = fastest_kept(
        decision_key(x.shape[0], w, pdl, role),
        lambda i: i < len(configs) and configs[i] in usable,
        # a configuration may not build on a GPU with less shared memory: quietly skipped
        lambda: time_candidates(w, runs, f"gemv configuration for {key}", quiet=True),
    )
    if index is None:
        return usable[0]
    _CONFIGS[key] = configs[index]
    return configs[index]


def fastest_kept(
    disk_key: str, usable: Callable[[int], bool], time: Callable[[], dict[int, float]]
) -> int | None:
    """The candidate index kept under ``disk_key`` in the decisions file where ``usable``
    accepts it; otherwise the fastest of ``time()`` (milliseconds per candidate index), kept
    there for later processes and runs. Under :func:`deciding`'s lock, so one process of a
    data-parallel run times and the others take its choice. ``None`` when nothing was timed."""
    with deciding([disk_key]) as kept:
        index = kept.get(disk_key)
        if index is not None and usable(index):
            return index
        times = time()
        if not times:
            return None
        index = min(times, key=times.__getitem__)
        save_decisions({disk_key: index})
        return index


def on_side_stream(fn: Any, device: Any = None) -> Any:
    """``fn()`` on a fresh stream ordered after the current stream's work and before its later
    work; returns what ``fn`` returns. How work runs before a CUDA graph capture: compilation,
    autotuning and first allocations happen outside the capture, on a stream other than the
    default one."""
    import torch

    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        out = fn()
    current.wait_stream(stream)
    return out


def capture_graph(graph: Any, device: Any = None, **options: Any) -> Any:
    """``torch.cuda.graph(graph, **options)`` capturing on a side stream of ``device`` (the
    current device by default). Without ``stream``, ``torch.cuda.graph`` captures on one stream
    per process, made on whichever GPU was current at the process's first capture; a later
    capture on another GPU then launches Triton kernels on the wrong device."""
    import torch

    index = torch.cuda.current_device() if device is None else torch.device(device).index
    return torch.cuda.graph(graph, stream=_capture_stream(index), **options)


@functools.cache
def _capture_stream(index: int) -> Any:
    import torch

    return torch.cuda.Stream(device=index)


def _time(fn: Any, reps: int = 10) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph.

    A graph, because that is how the decode step runs them: timed from Python, a custom op's
    launch overhead (tens of microseconds) would hide kernels that take a few.
    """
    import torch

    fn()  # autotuning and library handles, outside the capture
    on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with capture_graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def decisions_file() -> Any:
    """Where decisions are kept across processes and runs: one JSON file per GPU model and
    software versions under tracekit's cache directory."""
    import re

    import torch

    from tracekit.models.embedded import cache_root

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "none"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name())
    return cache_root() / "gemv" / f"{name}-torch{torch.__version__}-triton{triton_version}.json"


def read_decisions() -> dict[str, int]:
    """The decisions on disk now (empty without a readable file: decide again)."""
    import json

    try:
        loaded = json.loads(decisions_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    # linear-layer modes and kernel configuration indices: each reader checks its own range
    return {
        str(k): v for k, v in loaded.items() if isinstance(v, int) and not isinstance(v, bool)
        and 0 <= v < 64
    }  # fmt: skip


@contextlib.contextmanager
def deciding(names: Sequence[str]) -> Iterator[dict[str, int]]:
    """The kept decisions among ``names``, for a block that decides the missing ones by timing
    and keeps them (:func:`save_decisions`). Where one is missing, the block runs under a
    host-wide lock (a file next to the decisions file; re-entrant in a process) and gets them
    re-read once it holds it: processes started together (a data-parallel run) would otherwise
    time the same thing at once and could pick different kernels, and so compute different
    numbers; with it, one times and the others take its decisions. Without a writable cache,
    no lock."""
    from tracekit.storage.atomic import file_lock

    def kept() -> dict[str, int]:
        on_disk = read_decisions()
        return {name: on_disk[name] for name in names if name in on_disk}

    found = kept()
    if len(found) == len(names):
        yield found
        return
    depth = _STATE.get("lock_depth", 0)
    with contextlib.ExitStack() as stack:
        if depth == 0:
            try:
                stack.enter_context(file_lock(decisions_file().with_suffix(".lock")))
            except OSError as exc:
                logger.info("kernel decisions not locked (%s)", exc)
        _STATE["lock_depth"] = depth + 1
        try:
            yield kept()
        finally:
            _STATE["lock_depth"] = depth


def save_decisions(decisions: dict[str, int]) -> None:
    """Add decisions to the file in one write, re-read first: the other processes of a
    data-parallel run may have added theirs since this one started."""
    from tracekit.storage.atomic import write_json

    path = decisions_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**read_decisions(), **decisions})
    except OSError as exc:  # a read-only cache costs only the timing next time
        logger.info("could not keep kernel decisions in %s (%s)", path, exc)


def kept_choice(rows: int, w: torch.Tensor, pdl: bool = False) -> int:
    """:func:`choose`'s decision for ``x @ w.T`` where one is kept (in this process, or on
    disk, checked as :func:`choose` checks it), else ``F.linear``: nothing is timed."""
    key = (rows, w.shape[0], w.shape[1], str(w.dtype) + ("/pdl" if pdl else ""))
    if key in _CHOICES:
        return _CHOICES[key]
    if w.device.type != "cuda" or not w.is_contiguous():
        return LINEAR
    if decision_key(rows, w, pdl, role=f"mode-{CONFIG_TAG}") in read_decisions():
        return choose(rows, w, None, pdl)
    return LINEAR


def choose(rows: int, w: torch.Tensor, force: int | None = None, pdl: bool = False) -> int:
    """How to compute ``x @ w.T`` for ``rows`` rows: the fastest correct of ``F.linear``,
    the transposed product and (up to :data:`MAX_ROWS` rows, bf16/fp16) the Triton kernels.

    ``force`` (a mode) picks that mode whenever it is correct, without timing (tests); where it
    is not (or K does not split), ``F.linear``. :data:`SWIGLU` (a gate/up weight) is only ever
    forced, and checked against the product followed by the gating (:func:`swiglu`).
    Decided once per (rows, N, K, dtype, force) and process; called outside CUDA graph capture.
    Timed decisions are kept on disk (:func:`decisions_file`) and reused, after the same
    correctness check, by later processes on the same kind of GPU: the processes of a
    data-parallel run, and later runs, then pick the same kernels and so compute the same
    numbers, and skip the timing and the building of the kernels they do not use. A decided
    mode that fails its check falls back to ``F.linear`` (delete the file to time again).
    Timing cycles over copies of ``w`` larger than L2 together: decode steps stream weights from
    HBM. A split-K candidate is timed without the sum of its partial products, which the decode
    step fuses into the product's consumer. ``pdl``: the Triton candidates are checked and
    timed as programmatic dependent launches (each one's first weight tile loads while the
    one before finishes, as after the attention kernel in a decode step; cuBLAS cannot launch
    that way); such decisions are kept apart from the others.
    """
    import torch
    import torch.nn.functional as F

    forced = "" if force is None else f"/{MODE_NAMES[force]}"
    key = (rows, w.shape[0], w.shape[1], str(w.dtype) + forced + ("/pdl" if pdl else ""))
    if key in _CHOICES:
        return _CHOICES[key]
    if w.device.type != "cuda" or not w.is_contiguous():
        _CHOICES[key] = LINEAR
        return LINEAR
    x = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device)
    want = F.linear(x, w).float()
    # mode -> (the product as the decode step uses it, what to time)
    candidates: dict[int, tuple[Any, Any]] = {
        LINEAR: (F.linear, F.linear),
        TRANSPOSED: ((lambda a, b: linear(a, b, TRANSPOSED)),) * 2,
    }
    if rows <= MAX_ROWS and w.dtype in (torch.bfloat16, torch.float16):
        gemv = _build()
        if gemv is not None:
            candidates[TRITON] = ((lambda a, b: gemv(a, b, pdl)),) * 2
            for mode in (SPLIT_K2, SPLIT_K4, SPLIT_K8):
                if w.shape[1] % (splits_of(mode) * 64) == 0:
                    partials = torch.ops.tracekit.gemv_splitk
                    candidates[mode] = (
                        lambda a, b, m=mode: linear(a, b, m, pdl),
                        lambda a, b, s=splits_of(mode), op=partials: op(a, b, s, pdl),
                    )
            if force == SWIGLU and w.shape[0] % 2 == 0:  # another function: only when forced
                candidates[SWIGLU] = ((lambda a, b: swiglu(a, b, SWIGLU, pdl)),) * 2
    # the kernels' tag: a decision taken among another version's kernels is taken again
    disk_key = decision_key(rows, w, pdl, role=f"mode-{CONFIG_TAG}")
    if force == SWIGLU:
        wants = {SWIGLU: swiglu(x, w, LINEAR).float()}
        choice = _decide(key, disk_key, candidates, force, x, w, want, wants)
    elif force is not None:
        choice = _decide(key, disk_key, candidates, force, x, w, want)
    else:
        with deciding([disk_key]) as kept:
            choice = _decide(key, disk_key, candidates, kept.get(disk_key), x, w, want)
    _CHOICES[key] = choice
    return choice


def _decide(
    key: tuple[int, int, int, str],
    disk_key: str,
    candidates: dict[int, tuple[Any, Any]],
    settled: int | None,
    x: torch.Tensor,
    w: torch.Tensor,
    want: torch.Tensor,
    wants: dict[int, torch.Tensor] | None = None,
) -> int:
    """:func:`choose`'s check and timing: ``settled`` (forced or on disk) where it is correct,
    else ``F.linear``; without one, the fastest correct candidate, saved to disk. ``wants``:
    the reference of a mode that computes something else than the product (:data:`SWIGLU`)."""
    # a forced or already decided mode is the only one checked: checking a Triton candidate
    # builds and autotunes it, seconds per process that nothing would use
    if settled is not None:
        candidates = {m: c for m, c in candidates.items() if m in (LINEAR, settled)}
    for mode in list(candidates):
        if mode == LINEAR:
            continue
        try:
            err = relative_error(candidates[mode][0](x, w), (wants or {}).get(mode, want))
        except Exception as exc:  # a kernel that does not build must not stop generation
            logger.warning("linear mode %d unavailable for %s (%s)", mode, key, exc)
            err = float("inf")
        if not err <= 1e-2:
            logger.warning("linear mode %d off by %.2e for %s: not used", mode, err, key)
            del candidates[mode]
    if settled is not None:
        return settled if settled in candidates else LINEAR
    runs = {mode: (lambda c, fn=fn: fn(x, c)) for mode, (_, fn) in candidates.items()}
    times = time_candidates(w, runs, f"linear modes for {key}")
    if LINEAR not in times:
        return LINEAR
    best = min(times, key=lambda m: times[m])
    # a faster alternative must beat cuBLAS' default clearly, not by timing noise
    choice = best if times[best] < 0.95 * times[LINEAR] else LINEAR
    _TIMINGS[key] = {MODE_NAMES[m]: 1e3 * t for m, t in times.items()}
    save_decisions({disk_key: choice})
    return choice


def choices() -> dict[tuple[int, int, int, str], int]:
    """The decisions made so far (for benchmarks and logs)."""
    return dict(_CHOICES)


def timings() -> dict[tuple[int, int, int, str], dict[str, float]]:
    """Microseconds per product per candidate, for the shapes timed so far."""
    return dict(_TIMINGS)
