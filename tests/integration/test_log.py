"""`tracekit log` on the embedded model: stored positions, SIGKILL + restart, reconstruct."""

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
from store_records import edit_provenance_records
from tolerance import assert_close_to_scale
from tracekit.actlog.logger import ActivationLogger
from tracekit.actlog.prompts import DEFAULT_TEMPLATE, format_prompt
from tracekit.engines.hf import HFEngine
from tracekit.errors import StoreError
from tracekit.storage.activation_store import open_store, prompt_key

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "What is two plus two?",
    "Name a primary color.",
    "What do bees make?",
    "Who painted the Mona Lisa?",
]


def _unpadded_hidden(loaded, ids: list[int], layer: int) -> np.ndarray:
    """HF hidden_states[layer] (layer < n_blocks, so before the final norm) of one row."""
    with torch.inference_mode():
        out = loaded.model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0].float().numpy()


def test_logger_around_a_users_forward_stores_unpadded_states(embedded_model, tmp_path: Path):
    tok = embedded_model.tokenizer
    prompts = ["Hi", "A much longer prompt with quite a few more tokens in it"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    with ActivationLogger(
        tmp_path / "s.lmdb", embedded_model.model, tok, layers=[0, 12], dtype="float32"
    ) as act_log:
        with torch.inference_mode():
            embedded_model.model(
                **enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False
            )
        act_log.log(prompts, mask)
    with open_store(tmp_path / "s.lmdb") as store:
        entry = store.get_by_prompt("Hi")
        assert entry is not None and entry.metadata["positions"] == {"prompt": 1, "response": 0}
        ids = tok("Hi")["input_ids"]
        for layer in (0, 12):
            expected = _unpadded_hidden(embedded_model, ids, layer)
            assert_close_to_scale(entry.arrays[f"layer_{layer}"], expected)
        (record,) = store.provenance.values()
        assert set(record["layers"]) == {0, 12}
        # a plain HF model: the weights are found from the folder its config names
        assert {k: record[k] for k in embedded_weights()} == embedded_weights()


def test_logger_given_a_loaded_model_records_its_weights(embedded_model, tmp_path: Path):
    tok = embedded_model.tokenizer
    enc = tok(["Hi"], return_tensors="pt", padding=True)
    # no tokenizer, no provenance: everything comes from the LoadedModel
    with ActivationLogger(tmp_path / "s.lmdb", embedded_model, layers=[3]) as act_log:
        with torch.inference_mode():
            embedded_model.model(**enc, use_cache=False)
        act_log.log(["Hi"], enc["attention_mask"])
    weights = embedded_weights()
    with open_store(tmp_path / "s.lmdb") as store:
        (record,) = store.provenance.values()
        meta = store.get_by_prompt("Hi").metadata
    assert record["model"] == embedded_model.name == meta["model"]
    assert {k: record[k] for k in weights} == weights == {k: meta[k] for k in weights}
    # the same store under other weights of the same model id: refused, nothing opened
    other = {**weights, "weights_sha256": "0" * 64}
    with pytest.raises(StoreError, match="written with other weights of model"):
        ActivationLogger(
            tmp_path / "s.lmdb", embedded_model, layers=[3], provenance=other
        ).__enter__()


def test_resuming_log_checks_the_weights_before_the_model_runs(cli, tmp_path: Path):
    qa = tmp_path / "qa.jsonl"
    store_path = tmp_path / "s.lmdb"
    args = ["log", "--qa", qa, "--lmdb", store_path, "--layers", "1", "--max-new-tokens", "1"]
    args += ["--device", "cpu"]
    qa.write_text(json.dumps({"prompt": "Hi?"}) + "\n")
    assert cli(*args).exit_code == 0
    # the store says other weights of the same model id (another checkpoint or quantization)
    edit_provenance_records(
        store_path, lambda old: {k: {**r, "weights_sha256": "f" * 64} for k, r in old.items()}
    )
    qa.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi?", "Yes?"]))
    refused = cli(*args)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert (
        "was written with other weights of model 'HuggingFaceTB/SmolLM2-135M-Instruct': "
        f"weights_sha256 '{'f' * 64}' (store) != '{embedded_weights()['weights_sha256']}' "
        "(this run)" in text
    )
    assert "--allow-mixed" in text
    with open_store(store_path) as store:
        assert len(store) == 1
    # a store from a tracekit that did not record weights: resumed, with one notice
    drop = ("quantization", "weights_sha256")
    edit_provenance_records(
        store_path,
        lambda old: {k: {f: v for f, v in r.items() if f not in drop} for k, r in old.items()},
    )
    resumed = cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert " ".join(resumed.output.split()).count("does not record which weights") == 1
    with open_store(store_path) as store:
        assert len(store) == 2


def test_resuming_log_refuses_other_weights_of_a_folder_before_loading_it(
    cli, tmp_path: Path, monkeypatch
):
    """A model folder's weights hash is known from its files: a store from other weights is
    refused without loading the model (this folder's weights would not even load)."""
    import hashlib

    from tracekit.storage.activation_store import ActivationStoreWriter, PendingEntry

    monkeypatch.setenv("TRACEKIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"not loadable weights")
    store_path = tmp_path / "s.lmdb"
    record = {"model": str(folder), "quantization": None, "weights_sha256": "f" * 64}
    with ActivationStoreWriter(store_path, record) as writer:
        writer.write_batch([PendingEntry("k", {"prompt": "Hi?"})])
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "Hi?"}) + "\n")
    args = ["log", "--qa", qa, "--lmdb", store_path, "--model", folder, "--device", "cpu"]
    refused = cli(*args)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    this_run = hashlib.sha256(b"not loadable weights").hexdigest()
    assert (
        f"was written with other weights of model '{folder}': weights_sha256 '{'f' * 64}' "
        f"(store) != '{this_run}' (this run)" in text
    )


