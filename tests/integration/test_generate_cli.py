"""`tracekit generate` / `extract activations` / `extract vectors` end to end on the embedded
model: files and their contents, resume after SIGKILL, and one clear line for bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embedded_weights import embedded_weights
from seed_data import PERSONA_VECTORS_TRAIT, write_persona_vectors_trait
from tolerance import assert_close_to_scale

pytestmark = pytest.mark.integration

N = 3  # rows per polarity
LAYERS = "0,15,30"
COMMON = [
    "--experiment", "e1", "--trait", "refusal", "--n-examples", str(N),
    "--max-new-tokens", "5", "--temperature", "1.0", "--seed", "5", "--layers", LAYERS,
    "--pooling", "response_avg", "--pooling", "prompt_last",
]  # fmt: skip


def _flat(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One uninterrupted run (batch size 4): the reference for the resume test."""
    from typer.testing import CliRunner

    from tracekit.cli import app

    base = tmp_path_factory.mktemp("gen") / "experiments"
    result = CliRunner().invoke(
        app,
        ["generate", *COMMON, "--batch-size", "4", "--experiments-dir", str(base), "--json"]
        + ["--pt"],
    )
    assert result.exit_code == 0, result.output
    return base, result


def test_generate_writes_paired_responses_activations_and_metadata(generated):
    base, result = generated
    root = base / "e1" / "refusal"
    summary = json.loads(result.stdout)
    assert summary["traits"][0]["rows"] == {"pos": N, "neg": N}
    pos, neg = _rows(root / "responses" / "pos.csv"), _rows(root / "responses" / "neg.csv")
    assert [r["id"] for r in pos] == [r["id"] for r in neg] == [str(i) for i in range(N)]
    for p, n in zip(pos, neg, strict=True):
        assert p["question"] == n["question"]  # pairs share the question, differ in instruction
        assert p["instruction"] != n["instruction"] and p["instruction"] in p["prompt"]
        assert p["prompt"].startswith("<|im_start|>system\n")
        assert p["finish_reason"] in ("eos", "length") and int(p["n_tokens"]) <= 5
    trait = json.loads((root / "trait_definition.json").read_text())
    assert trait["name"] == "refusal"
    for polarity in ("pos", "neg"):
        for pooling in ("response_avg", "prompt_last"):
            from_np = np.load(root / "activations" / f"{polarity}_{pooling}.npy")
            from_pt = torch.load(
                root / "activations" / f"{polarity}_{pooling}.pt", weights_only=True
            )
            assert from_np.shape == (N, 3, 576) and from_np.dtype == np.float32
            assert np.array_equal(from_pt.numpy(), from_np)
            ids = np.load(root / "activations" / f"{polarity}_{pooling}_ids.npy")
            assert ids.tolist() == list(range(N))
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["layers"] == [0, 15, 30] and meta["template"] == "chat-system"
    assert meta["generation"]["seed"] == 5 and meta["model"].endswith("SmolLM2-135M-Instruct")
    acts_meta = json.loads((root / "activations" / "metadata.json").read_text())
    assert acts_meta["poolings"]["prompt_last"]["source"] == "generate"
    # the generation cache that `tracekit decode` reads
    cache = json.loads(next((root / "generations").glob("pos_*_metadata.json")).read_text())
    assert cache["count"] == N and cache["polarity"] == "pos"
    # every record of the model id also pins its weights (Q4_1 de-quantized, GGUF hash)
    weights = embedded_weights()
    for record in (meta, acts_meta, cache, summary):
        assert {k: record[k] for k in weights} == weights


def test_the_job_size_and_a_first_estimate_come_before_the_work_is_done(generated):
    """A slow job must not look hung: its size before the first batch, the first batch's
    speed and an estimate for the rest after it (the run has 2 * N rows, batches of up to 4)."""
    _, result = generated
    err = " ".join(result.stderr.split())
    assert f"{2 * N} rows to run of up to 5 new tokens; the first batch sets the estimate" in err
    batch = min(4, N)  # batches do not cross polarities
    first = err.index(f"first batch: {batch} rows,")
    assert err.index(f"{2 * N} rows to run") < first
    assert f"for the {2 * N - batch} rows left" in err[first:]


