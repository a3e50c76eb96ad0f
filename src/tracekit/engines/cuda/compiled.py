"""``torch.compile`` of the step functions: one wrapper per function and setting per process.

Compiled with ``dynamic=False``, ``fullgraph=True`` and no inductor cudagraphs (the runner
captures the whole step itself, so buffers the step mutates never make inductor skip it).
"""

from __future__ import annotations

import functools
from typing import Any

_COMPILED: dict[str, Any] = {}


@functools.cache
def persistent_choices() -> Any:
    """The inductor heuristics class of the compiled step
    (:class:`~tracekit.engines.cuda.inductor_choices.PersistentRows`), under which its row
    reductions are one-pass kernels. A decode step's norms add the residual (and the split-K
    partials of the product before them) to rows of the hidden size (2048 for Llama-3.2-1B,
    past inductor's limit of 1024): on an H200 the one-pass form made the step ~3% faster at
    batch 8 and 32. ``None`` where this torch lacks the hook."""
    try:
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "inductor_choices_class"):
            from tracekit.engines.cuda.inductor_choices import PersistentRows

            return PersistentRows
    except ImportError:  # pragma: no cover - an older torch
        pass
    return None


def compiled(name: str, fn: Any, pdl: bool = False) -> Any:
    """One ``torch.compile`` wrapper per function (and ``pdl`` setting) per process, so runners
    share its cache; the step's norms as one-pass kernels (:func:`persistent_choices`).
    ``pdl``: inductor's kernels use programmatic dependent launch too."""
    import torch

    choices = persistent_choices()
    key = name + ("/pdl" if pdl else "") + ("/persistent" if choices else "")
    if key not in _COMPILED:
        dyn = torch._dynamo.config
        # one compilation per (batch, cache length, capture on/off): raise the recompile cap
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(dyn, attr):
                setattr(dyn, attr, max(getattr(dyn, attr), 256))
        if hasattr(dyn, "accumulated_recompile_limit"):
            dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 4096)
        elif hasattr(dyn, "accumulated_cache_size_limit"):
            dyn.accumulated_cache_size_limit = max(dyn.accumulated_cache_size_limit, 4096)
        # inductor's own kernels too, where this torch has the option (added in 2.10)
        import torch._inductor.config as inductor_config

        options: dict[str, Any] = {}
        if pdl and hasattr(inductor_config.triton, "enable_pdl"):
            options["triton.enable_pdl"] = True
        if choices is not None:  # in the cache key; and in force while compiling (below)
            options["inductor_choices_class"] = choices
        wrapper = torch.compile(fn, dynamic=False, fullgraph=True, options=options or None)
        _COMPILED[key] = wrapper if choices is None else under_choices(wrapper, choices)
    return _COMPILED[key]


def under_choices(wrapper: Any, choices: Any) -> Any:
    """``wrapper`` (a compiled function) called with inductor's heuristics set to
    ``choices()``: inductor reads ``inductor_choices_class`` once per thread, so an earlier
    compilation in this thread (tracekit's or the caller's) would otherwise have fixed the
    default ones. Only
    compilations see the setting; a compiled call is unchanged."""
    from torch._inductor.virtualized import V

    instance = choices()

    def call(*args: Any, **kwargs: Any) -> Any:
        with V.set_choices_handler(instance):
            return wrapper(*args, **kwargs)

    return call


_COMPILED_DYNAMIC: dict[str, Any] = {}


def compiled_dynamic(name: str, fn: Any) -> Any:
    """``fn`` compiled once per process for the blocks over whole sequences, whose batch and
    length vary (the engine's prefill, the teacher-forced forward): the dimensions the caller
    marks (``torch._dynamo.maybe_mark_dynamic``) are dynamic, everything else static. Under
    ``dynamic=None`` a second model with other head counts recompiled the block with the counts
    symbolic, and on CUDA ``scaled_dot_product_attention`` rejected ``enable_gqa`` as a
    symbolic bool (a Mistral-7B-shaped model, then a Qwen2.5-7B-shaped one); now each model
    shape compiles its own graph."""
    import torch

    if name not in _COMPILED_DYNAMIC:
        _COMPILED_DYNAMIC[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED_DYNAMIC[name]