def test_log_choices_are_stored_as_plain_strings_and_a_mismatch_names_them(cli, tmp_path: Path):
    """--sequence-mode, --dtype and --model-dtype (enums on the command line) reach the store
    as plain strings, and a resume with another mode names both values as strings."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "Hi?"}) + "\n")
    store_path = tmp_path / "s.lmdb"
    args = ["log", "--qa", qa, "--lmdb", store_path, "--layers", "1", "--max-new-tokens", "1"]
    args += ["--device", "cpu", "--dtype", "float32", "--model-dtype", "float32"]
    first = cli(*args, "--sequence-mode", "prompt")
    assert first.exit_code == 0, first.output
    with open_store(store_path) as store:
        (record,) = store.provenance.values()
        entry = store.get_by_prompt(format_prompt(DEFAULT_TEMPLATE, "Hi?"))
    stored = {name: record[name] for name in ("sequence_mode", "dtype", "model_dtype")}
    assert stored == {"sequence_mode": "prompt", "dtype": "float32", "model_dtype": "float32"}
    assert all(type(value) is str for value in stored.values())
    assert type(entry.metadata["sequence_mode"]) is str
    assert entry.metadata["sequence_mode"] == "prompt"
    assert entry.metadata["positions"]["response"] == 0
    assert entry.arrays["layer_1"].dtype == np.float32
    refused = cli(*args, "--sequence-mode", "response")
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "sequence_mode 'prompt' (store) != 'response' (this run)" in text


def test_logger_given_enum_choices_records_plain_strings(embedded_model, tmp_path: Path):
    from tracekit.config.choices import SequenceMode, StoreDtype

    act_log = ActivationLogger(
        tmp_path / "s.lmdb",
        embedded_model,
        layers=[3],
        sequence_mode=SequenceMode.response,
        dtype=StoreDtype.bfloat16,
    )
    values = [act_log.provenance["sequence_mode"], act_log.provenance["dtype"]]
    values += [act_log.sequence_mode, act_log.dtype]
    assert values == ["response", "bfloat16"] * 2
    assert [type(value) for value in values] == [str] * 4


@pytest.mark.parametrize(
    "placement", [("--device", "cpu"), ("--device-map", "auto")], ids=["device", "device-map"]
)
def test_log_response_positions_equal_an_unpadded_forward(
    cli, embedded_model, tmp_path: Path, placement: tuple[str, str]
):
    # --device-map auto: accelerate places the model (all on the CPU here; the 2-GPU split is
    # tests/gpu/test_multi_gpu.py)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi?", QUESTIONS[5]]))
    store_path = tmp_path / "s.lmdb"
    result = cli(
        "log", "--qa", qa, "--lmdb", store_path, "--layers", "5", "--sequence-mode", "response",
        "--dtype", "float32", "--max-new-tokens", "3", "--batch-size", "2", *placement,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # the weights, not just the model id: Q4_1 de-quantized, pinned by the GGUF file's hash
    weights = embedded_weights()
    assert "Q4_1" in " ".join(result.output.split())  # the summary's model line
    tok = embedded_model.tokenizer
    with open_store(store_path) as store:
        (record,) = store.provenance.values()
        assert {k: record[k] for k in weights} == weights
        assert len(store) == 2
        for question in ["Hi?", QUESTIONS[5]]:
            entry = store.get_by_prompt(format_prompt(DEFAULT_TEMPLATE, question))
            meta, acts = entry.metadata, entry.arrays["layer_5"]
            assert {k: meta[k] for k in weights} == weights
            response = meta["response_token_ids"]
            assert meta["positions"] == {"prompt": 0, "response": len(response)}
            assert acts.shape == (len(response), 576) and len(response) > 0
            assert meta["generation"] == tok.decode(response, skip_special_tokens=True)
            prompt_ids = tok(meta["prompt"])["input_ids"]
            assert meta["input_length"] == len(prompt_ids)
            full = _unpadded_hidden(embedded_model, prompt_ids + response, 5)
            assert_close_to_scale(acts, full[len(prompt_ids) :])


def _wait_and_kill(proc: subprocess.Popen, store: Path, at_least: int, timeout: float) -> int:
    """SIGKILL ``proc`` once the store holds ``at_least`` entries; returns the count then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with open_store(store) as reader:
                count = len(reader)
        except StoreError:  # not created yet, or created but its databases not yet committed
            count = 0
        if count >= at_least:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            with open_store(store) as after:
                return len(after)
        time.sleep(0.1)
    proc.kill()
    out = proc.communicate()[0]
    pytest.fail(f"log never reached {at_least} entries before ending: {out[-2000:]}")


