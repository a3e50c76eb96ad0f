"""`tracekit extract vectors` on synthetic experiments (no model): the judge filter as
persona_vectors applies it, and which rule the summary reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tolerance import assert_close_to_scale


def _flat(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def write_experiment(base, acts, trait_scores=None, coherence=None, layers=None):
    """Experiment ``e``, trait ``t`` under ``base`` with pos/neg activations ``acts`` (rows in
    id order) and optional per-row score columns ('' = an empty cell)."""
    from tracekit.storage.atomic import write_json
    from tracekit.storage.experiment import TraitPaths, save_activations, write_responses_csv

    paths = TraitPaths.of(base, "e", "t")
    for polarity in ("pos", "neg"):
        n = len(acts[polarity])
        rows = []
        for i in range(n):
            row = {"id": i, "question": f"q{i}", "prompt": "p", "response": "r"}
            if trait_scores is not None:
                row["trait_score"] = trait_scores[polarity][i]
            if coherence is not None:
                row["coherence_score"] = coherence[polarity][i]
            rows.append(row)
        write_responses_csv(paths.responses_csv(polarity), rows)
        save_activations(paths, polarity, list(range(n)), {"response_avg": acts[polarity]})
    if layers is not None:
        write_json(
            paths.activations_metadata,
            {"model": "m", "poolings": {"response_avg": {"layers": layers, "source": "test"}}},
        )
    return paths


def test_a_neg_row_without_a_coherence_score_drops_its_pair(tmp_path, cli):
    rng = np.random.default_rng(0)
    acts = {"pos": rng.normal(size=(3, 2, 8)), "neg": rng.normal(size=(3, 2, 8))}
    paths = write_experiment(
        tmp_path, acts,
        trait_scores={"pos": [90, 90, 90], "neg": [10, 10, 10]},
        coherence={"pos": [80, 80, 80], "neg": [80, "", 80]},
    )  # fmt: skip
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t",
                 "--experiments-dir", tmp_path, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_pairs"] == 2
    assert summary["dropped"] == {"no coherence score": 1}
    vectors = np.load(paths.vectors_dir / "mean_diff_response_avg.npy")
    assert_close_to_scale(vectors, acts["pos"][[0, 2]].mean(0) - acts["neg"][[0, 2]].mean(0))


@pytest.mark.parametrize(
    ("neg_rule", "kept", "limit"),
    [(None, [0, 3], "neg trait < 40 (neg rule mirrored"), ("same", [0, 1, 3], "neg trait < 60")],
)
def test_neg_rule_mirrored_by_default_and_same_on_request(tmp_path, cli, neg_rule, kept, limit):
    """At --threshold 60 persona_vectors keeps neg < 40; the 'same' rule keeps neg < 60."""
    rng = np.random.default_rng(1)
    acts = {"pos": rng.normal(size=(4, 2, 8)), "neg": rng.normal(size=(4, 2, 8))}
    # id 1: neg 45 (between the two limits); id 2: pos 55 fails either way
    paths = write_experiment(
        tmp_path, acts, trait_scores={"pos": [90, 70, 55, 61], "neg": [10, 45, 5, 39.9]}
    )
    args = ["--neg-rule", neg_rule] if neg_rule else []
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t", "--threshold", "60",
                 "--experiments-dir", tmp_path, *args)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(kept)} pairs" in _flat(result)
    assert f"judge filter: pos trait >= 60, {limit}" in " ".join(result.stderr.split())
    meta = json.loads((paths.vectors_dir / "mean_diff_response_avg_metadata.json").read_text())
    assert meta["pair_ids"] == kept
    assert meta["neg_rule"] == (neg_rule or "mirrored")
    assert "no coherence filter" in meta["judge_filter"]


def test_select_pairs_matches_persona_vectors_mask():
    """The same pairs as generate_vec.py's pandas mask (pos >= T, neg < 100 - T, coherence >=
    50 on both sides; an empty cell compares False) on random judged rows."""
    from tracekit.vectors.mean_diff import select_pairs

    rng = np.random.default_rng(2)
    n, threshold = 200, 65.0
    table = {
        key: np.where(rng.random(n) < 0.1, np.nan, rng.uniform(0, 100, n))
        for key in ("pos_t", "neg_t", "pos_c", "neg_c")
    }

    def rows(side):
        return [
            {"id": i, "trait_score": "" if np.isnan(t) else t,
             "coherence_score": "" if np.isnan(c) else c}
            for i, (t, c) in enumerate(zip(table[f"{side}_t"], table[f"{side}_c"], strict=True))
        ]  # fmt: skip

    with np.errstate(invalid="ignore"):
        mask = (
            (table["pos_t"] >= threshold)
            & (table["neg_t"] < 100 - threshold)
            & (table["pos_c"] >= 50)
            & (table["neg_c"] >= 50)
        )
    ids, rule, _ = select_pairs(rows("pos"), rows("neg"), threshold, 50.0)
    assert ids == np.flatnonzero(mask).tolist() and len(ids) > 3
    assert rule is not None and "neg trait < 35" in rule