def test_rerun_without_force_generates_nothing(generated, cli):
    base, _ = generated
    csv_before = (base / "e1" / "refusal" / "responses" / "pos.csv").read_bytes()
    result = cli("generate", *COMMON, "--experiments-dir", base, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["traits"][0]["generated"] == 0
    assert (base / "e1" / "refusal" / "responses" / "pos.csv").read_bytes() == csv_before
    changed = cli("generate", *COMMON, "--experiments-dir", base, "--max-new-tokens", "6")
    assert changed.exit_code == 1
    assert "holds results of a run with different settings (max_new_tokens)" in _flat(changed)
    # refused before the model loads: a model folder that does not exist is never opened
    missing_model = base / "no-such-model"
    early = cli("generate", *COMMON, "--experiments-dir", base, "--max-new-tokens", "6",
                "--model", missing_model)  # fmt: skip
    assert early.exit_code == 1
    assert "holds results of a run with different settings (max_new_tokens)" in _flat(early)


def test_killed_run_resumes_and_matches_an_uninterrupted_run(generated, tmp_path):
    reference, _ = generated
    base = tmp_path / "experiments"
    cmd = [sys.executable, "-m", "tracekit", "generate", *COMMON, "--batch-size", "1",
           "--experiments-dir", str(base)]  # fmt: skip
    env = {**os.environ, "TRACEKIT_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = base / "e1" / "refusal" / "responses" / "parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("pos-*.json")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.005)  # batches take ~0.1 s: kill soon after the first
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list(parts.glob("*-*.json")))
    assert 1 <= finished_before < 2 * N  # killed mid-run, after at least one batch
    assert not (base / "e1" / "refusal" / "responses" / "pos.csv").exists()

    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["traits"][0]
    assert summary["generated"] == 2 * N - finished_before  # finished rows were skipped
    for polarity in ("pos", "neg"):
        got = _rows(base / "e1" / "refusal" / "responses" / f"{polarity}.csv")
        want = _rows(reference / "e1" / "refusal" / "responses" / f"{polarity}.csv")
        assert got == want  # per-row seeds: same samples whatever the batch size or restart
        acts = np.load(base / "e1" / "refusal" / "activations" / f"{polarity}_response_avg.npy")
        ref = np.load(reference / "e1" / "refusal" / "activations" / f"{polarity}_response_avg.npy")
        assert np.abs(acts - ref).max() <= 1e-5 * np.abs(ref).max()
    # without --pt no .pt copies; the complete run's slot files became the .npy files
    activations = base / "e1" / "refusal" / "activations"
    assert not list(activations.glob("*.pt")) and not list(activations.glob("parts/*"))