def test_sigkill_mid_run_then_restart_logs_every_entry_once(cli, tmp_path: Path):
    qa = tmp_path / "qa.jsonl"
    rows = [{"index": i, "prompt": q, "answer": "?"} for i, q in enumerate(QUESTIONS)]
    rows.append({"index": len(rows), "prompt": QUESTIONS[0], "answer": "dup"})
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "acts.lmdb"
    args = [
        sys.executable, "-m", "tracekit", "log", "--qa", str(qa), "--lmdb", str(store),
        "--layers", "0,30", "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "TRACEKIT_PROGRESS": "0"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    logged_before = _wait_and_kill(proc, store, at_least=2, timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= logged_before < len(QUESTIONS)  # killed mid-run, whole batches only
    assert logged_before % 2 == 0

    done = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["unique_prompts"] == len(QUESTIONS) and summary["qa_rows"] == len(rows)
    assert summary["already_logged"] == logged_before
    assert summary["logged"] == len(QUESTIONS) - logged_before

    expected_keys = {prompt_key(format_prompt(DEFAULT_TEMPLATE, q)) for q in QUESTIONS}
    with open_store(store) as reader:
        assert set(reader.keys()) == expected_keys and len(reader) == len(QUESTIONS)
        assert len(reader.provenance) == 1
        for entry in reader:  # every entry whole: metadata and arrays agree
            pos = entry.metadata["positions"]
            for layer in ("layer_0", "layer_30"):
                assert entry.arrays[layer].shape == (pos["prompt"] + pos["response"], 576)
            assert pos["prompt"] == entry.metadata["input_length"]

    out = tmp_path / "inference.jsonl"
    result = cli(
        "reconstruct", "--qa-output-path", qa, "--lmdb-path", store, "--output-path", out, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["matched"] == len(rows)
    rebuilt = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rebuilt] == list(range(len(rows)))
    assert rebuilt[0]["generation"] == rebuilt[-1]["generation"]  # the duplicate, logged once
    assert all(r["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" for r in rebuilt)


class _FailingSecondBatch(HFEngine):
    """The reference engine, failing on its second batch (as a device error would)."""

    calls = 0

    def generate(self, *args, **kwargs):
        _FailingSecondBatch.calls += 1
        if _FailingSecondBatch.calls == 2:
            raise RuntimeError("device fell over")
        return super().generate(*args, **kwargs)


def test_batches_are_written_on_a_background_thread_and_a_failure_keeps_the_finished_ones(
    tmp_path: Path, monkeypatch
):
    """`tracekit log` writes each batch's transaction on its writer thread while the next
    batch runs; when the next batch fails, the batch before it is still written whole, and a
    rerun logs only the rest."""
    import threading

    from tracekit.engines import interface as engine_module
    from tracekit.jobs.log import LogConfig, log_activations
    from tracekit.storage.activation_store import ActivationStoreWriter

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:4]))
    store = tmp_path / "acts.lmdb"
    threads: list[str] = []
    real_write = ActivationStoreWriter.write_batch

    def write_batch(self, entries):  # the real write, noting the thread it runs on
        threads.append(threading.current_thread().name)
        return real_write(self, entries)

    monkeypatch.setattr(ActivationStoreWriter, "write_batch", write_batch)
    monkeypatch.setitem(engine_module.ENGINES, "failing", f"{__name__}:_FailingSecondBatch")
    _FailingSecondBatch.calls = 0
    cfg = LogConfig(
        qa=qa, lmdb=store, layers="0,30", max_new_tokens=2, batch_size=2, device="cpu",
        model_dtype="float32", engine="failing",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="device fell over"):
        log_activations(cfg)
    first_batch = {prompt_key(format_prompt(DEFAULT_TEMPLATE, q)) for q in QUESTIONS[:2]}
    with open_store(store) as reader:
        assert set(reader.keys()) == first_batch
        for entry in reader:
            pos = entry.metadata["positions"]
            assert entry.arrays["layer_30"].shape == (pos["prompt"] + pos["response"], 576)
    assert threads and all(name.startswith("tracekit-log") for name in threads), threads

    seen: list[tuple[int, int]] = []
    result = log_activations(
        cfg.model_copy(update={"engine": "hf"}),
        on_batch=lambda rows, size, total: seen.append((rows, size)),
    )
    assert (result.already_logged, result.logged, result.batches) == (2, 2, 1)
    # progress counts a batch once it is written: its rows and its bytes
    assert seen == [(0, 0), (2, result.bytes_written)] and result.bytes_written > 0
    with open_store(store) as reader:
        assert len(reader) == 4


