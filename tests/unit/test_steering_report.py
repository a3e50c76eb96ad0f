"""`tracekit report steering` against a hand computation, on sweep folders written by hand."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from tracekit.report.steering import SteeringReportConfig, steering_report, word_fraction
from tracekit.storage.experiment import write_responses_csv

ROWS = {
    # (direction, coef): [(trait_score, coherence_score, response), ...]
    ("vector", -2.0): [("10", "90", "a b"), ("20", "80", "le chat"), ("", "70", "x")],
    ("vector", 0.0): [("40", "90", "hello there"), ("50", "85", "de la")],
    ("vector", 2.0): [("80", "60", "le la les"), ("90", "50", "bonjour et"), ("70", "", "y z")],
    ("random", -2.0): [("40", "88", "yes"), ("45", "86", "no")],
    ("random", 2.0): [("55", "84", "oui"), ("50", "82", "non")],
}


def _write_sweep(root, layer=12):
    for (direction, coef), rows in ROWS.items():
        folder = root / "e" / "t" / "steering" / f"L{layer}" / direction / f"coef{coef:+g}"
        write_responses_csv(
            folder / "responses" / "neutral.csv",
            [
                {
                    "id": i,
                    "question": "q",
                    "instruction": "",
                    "prompt": "p",
                    "response": response,
                    "finish_reason": "eos",
                    "n_tokens": len(response.split()),
                    "trait_score": trait,
                    "coherence_score": coherence,
                }
                for i, (trait, coherence, response) in enumerate(rows)
            ],
        )
        steering = {"direction": direction, "coef": coef, "layer": layer, "positions": "response"}
        (folder / "metadata.json").write_text(json.dumps({"steering": steering}))


def _interval(values):
    values = np.array(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def test_report_matches_a_hand_computation(tmp_path):
    _write_sweep(tmp_path)
    words = tmp_path / "fr.txt"
    words.write_text("# French\nle\nla\nles\nde\net\n")
    report = steering_report(
        SteeringReportConfig(
            experiment="e", trait="t", experiments_dir=tmp_path, measure=f"words:{words}"
        )
    )
    assert report.layer == 12
    assert report.metrics == ["trait_score", "coherence_score", "words:fr"]
    points = {(p.direction, p.coef): p for p in report.points}
    assert list(points) == [
        ("vector", -2.0),
        ("vector", 0.0),
        ("vector", 2.0),
        ("random", -2.0),
        ("random", 2.0),
    ]
    for key, rows in ROWS.items():
        point = points[key]
        assert point.rows == len(rows)
        for metric, column in (("trait_score", 0), ("coherence_score", 1)):
            present = [float(r[column]) for r in rows if r[column]]
            mean, low, high = _interval(present)
            summary = point.metrics[metric]
            assert (summary.n, summary.failed) == (len(present), len(rows) - len(present))
            assert summary.mean == pytest.approx(mean, rel=1e-12)
            assert summary.low == pytest.approx(low, rel=1e-12)
            assert summary.high == pytest.approx(high, rel=1e-12)
    # words: vector +2 -> 'le la les' 3/3, 'bonjour et' 1/2, 'y z' 0/2
    french = points[("vector", 2.0)].metrics["words:fr"]
    assert french.mean == pytest.approx((1.0 + 0.5 + 0.0) / 3, rel=1e-12)
    assert report.png is not None and report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.notes == ["the random control's coefficient 0 is the vector's (one run)"]


def test_word_fraction_splits_on_apostrophes_and_ignores_case():
    words = frozenset({"l", "heure", "est"})
    assert word_fraction("L'heure EST 3", words) == 1.0
    assert word_fraction("It's the hour", words) == 0.0
    assert word_fraction("42 !", words) is None


def test_report_cli_json_and_errors(cli, tmp_path):
    _write_sweep(tmp_path)
    _write_sweep(tmp_path, layer=5)
    both = cli("report", "steering", "--experiments-dir", tmp_path, "--experiment", "e",
               "--trait", "t")  # fmt: skip
    assert both.exit_code == 1
    assert "layers 5, 12" in both.output and "--layer" in both.output
    base = ["report", "steering", "--experiments-dir", tmp_path, "--experiment", "e"]
    ok = cli(*base, "--trait", "t", "--layer", 5, "--measure", "n_tokens", "--no-plot", "--json")
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["metrics"] == ["trait_score", "coherence_score", "n_tokens"]
    first = data["points"][0]
    assert (first["direction"], first["coef"], first["n_tokens"]["mean"]) == ("vector", -2.0, 5 / 3)
    assert not (tmp_path / "e/t/steering/L5/dose_response.png").exists()
    cli("report", "steering", "--experiments-dir", tmp_path, "--experiment", "e", "--trait", "t",
        "--layer", 5)  # fmt: skip
    again = cli("report", "steering", "--experiments-dir", tmp_path, "--experiment", "e",
                "--trait", "t", "--layer", 5)  # fmt: skip
    assert again.exit_code != 0 and "--force" in again.output
    missing = cli("report", "steering", "--experiments-dir", tmp_path, "--experiment", "e",
                  "--trait", "nope")  # fmt: skip
    assert missing.exit_code == 1 and "no steering sweep" in missing.output


def test_report_reads_one_polarity_when_asked(cli, tmp_path):
    _write_sweep(tmp_path)
    base = ["report", "steering", "--experiments-dir", tmp_path, "--experiment", "e"]
    neutral = cli(*base, "--trait", "t", "--polarity", "neutral", "--no-plot", "--json")
    assert neutral.exit_code == 0, neutral.output
    assert json.loads(neutral.stdout)["points"][0]["rows"] == 3
    pos = cli(*base, "--trait", "t", "--polarity", "pos", "--no-plot")
    assert pos.exit_code == 1
    assert "have no pos rows" in " ".join(pos.output.split())
