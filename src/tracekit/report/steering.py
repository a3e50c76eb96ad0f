"""``tracekit.steering_report``: the dose-response of a steering sweep, with its random control.

Reads the output sets that ``generate --steer-vector ... --steer-coef LIST`` wrote under
``<EXP>/<TRAIT>/steering/L<layer>/{vector,random}/coef<c>/`` and summarizes, per direction and
coefficient, each metric over the set's rows (every responses CSV of the set):

- the judge's ``trait_score`` and ``coherence_score`` when the rows were judged: mean, 95%
  interval, rows scored and rows whose judgment failed (empty score);
- an independent measure (``measure``): a numeric column of the CSVs (``n_tokens``), or
  ``words:FILE``, the fraction of a response's words found in a word list (one word a line).

The interval is Student's t: ``mean +- t(0.975, n-1) * sd / sqrt(n)`` (none for n < 2). The
random control's coefficient 0 is the vector's (the same unsteered run; generate runs it once).
The PNG draws one panel per metric, the vector's curve and the control's on the same axes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracekit.config.report import SteeringReportConfig
from tracekit.engines.steering import STEERING_DIR
from tracekit.errors import InputError
from tracekit.storage import experiment as store
from tracekit.storage.atomic import check_writable
from tracekit.storage.experiment import TraitPaths
from tracekit.vectors.mean_diff import _score  # a score cell as a number, empty -> None

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

JUDGE_METRICS = ("trait_score", "coherence_score")
_WORD = re.compile(r"[^\W\d_]+")
"""A word: a run of letters (an apostrophe splits, so "l'heure" is "l" and "heure")."""


@dataclass
class MetricSummary:
    mean: float | None
    low: float | None
    high: float | None
    n: int
    failed: int = 0
    """Rows without a value (a failed or low-mass judgment; a non-numeric cell)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "ci95": [self.low, self.high],
            "n": self.n,
            "failed": self.failed,
        }


@dataclass
class SweepPoint:
    direction: str
    coef: float
    rows: int
    metrics: dict[str, MetricSummary]
    root: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "coef": self.coef,
            "rows": self.rows,
            "dir": str(self.root),
            **{m: s.to_dict() for m, s in self.metrics.items()},
        }


@dataclass
class SteeringReport:
    trait: str
    layer: int
    metrics: list[str]
    points: list[SweepPoint]
    steering: dict[str, Any]
    """The vector's steering settings (file hash, positions, control seed, norm)."""
    png: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trait": self.trait,
            "layer": self.layer,
            "metrics": self.metrics,
            "steering": self.steering,
            "points": [p.to_dict() for p in self.points],
            "png": str(self.png) if self.png is not None else None,
            "notes": self.notes,
        }


def summarize(values: Sequence[float | None]) -> MetricSummary:
    """Mean and Student-t 95% interval of the values that are not None."""
    present = [v for v in values if v is not None]
    failed = len(values) - len(present)
    n = len(present)
    if n == 0:
        return MetricSummary(None, None, None, 0, failed)
    mean = math.fsum(present) / n
    if n < 2:
        return MetricSummary(mean, None, None, n, failed)
    from scipy.stats import t

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return MetricSummary(mean, mean - half, mean + half, n, failed)


def word_fraction(text: str, words: frozenset[str]) -> float | None:
    """The fraction of ``text``'s words that are in ``words`` (None for a text without words)."""
    found = [w.lower() for w in _WORD.findall(text)]
    if not found:
        return None
    return sum(w in words for w in found) / len(found)


