"""Differences between transformers versions that tracekit's forward calls depend on.

transformers 5.2x renamed the KV-cache argument and output field of causal LMs from
``past_key_values`` to ``cache`` (the old names warn, and are announced to go in 5.40); earlier
versions know only ``past_key_values``. These helpers use whichever the installed model takes.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes the KV cache by: ``cache`` or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name (``None`` without one)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
