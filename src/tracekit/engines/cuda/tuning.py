"""Step tuning: the linear layers' kernels re-decided by timing whole captured decode steps.

The per-shape choice (:func:`tracekit.engines.cuda.ops.gemv.choose`) times each product alone,
back to back. Inside the step a product follows other kernels: with programmatic dependent
launch a Triton product loads its first weight tiles while the kernel before it finishes,
cuBLAS cannot; on an H200 at batch 32 the ``o`` product timed alone picked cuBLAS, and four K
slices made the whole step 5% faster (docs/engine.md). The first step captured at a batch
size tries the candidates of :data:`TUNED_ROLES` one layer at a time and keeps the fastest
correct one; the decisions go to the decisions file, so this happens once per GPU and shape.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from tracekit.engines.batching import is_out_of_memory as is_oom
from tracekit.engines.cuda.ops import gemv as ops_gemv
from tracekit.engines.cuda.plan import GEMV_ROLES, GemvChoice, mode_fits

if TYPE_CHECKING:
    from tracekit.engines.cuda.decoder import FastDecoder
    from tracekit.engines.cuda.runner import Runner

logger = logging.getLogger(__name__)

TUNED_ROLES = ("o", "qkv", "down", "gate_up")
"""The linear layers whose kernel step tuning (``DecoderPlan(tune_steps=...)``) re-decides
by timing whole decode steps, in this order: those that follow the step's small kernels, where
a product timed alone (:func:`tracekit.engines.cuda.ops.gemv.choose`) and the same product
inside the step differ most, then ``gate_up`` for its one candidate (:data:`ROLE_CANDIDATES`).
The head is long enough for the timing alone."""

ROLE_CANDIDATES: dict[str, tuple[int, ...]] = {"gate_up": (ops_gemv.SWIGLU,)}
"""Step tuning's candidates per layer where not :data:`ops.gemv.TUNED_MODES`: ``gate_up``
tries only the kernel that computes ``silu(gate) * up`` itself (no SiLU kernel after it);
its plain Triton modes were never faster than cuBLAS in whole steps."""

STEP_TUNING_MARGIN = 0.01
"""A step-tuning candidate must beat the best step so far by this fraction (not by noise)."""


def modes_label(gemv: GemvChoice) -> str:
    """``qkv=linear o=splitk4 ...``: a step's linear-layer kernels, for logs and benchmarks."""
    return " ".join(f"{r}={ops_gemv.MODE_NAMES[getattr(gemv, r)]}" for r in GEMV_ROLES)