def read_word_list(path: Path) -> frozenset[str]:
    if not path.is_file():
        raise InputError(f"--measure: word list not found: {path}", "one word a line")
    words = frozenset(
        line.strip().lower()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    if not words:
        raise InputError(f"--measure: word list {path} is empty", "one word a line")
    return words


def measure_function(measure: str) -> tuple[str, Callable[[dict[str, Any]], float | None]]:
    """The measure's name (its column in tables) and the function of a row that computes it."""
    if measure.startswith("words:"):
        path = Path(measure.removeprefix("words:"))
        words = read_word_list(path)
        return f"words:{path.stem}", lambda row: word_fraction(str(row.get("response", "")), words)
    return measure, lambda row: _score(row.get(measure))


def _sets(root: Path) -> list[tuple[str, float, Path, dict[str, Any]]]:
    """(direction, coef, folder, steering metadata) of every finished set under ``root``."""
    found = []
    for meta_file in sorted(root.glob("*/coef*/metadata.json")):
        try:
            steering = json.loads(meta_file.read_text(encoding="utf-8")).get("steering") or {}
        except (OSError, ValueError):
            raise InputError(f"{meta_file} is unreadable", "re-run the steered generate") from None
        if "coef" in steering and "direction" in steering:
            found.append(
                (str(steering["direction"]), float(steering["coef"]), meta_file.parent, steering)
            )
    return found


def _layer_root(config: SteeringReportConfig) -> tuple[int, Path]:
    base = TraitPaths.of(config.experiments_dir, config.experiment, config.trait).root
    sweeps = base / STEERING_DIR
    layers = sorted(
        int(p.name[1:]) for p in sweeps.glob("L*") if p.is_dir() and p.name[1:].isdigit()
    )
    if not layers:
        raise InputError(
            f"no steering sweep under {sweeps}",
            "run 'tracekit generate --steer-vector FILE --steer-layer L --steer-coef LIST' first",
        )
    if config.layer is None:
        if len(layers) > 1:
            raise InputError(
                f"{sweeps} holds sweeps at layers {', '.join(map(str, layers))}",
                "pick one with --layer",
            )
        return layers[0], sweeps / f"L{layers[0]}"
    if config.layer not in layers:
        raise InputError(
            f"no steering sweep at layer {config.layer} under {sweeps} "
            f"(layers: {', '.join(map(str, layers))})"
        )
    return config.layer, sweeps / f"L{config.layer}"


def steering_report(config: SteeringReportConfig) -> SteeringReport:
    """The dose-response table (and PNG) of one trait's sweep; see the module docstring."""
    layer, root = _layer_root(config)
    sets = _sets(root)
    if not sets:
        raise InputError(f"no finished steered set under {root}", "run the steered generate")
    png = config.output or root / "dose_response.png"
    if config.plot:
        check_writable([png], config.force)
    measure = measure_function(config.measure) if config.measure else None

    loaded_rows = {}
    for direction, coef, folder, _ in sets:
        rows: list[dict[str, Any]] = []
        pattern = "*.csv" if config.polarity == "all" else f"{config.polarity}.csv"
        for csv_path in sorted((folder / "responses").glob(pattern)):
            rows += store.read_responses_csv(csv_path, ("response",))
        loaded_rows[(direction, coef)] = (folder, rows)
    all_rows = [r for _, rows in loaded_rows.values() for r in rows]
    if not all_rows:
        which = "" if config.polarity == "all" else f"{config.polarity} "
        raise InputError(
            f"the sets under {root} have no {which}rows",
            "a steered set holds neutral.csv (--steer-prompts neutral) or pos.csv and neg.csv",
        )
    metrics = [m for m in JUDGE_METRICS if any(m in r for r in all_rows)]
    if measure is not None:
        metrics.append(measure[0])
    if not metrics:
        raise InputError(
            f"the sets under {root} have no judge scores",
            "judge them (generate --judge-model, or 'tracekit judge --input' each CSV) or pass "
            "--measure (a numeric column such as n_tokens, or words:FILE)",
        )

    points = []
    for (direction, coef), (folder, rows) in sorted(
        loaded_rows.items(), key=lambda item: (item[0][0] != "vector", item[0][1])
    ):
        summaries = {}
        for metric in metrics:
            if measure is not None and metric == measure[0]:
                values = [measure[1](r) for r in rows]
            else:
                values = [_score(r.get(metric)) for r in rows]
            summaries[metric] = summarize(values)
        points.append(SweepPoint(direction, coef, len(rows), summaries, folder))
    vector_meta = next((s for d, _, _, s in sets if d == "vector"), sets[0][3])
    steering = {
        k: vector_meta.get(k) for k in ("vector_file", "vector_sha256", "positions", "norm")
    }
    steering["control_seed"] = next(
        (s.get("control_seed") for d, _, _, s in sets if d != "vector"), None
    )
    report = SteeringReport(config.trait, layer, metrics, points, steering)
    if any(p.direction == "random" for p in points) and not any(
        p.direction == "random" and p.coef == 0 for p in points
    ):
        report.notes.append("the random control's coefficient 0 is the vector's (one run)")
    if config.plot:
        plot_png(report, png)
        report.png = png
    return report


def control_curve(report: SteeringReport) -> list[SweepPoint]:
    """The random control's points, with the vector's coefficient 0 where it has none."""
    points = [p for p in report.points if p.direction == "random"]
    if points and not any(p.coef == 0 for p in points):
        points += [p for p in report.points if p.direction == "vector" and p.coef == 0]
    return sorted(points, key=lambda p: p.coef)


def plot_png(report: SteeringReport, path: Path) -> None:
    """One panel per metric: mean and 95% interval against the coefficient, vector and control."""
    from tracekit.plots import png_figure

    curves = {
        "vector": sorted(
            (p for p in report.points if p.direction == "vector"), key=lambda p: p.coef
        ),
        "random control": control_curve(report),
    }
    n = len(report.metrics)
    with png_figure(path, 1, n, figsize=(4.2 * n, 3.6)) as (figure, axes):
        for ax, metric in zip(axes if n > 1 else [axes], report.metrics, strict=True):
            for (label, points), style in zip(curves.items(), ("o-", "s--"), strict=True):
                shown = [p for p in points if p.metrics[metric].mean is not None]
                if not shown:
                    continue
                y, low, high = [], [], []
                for point in shown:
                    summary = point.metrics[metric]
                    mean = summary.mean if summary.mean is not None else math.nan
                    y.append(mean)
                    low.append(mean - summary.low if summary.low is not None else 0.0)
                    high.append(summary.high - mean if summary.high is not None else 0.0)
                x = [p.coef for p in shown]
                ax.errorbar(x, y, yerr=[low, high], fmt=style, capsize=3, label=label)
            ax.set_xlabel("steering coefficient")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figure.suptitle(
            f"{report.trait}: steering at layer {report.layer} (mean, 95% CI)", fontsize=11
        )