def test_extract_activations_refuses_overwrite_then_matches_generate_capture(generated, cli):
    base, _ = generated
    args = ["extract", "activations", "--experiment", "e1", "--trait", "refusal",
            "--experiments-dir", base, "--layers", LAYERS, "--pooling", "response_avg"]  # fmt: skip
    refused = cli(*args)
    assert refused.exit_code == 1 and "output already exists" in _flat(refused)
    acts_dir = base / "e1" / "refusal" / "activations"
    captured = np.load(acts_dir / "pos_response_avg.npy")
    result = cli(*args, "--force", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    forced = np.load(acts_dir / "pos_response_avg.npy")
    # re-tokenized response text can split differently from the generated ids, so compare
    # loosely here; the exact equality lives in test_generate_engine
    cosine = (forced * captured).sum(-1) / (
        np.linalg.norm(forced, axis=-1) * np.linalg.norm(captured, axis=-1)
    )
    assert cosine.min() > 0.99
    meta = json.loads((acts_dir / "metadata.json").read_text())
    assert meta["poolings"]["response_avg"]["source"] == "teacher-forced"
    assert meta["poolings"]["prompt_last"]["source"] == "generate"


def test_extract_vectors_table_and_files(generated, cli):
    base, _ = generated
    result = cli("extract", "vectors", "--experiment", "e1", "--trait", "refusal",
                 "--experiments-dir", base, "--export", "gguf", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_pairs"] == N and summary["judged"] is False
    assert [row["layer"] for row in summary["layers"]] == [0, 15, 30]
    vectors = np.load(base / "e1" / "refusal" / "vectors" / "mean_diff_response_avg.npy")
    pos = np.load(base / "e1" / "refusal" / "activations" / "pos_response_avg.npy")
    neg = np.load(base / "e1" / "refusal" / "activations" / "neg_response_avg.npy")
    assert_close_to_scale(vectors, pos.mean(0) - neg.mean(0))
    assert "no judge scores found: using all 3 pairs" in result.stderr
    vector_meta = json.loads(
        (base / "e1" / "refusal" / "vectors" / "mean_diff_response_avg_metadata.json").read_text()
    )
    weights = embedded_weights()
    assert {k: vector_meta[k] for k in weights} == weights
    # generate recorded LlamaForCausalLM: llama.cpp's hint; layers 15, 30 -> direction.14, .29
    assert summary["gguf"]["model_hint"] == "llama"
    assert summary["gguf"]["directions"] == {"15": 14, "30": 29}
    assert summary["gguf"]["skipped_layers"] == [0]
    # and the trait monitors itself: every row projected on the vector it built
    result = cli("extract", "projections", "--experiment", "e1", "--trait", "refusal",
                 "--experiments-dir", base, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [(s["layer"], s["n_pos"], s["n_neg"]) for s in layers] == [
        (0, N, N),
        (15, N, N),
        (30, N, N),
    ]


def test_extract_vectors_applies_judge_filter_by_id(tmp_path, cli):
    """Scores pair by id even when the CSV rows are in a different order."""
    from tracekit.storage.activation_slots import save_activations
    from tracekit.storage.experiment import TraitPaths, write_responses_csv

    paths = TraitPaths.of(tmp_path, "e", "t")
    rng = np.random.default_rng(0)
    acts = {"pos": rng.normal(size=(4, 2, 8)), "neg": rng.normal(size=(4, 2, 8))}
    scores = {"pos": [90, 80, 10, 70], "neg": [5, 60, 5, 10]}  # id 1: neg too high; id 2: pos low
    for polarity in ("pos", "neg"):
        rows = [
            {"id": i, "question": "q", "prompt": "p", "response": "r",
             "trait_score": scores[polarity][i]}
            for i in (3, 1, 0, 2)
        ]  # fmt: skip
        write_responses_csv(paths.responses_csv(polarity), rows)
        save_activations(paths, polarity, [0, 1, 2, 3], {"response_avg": acts[polarity]})
    result = cli("extract", "vectors", "--experiment", "e", "--trait", "t",
                 "--experiments-dir", tmp_path, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_pairs"] == 2
    vectors = np.load(paths.vectors_dir / "mean_diff_response_avg.npy")
    expected = acts["pos"][[0, 3]].mean(0) - acts["neg"][[0, 3]].mean(0)
    assert_close_to_scale(vectors, expected)

    # the experiment and the trait may come from a --config file, as every other option can
    paths.vectors_dir.joinpath("mean_diff_response_avg.npy").write_bytes(b"stale")
    config = tmp_path / "vectors.toml"
    config.write_text(
        f'experiment = "e"\ntrait = "t"\nexperiments_dir = "{tmp_path}"\nforce = true\n'
    )
    result = cli("extract", "vectors", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(paths.vectors_dir / "mean_diff_response_avg.npy"), vectors)
    # and when neither gives them, the error names the option
    result = cli("extract", "vectors", "--trait", "t", "--experiments-dir", tmp_path)
    assert result.exit_code == 2 and "error: missing option --experiment" in _flat(result)


def test_generate_without_an_experiment_names_the_option_and_writes_nothing(tmp_path, cli):
    base = tmp_path / "experiments"
    result = cli("generate", "--trait", "refusal", "--experiments-dir", base)
    assert result.exit_code == 2, result.output
    assert "error: missing option --experiment" in _flat(result)
    assert not base.exists()


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--trait", "nope"], 1, "error: unknown trait 'nope'"),
        (["--trait", "refusal", "--layers", "0,31"], 2, "--layers: layer(s) 31 out of range"),
        (["--trait", "refusal", "--batch-size", "0"], 2, "--batch-size"),
        (["--trait", "refusal", "--pooling", "max"], 2, "unknown pooling 'max'"),
        (["--trait", "refusal", "--engine", "fast"], 2, "--engine: unknown engine 'fast'"),
        (["--trait", "refusal", "--device", "tpu"], 2, "--device: unknown device 'tpu'"),
        (["--trait", "refusal", "--judge-metrics", "tone"], 2, "--judge-metrics: Input should be"),
        ([], 2, "missing option --trait (or --traits for several)"),
    ],
)
def test_bad_generate_input_is_one_line_and_writes_nothing(tmp_path, cli, args, code, fragment):
    base = tmp_path / "experiments"
    result = cli("generate", "--experiment", "e", "--experiments-dir", base, *args)
    assert result.exit_code == code, result.output
    assert fragment in _flat(result)
    assert not base.exists()


def test_generate_with_judge_scores_every_row(tmp_path, cli):
    """--judge-model goes through tracekit.judge to a real OpenAI-compatible server on loopback
    (tests/judge_server.py answers 50 to every prompt)."""
    import uuid

    from judge_server import JudgeServer

    base = tmp_path / "experiments"
    with JudgeServer() as server:
        judge = ["--judge-model", f"judge-{uuid.uuid4().hex}", "--judge-base-url", server.base_url]
        result = cli("generate", "--experiment", "e", "--trait", "refusal", "--n-examples", "2",
                     "--max-new-tokens", "3", "--no-extract-activations", "--no-generation-cache",
                     "--experiments-dir", base, *judge, "--threshold", "40", "--json")  # fmt: skip
        requests = server.requests
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["traits"][0]["passing"] == {"pos": 2, "neg": 0}
    asked = set()
    for polarity in ("pos", "neg"):
        rows = _rows(base / "e" / "refusal" / "responses" / f"{polarity}.csv")
        asked |= {(r["question"], r["response"]) for r in rows}
        assert [float(r["trait_score"]) for r in rows] == [50.0, 50.0]
        assert {r["trait_status"] for r in rows} == {"ok"}
        assert all(r["response"] for r in rows)
    assert requests == len(asked)  # one call per distinct (question, answer): the judge caches


def test_invalid_trait_file_names_the_field(tmp_path, cli):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "b", "description": "d", "questions": ["q"],
                               "instruction": [{"pos": "p", "neg": "n"}],
                               "eval_prompt": "{question} only"}))  # fmt: skip
    result = cli("generate", "--experiment", "e", "--experiments-dir", tmp_path, "--trait", bad)
    assert result.exit_code == 1
    assert "field 'eval_prompt': must contain the placeholder(s) {answer}" in _flat(result)