class StepTuner:
    """The step-tuning decisions of one decoder, per batch size (this process, else the
    decisions file)."""

    def __init__(self, dec: FastDecoder) -> None:
        self.dec = dec
        self._modes: dict[int, dict[str, int]] = {}
        self.timings: dict[int, dict[str, float]] = {}
        """Per batch size tuned here: microseconds per decode step of each candidate timed."""

    def roles(self) -> list[str]:
        """The layers step tuning decides: :data:`TUNED_ROLES` not pinned by the plan."""
        w = self.dec.weights[0]
        pinned = self.dec.plan.pinned
        # gate_up's one candidate gates with SiLU: only for architectures that do
        skip = () if self.dec.arch.swiglu else ("gate_up",)
        return [
            r
            for r in TUNED_ROLES
            if r not in pinned and r not in skip and getattr(w, r, None) is not None
        ]

    def _key(self, role: str, batch: int) -> str:
        dec = self.dec
        weight = getattr(dec.weights[0], role)
        # the kernels' tag: step tuning among another version's kernels is done again
        layers = len(dec.weights)
        role_tag = f"step-{role}-{layers}L-{ops_gemv.CONFIG_TAG}"
        return ops_gemv.decision_key(batch, weight, bool(dec.plan.pdl), role=role_tag)

    def modes(self, batch: int) -> dict[str, int]:
        """The kernels step tuning chose for ``batch`` rows; the layers not tuned yet are
        missing (all of them before the first tuning)."""
        if batch not in self._modes:
            self._keep(batch, ops_gemv.read_decisions())
        return self._modes.get(batch, {})

    def _keep(self, batch: int, decisions: dict[str, int]) -> bool:
        """Take ``batch``'s step-tuning decisions from ``decisions``; whether all are there (a
        decisions file from a version that tuned fewer layers has only some)."""
        roles = self.roles()
        keys = {role: self._key(role, batch) for role in roles}
        found = {
            role: int(decisions[key])
            for role, key in keys.items()
            if decisions.get(key, -1) in range(len(ops_gemv.MODE_NAMES))
            and mode_fits(role, decisions[key])
        }
        self._modes[batch] = found
        return len(found) == len(roles)

    def tune_once(self, runner: Runner) -> None:
        """Step tuning at ``runner``'s batch size of the layers not decided already (here or on
        disk). One process per host tunes at a time; one that waited takes the decision made."""
        batch = runner.key.batch
        if len(self.modes(batch)) == len(self.roles()):
            return
        setup = self.dec.setup_parts
        started = time.perf_counter()
        keys = [self._key(role, batch) for role in self.roles()]
        try:
            with ops_gemv.deciding(keys) as kept:
                # what another process decided meanwhile (all, or some layers): the step runs
                # it before anything is timed, and _tune leaves those layers as they are
                complete = self._keep(batch, kept)
                decided = runner.dims.gemv
                self._use(runner, self.dec.gemv_choice(batch))
                if runner.dims.gemv != decided:
                    runner.capture()
                if complete:
                    return
                logger.warning(
                    "timing the decode step's kernels at batch %d, once for this GPU "
                    "(a minute or two; kept in %s; TRACEKIT_STEP_TUNING=0 skips it)",
                    batch,
                    ops_gemv.decisions_file(),
                )
                self._tune(runner)
        finally:
            setup["step_tuning"] += time.perf_counter() - started

    def _use(self, runner: Runner, gemv: GemvChoice) -> None:
        """Run ``runner``'s step with ``gemv``'s kernels (the attention kernel's use re-decided
        for its q/k/v mode); the caller captures again."""
        key = runner.key
        runner.set_step(*self.dec.step_dims(key, gemv, runner.dims.block))

    def _tune(self, runner: Runner) -> None:
        """Re-decide the kernels of :data:`TUNED_ROLES` (those not decided before) for
        ``runner``'s batch size by timing whole captured decode steps, one layer at a time (each
        keeps the fastest of its correct modes before the next is tried), and keep the
        decisions on disk. Each candidate is compiled and captured (seconds each, more where
        its Triton kernel is autotuned first) and timed over replays of the captured step.
        Leaves ``runner`` with the fastest step captured."""
        batch = runner.key.batch
        best, best_graph = runner.dims.gemv, runner.graph
        best_time = runner.time_steps()
        timings = {modes_label(best): 1e6 * best_time}
        decided = self._modes.get(batch, {})
        for role in self.roles():
            if role in decided:  # kept from an earlier tuning: the step already runs it
                continue
            weight = getattr(self.dec.weights[0], role)
            tried = {getattr(best, role)}
            for mode in ROLE_CANDIDATES.get(role, ops_gemv.TUNED_MODES):
                if mode in tried:
                    continue
                got = ops_gemv.choose(batch, weight, mode)
                if got in tried:  # not correct here, or K does not split: F.linear
                    continue
                tried.add(got)
                fields: dict[str, Any] = {role: got}
                candidate = best._replace(**fields)
                self._use(runner, candidate)
                try:
                    runner.capture()
                except Exception as exc:  # a candidate that cannot run is not used
                    if is_oom(exc):
                        raise
                    logger.info("step tuning: %s not used (%s)", modes_label(candidate), exc)
                    continue
                seconds = runner.time_steps()
                timings[modes_label(candidate)] = 1e6 * seconds
                if seconds < best_time * (1 - STEP_TUNING_MARGIN):
                    best, best_graph, best_time = candidate, runner.graph, seconds
        self._use(runner, best)
        runner.graph = best_graph
        runner.reset_dummy()
        self._modes[batch] = {r: getattr(best, r) for r in self.roles()}
        self.timings[batch] = timings
        ops_gemv.save_decisions(
            {self._key(role, batch): mode for role, mode in self._modes[batch].items()}
        )
        logger.info("step tuning at batch %d: %s (%.0f us per step)", batch,
                    modes_label(best), 1e6 * best_time)  # fmt: skip
