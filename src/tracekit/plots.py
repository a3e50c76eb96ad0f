"""PNG figures for reports: matplotlib's object API rendered by Agg (no display, no pyplot
global state, so a notebook's backend is left alone), imported only when a figure is drawn,
and written atomically like every other output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tracekit.storage.atomic import atomic_open


@contextmanager
def png_figure(path: Path, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> Iterator[Any]:
    """Yield ``(figure, axes)`` of a new figure (``kwargs`` go to ``Figure``, e.g.
    ``figsize``); when the block ends without an error it is saved to ``path`` as PNG,
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=True)
    yield figure, axes
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