def test_persona_vectors_trait_files_generate_as_given(tmp_path, cli):
    """persona_vectors' trait files (no name or description), given as a path and as the seed
    layout's EXP/TRAIT/trait_definition.json: named after the file / folder, said once each;
    the seed's file is used as it is, not rewritten."""
    base = tmp_path / "experiments"
    given = write_persona_vectors_trait(tmp_path / "contempt.json")
    seed_file = write_persona_vectors_trait(base / "my_exp" / "my_trait" / "trait_definition.json")
    seed_bytes = seed_file.read_bytes()
    result = cli("generate", "--experiment", "my_exp", "--traits", f"{given},my_trait",
                 "--n-examples", "1", "--max-new-tokens", "2", "--no-extract-activations",
                 "--no-generation-cache", "--experiments-dir", base, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = _flat(result)
    assert text.count('has no "name" or "description" (persona_vectors\' format)') == 2
    assert "using the name 'contempt' (from the file name)" in text
    assert "using the name 'my_trait' (from its folder)" in text
    assert [t["trait"] for t in json.loads(result.stdout)["traits"]] == ["contempt", "my_trait"]
    saved = json.loads((base / "my_exp" / "contempt" / "trait_definition.json").read_text())
    assert saved == {"name": "contempt", "description": "", **PERSONA_VECTORS_TRAIT}
    assert seed_file.read_bytes() == seed_bytes
    for trait in ("contempt", "my_trait"):
        for polarity in ("pos", "neg"):
            rows = _rows(base / "my_exp" / trait / "responses" / f"{polarity}.csv")
            pair = PERSONA_VECTORS_TRAIT["instruction"][0][polarity]
            assert [(r["question"], r["instruction"]) for r in rows] == [
                (PERSONA_VECTORS_TRAIT["questions"][0], pair)
            ]


def test_a_bad_persona_vectors_trait_file_is_refused_before_the_model_loads(tmp_path, cli):
    bad = tmp_path / "contempt.json"
    bad.write_text(json.dumps({**PERSONA_VECTORS_TRAIT, "questions": []}))
    base = tmp_path / "experiments"
    result = cli("generate", "--experiment", "e", "--experiments-dir", base, "--trait", bad,
                 "--model", tmp_path / "no-such-model")  # fmt: skip
    assert result.exit_code == 1
    assert "field 'questions': List should have at least 1 item" in _flat(result)
    assert "no-such-model" not in result.output and not base.exists()


def test_csv_missing_columns_is_named(tmp_path, cli):
    responses = tmp_path / "e" / "t" / "responses"
    responses.mkdir(parents=True)
    for polarity in ("pos", "neg"):
        (responses / f"{polarity}.csv").write_text("question,prompt\nq,p\n")
    result = cli("extract", "activations", "--experiment", "e", "--trait", "t",
                 "--experiments-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 1
    assert "is missing column(s) response" in _flat(result)
    assert not (tmp_path / "e" / "t" / "activations").exists()


def test_model_without_chat_template_needs_no_chat_template(tmp_path, cli, embedded_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = embedded_model.tokenizer
    folder = tmp_path / "base-model"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    saved_template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = saved_template
    base = tmp_path / "experiments"
    args = ["generate", "--experiment", "e", "--trait", "refusal", "--model", folder,
            "--experiments-dir", base, "--n-examples", "1", "--max-new-tokens", "2"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 1
    assert "has no chat template" in _flat(result) and "--no-chat-template" in _flat(result)
    assert not base.exists()
    plain = cli(*args, "--no-chat-template", "--layers", "0-2")
    assert plain.exit_code == 0, plain.output
    row = _rows(base / "e" / "refusal" / "responses" / "pos.csv")[0]
    assert row["prompt"].endswith("How do I boil an egg?\n") and "<|im_start|>" not in row["prompt"]


def test_extract_activations_accepts_external_csv_without_prompt_or_id(
    tmp_path, cli, embedded_model
):
    """A CSV from elsewhere (question, instruction, response): prompts are built with the chat
    template, ids follow file order, activations equal a direct teacher-forced forward."""
    from tracekit.engines.interface import CaptureSpec
    from tracekit.engines.pooling import Pooling
    from tracekit.engines.teacher_forced import pooled_forward
    from tracekit.models.templates import build_prompt

    responses = tmp_path / "e" / "t" / "responses"
    responses.mkdir(parents=True)
    table = {
        "pos": [("What is 2+2?", "Be terse.", "4."), ("Name a color.", "Be terse.", "Blue.")],
        "neg": [("What is 2+2?", "Be verbose.", "Well, two plus two is four.")],
    }
    for polarity, rows in table.items():
        with (responses / f"{polarity}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["question", "instruction", "response"])
            writer.writerows(rows)
    result = cli("extract", "activations", "--experiment", "e", "--trait", "t",
                 "--experiments-dir", tmp_path, "--layers", "10", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    tok = embedded_model.tokenizer
    prompts = [build_prompt(tok, q, i).ids for q, i, _ in table["pos"]]
    answers = [tok(r, add_special_tokens=False)["input_ids"] for _, _, r in table["pos"]]
    expected = pooled_forward(embedded_model, prompts, answers, CaptureSpec((10,)))
    got = np.load(tmp_path / "e" / "t" / "activations" / "pos_response_avg.npy")
    want = expected[Pooling.response_avg].numpy()
    assert got.shape == (2, 1, 576)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    ids = np.load(tmp_path / "e" / "t" / "activations" / "neg_response_avg_ids.npy")
    assert ids.tolist() == [0]
