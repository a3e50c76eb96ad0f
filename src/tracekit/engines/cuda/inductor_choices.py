"""Inductor heuristics for the compiled decode step (imported only when a step is compiled).

A module of its own, so that the class is importable by name: inductor puts it in the key of
its compiled-graph cache, by ``uuid()`` where torch asks for one and by pickling (a reference
to this module) where it does not; a class defined inside a function cannot be pickled and
would turn that cache off.
"""

from __future__ import annotations

from typing import Any

import torch._inductor.config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

PERSISTENT_REDUCTION_MAX = 4096
"""Row reductions (the RMSNorms) up to this length are one-pass ("persistent") kernels;
inductor's own limit is 1024."""


class PersistentRows(InductorChoices):
    """Inductor's heuristics, except that row reductions of up to
    :data:`PERSISTENT_REDUCTION_MAX` elements are persistent: the row is loaded once and kept
    in registers, instead of one loop over it for the sum of squares and a second to scale it."""

    def uuid(self) -> str:
        """This class's part of inductor's cache key."""
        return f"tracekit-persistent-rows-{PERSISTENT_REDUCTION_MAX}"

    @staticmethod
    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(
                features.reduction_numel, PERSISTENT_REDUCTION_MAX
            )
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)
