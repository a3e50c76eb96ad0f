"""Data-parallel `generate`, `extract activations` and `log`: 2 processes (torchrun, gloo on CPU)
on the embedded model merge into the same outputs a single-process run writes, and lost or
leftover shards resume."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tolerance import assert_close_to_scale

pytestmark = pytest.mark.integration

N = 4  # rows per polarity in batches of 2: ids 0, 1 go to rank 0 and 2, 3 to rank 1
COMMON = [
    "generate", "--trait", "refusal", "--n-examples", str(N), "--max-new-tokens", "6",
    "--temperature", "0", "--layers", "0,5,30", "--pooling", "response_avg,prompt_last",
    "--batch-size", "2", "--device", "cpu", "--no-generation-cache",
]  # fmt: skip
POOLINGS = ("response_avg", "prompt_last")
# each process runs the single run's batches (blocks cut at batch multiples), so the numbers
# match up to reduction order (threads per process): tests/tolerance.py


def _run_two_processes(base: Path, experiment: str) -> dict:
    command = [sys.executable, "-m", "tracekit", *COMMON, "--experiment", experiment]
    command += ["--experiments-dir", str(base), "--num-processes", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-8000:]
    return json.loads(done.stdout)


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_same_outputs(single: Path, multi: Path) -> None:
    for polarity in ("pos", "neg"):
        csv_single = (single / "responses" / f"{polarity}.csv").read_text(encoding="utf-8")
        csv_multi = (multi / "responses" / f"{polarity}.csv").read_text(encoding="utf-8")
        assert csv_multi == csv_single
        for pooling in POOLINGS:
            act = multi / "activations" / f"{polarity}_{pooling}"
            ref = single / "activations" / f"{polarity}_{pooling}"
            ids = np.load(f"{act}_ids.npy", allow_pickle=False)
            assert ids.tolist() == list(range(N))
            got = np.load(f"{act}.npy", allow_pickle=False)
            want = np.load(f"{ref}.npy", allow_pickle=False)
            assert got.shape == want.shape == (N, 3, 576)
            assert_close_to_scale(got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from typer.testing import CliRunner

    from tracekit.cli import app

    base = tmp_path_factory.mktemp("mp") / "experiments"
    single = CliRunner().invoke(
        app, [*COMMON, "--experiment", "single", "--experiments-dir", str(base)]
    )
    assert single.exit_code == 0, single.output
    summary = _run_two_processes(base, "multi")
    return base, summary


def test_two_processes_merge_into_the_single_process_outputs(runs):
    base, summary = runs
    multi = base / "multi" / "refusal"
    assert summary["traits"][0]["rows"] == {"pos": N, "neg": N}
    assert summary["traits"][0]["generated"] == 2 * N  # both shards counted by the main process
    # per-process report gathered from both ranks: each did its block of both polarities
    procs = summary["processes"]
    assert [p["rank"] for p in procs] == [0, 1]
    assert [p["rows"] for p in procs] == [N, N]
    assert sum(p["tokens"] for p in procs) == summary["tokens"] and all(p["tokens"] for p in procs)
    assert all(p["load_seconds"] > 0 and p["engine_seconds"] > 0 for p in procs)
    assert all(p["setup_parts"] == {} for p in procs)  # the hf engine has no one-time setup
    _assert_same_outputs(base / "single" / "refusal", multi)
    # each process journaled its own shard (a contiguous block of ids), under its own name
    parts = sorted(p.name for p in (multi / "responses" / "parts").glob("*.json"))
    assert parts == [
        "neg-0000000-rank0.json",
        "neg-0000002-rank1.json",
        "pos-0000000-rank0.json",
        "pos-0000002-rank1.json",
        "run.json",
    ]
    rank1 = json.loads((multi / "responses" / "parts" / "pos-0000002-rank1.json").read_text())
    assert [r["id"] for r in rank1["rows"]] == [2, 3]
    metadata = json.loads((multi / "metadata.json").read_text())
    assert metadata["rows"] == {"pos": N, "neg": N}


def test_a_lost_shard_is_regenerated_alone_and_merged_again(runs):
    base, _ = runs
    multi = base / "multi" / "refusal"
    # as if process 1 had crashed before journaling anything: its parts and the merged CSVs
    # go; the complete run's slot files became the activation files, so rank 0's rows are
    # taken from those into new slot files
    assert not list(multi.glob("activations/parts/*"))
    lost = list(multi.glob("responses/parts/*-rank1.json"))
    assert len(lost) == 2
    for part in lost:
        part.unlink()
    for polarity in ("pos", "neg"):
        (multi / "responses" / f"{polarity}.csv").unlink()
    rank0_part = multi / "responses" / "parts" / "pos-0000000-rank0.json"
    before = rank0_part.stat().st_mtime_ns

    summary = _run_two_processes(base, "multi")

    assert summary["traits"][0]["generated"] == N  # ids 2 and 3 of each polarity only
    assert rank0_part.stat().st_mtime_ns == before  # rank 0's finished shard was not redone
    _assert_same_outputs(base / "single" / "refusal", multi)


def test_extract_activations_on_two_processes_equals_one(runs, two_processes):
    import shutil

    from typer.testing import CliRunner

    from tracekit.cli import app

    base, _ = runs
    for name in ("x_single", "x_multi"):
        shutil.copytree(base / "single", base / name)
    args = ["extract", "activations", "--trait", "refusal", "--experiments-dir", str(base)]
    args += ["--layers", "0,5,30", "--pooling", "prompt_avg", "--batch-size", "2"]
    args += ["--device", "cpu"]
    one = CliRunner().invoke(app, [*args, "--experiment", "x_single"])
    assert one.exit_code == 0, one.output
    assert two_processes(*args, "--experiment", "x_multi")["rows"] == {"pos": N, "neg": N}
    for polarity in ("pos", "neg"):
        act = base / "x_multi" / "refusal" / "activations" / f"{polarity}_prompt_avg"
        ref = base / "x_single" / "refusal" / "activations" / f"{polarity}_prompt_avg"
        assert np.load(f"{act}_ids.npy", allow_pickle=False).tolist() == list(range(N))
        got = np.load(f"{act}.npy", allow_pickle=False)
        want = np.load(f"{ref}.npy", allow_pickle=False)
        assert got.shape == want.shape == (N, 3, 576)
        assert_close_to_scale(got, want)
    # every process wrote its rows into the staged files, which then replaced the outputs
    assert not list((base / "x_multi" / "refusal" / "activations").glob(".tmp-*"))


def test_log_on_two_processes_merges_shard_stores_into_one(tmp_path: Path, two_processes):
    from typer.testing import CliRunner

    from tracekit import open_store
    from tracekit.cli import app

    questions = ["Hi?", "What is 2+2?", "Name a color.", "Say hello."]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    args = ["log", "--qa", str(qa), "--layers", "5", "--max-new-tokens", "3"]
    args += ["--device", "cpu", "--batch-size", "2"]  # one batch per process
    one = CliRunner().invoke(app, [*args, "--lmdb", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    # a shard store left by a crashed data-parallel run: merged first, its entry not redone
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"prompt": questions[0]}) + "\n")
    leftover = [*args[:2], str(first), *args[3:], "--lmdb", str(tmp_path / "two.rank1")]
    assert CliRunner().invoke(app, leftover).exit_code == 0

    summary = two_processes(*args, "--lmdb", tmp_path / "two")
    assert (summary["already_logged"], summary["logged"]) == (1, 3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]
    with open_store(tmp_path / "one") as ref, open_store(tmp_path / "two") as merged:
        assert sorted(merged.keys()) == sorted(ref.keys())
        assert len(merged.provenance) == 1
        for key in sorted(ref.keys()):
            want, got = ref.get(key), merged.get(key)
            for field in ("prompt", "response_token_ids", "finish_reason", "positions"):
                assert got.metadata[field] == want.metadata[field]
            x = want.arrays["layer_5"].astype(np.float32)
            y = got.arrays["layer_5"].astype(np.float32)
            assert x.shape == y.shape
            # stored as float16: allow a few float16 steps of the largest magnitude
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-3 * np.abs(x).max())


def test_log_on_two_processes_into_a_store_without_weights_gives_one_notice(tmp_path: Path):
    """A store from a tracekit that recorded no weights: a data-parallel run resumes into it
    with the notice printed once (the main process merges twice; the shards are new)."""
    from typer.testing import CliRunner

    from store_records import edit_provenance_records
    from tracekit import open_store
    from tracekit.cli import app

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "Hi?"}) + "\n")
    store = tmp_path / "old"
    args = ["log", "--qa", str(qa), "--layers", "1", "--max-new-tokens", "1"]
    args += ["--device", "cpu", "--batch-size", "1", "--lmdb", str(store)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    drop = ("quantization", "weights_sha256")
    edit_provenance_records(
        store,
        lambda old: {k: {f: v for f, v in r.items() if f not in drop} for k, r in old.items()},
    )
    qa.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi?", "Yes?", "No?"]))
    command = [sys.executable, "-m", "tracekit", *args, "--num-processes", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-8000:]
    assert json.loads(done.stdout)["logged"] == 2
    assert " ".join(done.stderr.split()).count("does not record which weights") == 1
    with open_store(store) as merged:
        assert len(merged) == 3


def test_a_steered_sweep_on_two_processes_equals_one(tmp_path: Path, two_processes):
    """A steering sweep (2 coefficients, neutral prompts): every set is sharded like an
    unsteered run, and its CSV, activations and recorded steering equal one process's."""
    from typer.testing import CliRunner

    from tracekit.cli import app

    rng = np.random.default_rng(0)
    vector = rng.standard_normal(576).astype(np.float32)
    np.save(tmp_path / "v.npy", vector / np.linalg.norm(vector))
    base = tmp_path / "experiments"
    args = [
        "generate", "--trait", "refusal", "--n-examples", str(N), "--max-new-tokens", "4",
        "--temperature", "0", "--layers", "0,5,30", "--pooling", ",".join(POOLINGS),
        "--batch-size", "2", "--device", "cpu", "--no-generation-cache",
        "--experiments-dir", str(base), "--steer-vector", str(tmp_path / "v.npy"),
        "--steer-layer", "10", "--steer-coef", "0,100",
    ]  # fmt: skip
    one = CliRunner().invoke(app, [*args, "--experiment", "one"])
    assert one.exit_code == 0, one.output
    summary = two_processes(*args, "--experiment", "two")

    assert [t["steering"]["coef"] for t in summary["traits"]] == [0.0, 100.0]
    assert [t["rows"] for t in summary["traits"]] == [{"neutral": N}] * 2
    # each process's report covers the whole sweep: half the rows of each of the 2 sets
    procs = summary["processes"]
    assert [(p["rank"], p["rows"]) for p in procs] == [(0, N), (1, N)]
    assert sum(p["tokens"] for p in procs) == summary["tokens"] > 0
    assert all(p["load_seconds"] > 0 for p in procs)
    sets = {}
    for coef in ("+0", "+100"):
        want = base / "one" / "refusal" / "steering" / "L10" / "vector" / f"coef{coef}"
        got = base / "two" / "refusal" / "steering" / "L10" / "vector" / f"coef{coef}"
        want_csv = (want / "responses" / "neutral.csv").read_text(encoding="utf-8")
        assert (got / "responses" / "neutral.csv").read_text(encoding="utf-8") == want_csv
        sets[coef] = _rows(want / "responses" / "neutral.csv")
        for pooling in POOLINGS:
            act = f"activations/neutral_{pooling}"
            ids = np.load(got / f"{act}_ids.npy", allow_pickle=False)
            assert ids.tolist() == list(range(N))
            x = np.load(want / f"{act}.npy", allow_pickle=False)
            y = np.load(got / f"{act}.npy", allow_pickle=False)
            assert y.shape == x.shape == (N, 3, 576)
            assert_close_to_scale(y, x)
        # each process journaled its block of this set; the steering is recorded as one
        # process records it (the vector by content)
        parts = sorted(p.name for p in (got / "responses" / "parts").glob("neutral-*.json"))
        assert parts == ["neutral-0000000-rank0.json", "neutral-0000002-rank1.json"]
        steering = json.loads((got / "metadata.json").read_text())["steering"]
        assert steering == json.loads((want / "metadata.json").read_text())["steering"]
        assert steering["coef"] == float(coef) and steering["layer"] == 10
    # the coefficient took effect (else equal outputs would prove nothing): layer 10's
    # residual stream is O(100), so +100 x a unit vector changes every greedy response
    responses = {coef: [r["response"] for r in rows] for coef, rows in sets.items()}
    assert all(a != b for a, b in zip(responses["+0"], responses["+100"], strict=True))