def test_chat_store_is_reconstructed_with_the_recorded_chat_template(cli, tmp_path: Path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "a", "prompt": QUESTIONS[1]}) + "\n")
    store = tmp_path / "chat.lmdb"
    result = cli(
        "log", "--qa", qa, "--lmdb", store, "--chat", "--layers", "1",
        "--max-new-tokens", "2", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open_store(store) as reader:
        (entry,) = list(reader)
    assert entry.metadata["prompt"].startswith("<|im_start|>")
    assert entry.metadata["messages"] == [{"role": "user", "content": QUESTIONS[1]}]
    out = tmp_path / "out.jsonl"
    result = cli("reconstruct", "--qa-output-path", qa, "--lmdb-path", store, "--output-path", out)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "a" and row["generation"] == entry.metadata["generation"]
    assert row["messages"] == entry.metadata["messages"]


def test_logger_around_hf_generate_captures_decode_steps(embedded_model, tmp_path: Path):
    """Prefill + one position per decode step line up with an unpadded forward."""
    tok, model = embedded_model.tokenizer, embedded_model.model
    prompts = ["Hello", "Write one word about the sea"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    width = enc["input_ids"].shape[1]
    with ActivationLogger(tmp_path / "s.lmdb", model, tok, layers=[7], dtype="float32") as act_log:
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        responses = [row[width:].tolist() for row in out]
        act_log.log(prompts, enc["attention_mask"], response_ids=responses)
    with open_store(tmp_path / "s.lmdb") as store:
        for prompt, response in zip(prompts, responses, strict=True):
            entry = store.get_by_prompt(prompt)
            ids = tok(prompt)["input_ids"]
            # the last generated token is never fed back: 2 of 3 response positions exist
            assert entry.metadata["positions"] == {"prompt": len(ids), "response": 2}
            expected = _unpadded_hidden(embedded_model, ids + response, 7)[: len(ids) + 2]
            assert_close_to_scale(entry.arrays["layer_7"], expected)
