"""The LMDB activation store: value format, growth, provenance, reader, and `log` bad input."""

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from store_records import edit_provenance_records
from tracekit.errors import StoreError
from tracekit.storage.activation_store import (
    ActivationStoreWriter,
    PendingEntry,
    decode_arrays,
    encode_arrays,
    open_store,
    prompt_key,
)

PROV = {"model": "org/model-a", "layers": [1, 2], "sequence_mode": "all", "dtype": "float16"}


def _entry(prompt: str, rows: int = 3, width: int = 8, seed: int = 0) -> PendingEntry:
    rng = np.random.default_rng(seed)
    return PendingEntry(
        prompt_key(prompt),
        {"prompt": prompt, "generation": f"gen of {prompt}", "input_length": rows},
        {
            "layer_1": rng.standard_normal((rows, width)).astype(np.float16),
            "layer_2": rng.standard_normal((rows, width)).astype(np.float32),
        },
    )


def test_key_is_sha256_hex_of_the_prompt_as_the_seed_wrote_it():
    assert prompt_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_values_round_trip_without_pickle_and_views_do_not_copy():
    bf16 = torch.randn(4, 5).to(torch.bfloat16)
    value = encode_arrays({"a": np.arange(12, dtype=np.float16).reshape(3, 4), "b": bf16})
    assert value[:4] == b"TKA1" and b"pickle" not in value
    arrays = decode_arrays(value)
    assert arrays["a"].dtype == np.float16 and arrays["a"].tolist()[2] == [8, 9, 10, 11]
    assert not arrays["a"].flags.writeable and not arrays["a"].flags.owndata  # a view
    assert torch.equal(torch.from_numpy(arrays["b"]), bf16.float())  # exact widening
    assert torch.equal(decode_arrays(value, as_torch=True)["b"], bf16)
    corrupt = bytearray(value)
    corrupt[-1] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        decode_arrays(bytes(corrupt))
    with pytest.raises(TypeError, match="pickle"):
        encode_arrays({"x": np.array([{"a": 1}], dtype=object)})


def test_empty_arrays_round_trip():
    """A row whose response is empty (eos first) logs zero response positions."""
    value = encode_arrays(
        {"a": np.zeros((0, 4), np.float16), "b": torch.zeros(0, 3, dtype=torch.bfloat16)}
    )
    arrays = decode_arrays(value)
    assert arrays["a"].shape == (0, 4) and arrays["a"].dtype == np.float16
    assert arrays["b"].shape == (0, 3)


def test_a_store_open_in_this_process_is_one_clear_error(tmp_path: Path):
    with (
        ActivationStoreWriter(tmp_path / "s", PROV),
        pytest.raises(StoreError, match="already open in this process"),
    ):
        open_store(tmp_path / "s")


def test_batches_grow_the_map_and_reader_gets_by_key_prompt_and_view(tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV, initial_map_size=64 << 10) as writer:
        writer.write_batch([_entry(f"prompt {i}", rows=64, width=256, seed=i) for i in range(16)])
        assert writer.env.info()["map_size"] > 64 << 10  # grew instead of failing
        assert len(writer.existing_keys()) == 16
    expected = _entry("prompt 3", rows=64, width=256, seed=3)
    with open_store(path) as store:
        assert len(store) == 16 and prompt_key("prompt 3") in store
        entry = store.get_by_prompt("prompt 3")
        assert entry is not None and entry.metadata["generation"] == "gen of prompt 3"
        assert np.array_equal(entry.arrays["layer_1"], expected.arrays["layer_1"])
        assert entry.arrays["layer_2"].flags.owndata  # get() copies: safe after the txn
        with store.view(prompt_key("prompt 3")) as views:
            assert np.array_equal(views["layer_2"], expected.arrays["layer_2"])
            assert not views["layer_2"].flags.owndata
        assert store.get_by_prompt("never logged") is None
        assert sorted(e.metadata["prompt"] for e in store) == sorted(
            f"prompt {i}" for i in range(16)
        )
        stats = store.stats()
    assert stats.entries == 16 and stats.with_activations == 16
    assert stats.arrays["layer_1"] == {
        "dtype": "float16",
        "width": (256,),
        "entries": 16,
        "positions": 1024,
    }


def test_other_provenance_is_refused_unless_mixing_is_allowed(tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch([_entry("a")])
    with ActivationStoreWriter(path, {**PROV, "created": 123.0}) as writer:  # same setup resumes
        assert writer.existing_keys() == {prompt_key("a")}
    other = {**PROV, "model": "org/model-b"}
    with pytest.raises(StoreError, match="model 'org/model-a' \\(store\\) != 'org/model-b'"):
        ActivationStoreWriter(path, other)
    with ActivationStoreWriter(path, other, allow_mixed=True) as writer:
        writer.write_batch([_entry("b")])
    with open_store(path) as store:
        assert sorted(r["model"] for r in store.provenance.values()) == [
            "org/model-a",
            "org/model-b",
        ]
        ids = {store.get_by_prompt(p).metadata["provenance_id"] for p in ("a", "b")}
        assert ids == set(store.provenance)


WEIGHTS_A = {"quantization": None, "weights_sha256": "a" * 64}


def test_other_weights_of_the_same_model_are_refused_unless_mixing_is_allowed(tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, {**PROV, **WEIGHTS_A}) as writer:
        writer.write_batch([_entry("a")])
    other = {**PROV, "quantization": "gptq 4-bit", "weights_sha256": "b" * 64}
    with pytest.raises(StoreError) as refused:
        ActivationStoreWriter(path, other)
    assert refused.value.message == (
        f"store {path} was written with other weights of model 'org/model-a': "
        "quantization none (store) != 'gptq 4-bit' (this run)"
    )
    assert "--allow-mixed" in refused.value.hint
    with pytest.raises(StoreError, match="weights_sha256 'aaaa.*' \\(store\\) != 'bbbb"):
        ActivationStoreWriter(path, {**PROV, **WEIGHTS_A, "weights_sha256": "b" * 64})
    with ActivationStoreWriter(path, other, allow_mixed=True) as writer:
        writer.write_batch([_entry("b")])
    with open_store(path) as store:
        by_pid = store.provenance
        pids = {p: store.get_by_prompt(p).metadata["provenance_id"] for p in ("a", "b")}
    assert len(by_pid) == 2 and pids["a"] != pids["b"]
    assert by_pid[pids["b"]]["weights_sha256"] == "b" * 64
    assert by_pid[pids["a"]]["weights_sha256"] == "a" * 64


def test_a_store_without_weights_fields_is_resumed_with_one_notice(tmp_path: Path, caplog):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV) as writer:  # an older tracekit's record
        writer.write_batch([_entry("a")])
    # and an id computed another way (older tracekit hashed fewer fields)
    edit_provenance_records(
        path, lambda records: {"0123456789abcdef": next(iter(records.values()))}
    )
    with (
        caplog.at_level("WARNING", logger="tracekit"),
        ActivationStoreWriter(path, {**PROV, **WEIGHTS_A}) as writer,
    ):
        writer.write_batch([_entry("b")])
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1
    assert "does not record which weights of org/model-a" in notices[0]
    with open_store(path) as store:
        assert list(store.provenance) == ["0123456789abcdef"]
        assert store.get_by_prompt("b").metadata["provenance_id"] == "0123456789abcdef"
    # the record that states its weights is checked again: same weights resume, quietly
    edit_provenance_records(
        path, lambda records: {k: {**r, **WEIGHTS_A} for k, r in records.items()}
    )
    caplog.clear()
    with (
        caplog.at_level("WARNING", logger="tracekit"),
        ActivationStoreWriter(path, {**PROV, **WEIGHTS_A}) as writer,
    ):
        assert writer.provenance_id == "0123456789abcdef"
    assert not caplog.records
    with pytest.raises(StoreError, match="other weights"):
        ActivationStoreWriter(path, {**PROV, **WEIGHTS_A, "weights_sha256": "c" * 64})


def test_merge_refuses_entries_pointing_at_undefined_provenance(tmp_path: Path):
    source, target = tmp_path / "src.lmdb", tmp_path / "dst.lmdb"
    with ActivationStoreWriter(source, PROV) as writer:
        writer.write_batch([_entry("a"), _entry("b")])
    with ActivationStoreWriter(target, PROV) as writer:
        assert writer.merge_from(source) == 2
    edit_provenance_records(
        source, lambda records: {"feedfacefeedface": next(iter(records.values()))}
    )
    fresh = tmp_path / "fresh.lmdb"
    with ActivationStoreWriter(fresh, PROV) as writer:
        with pytest.raises(StoreError) as refused:
            writer.merge_from(source)
        assert writer.existing_keys() == set()  # nothing copied
    assert refused.value.message.startswith(
        f"store {source} has entries whose provenance id is not among its provenance records "
        "(1 undefined id(s), e.g. "
    )


def test_paths_that_are_not_stores_are_one_clear_error(tmp_path: Path):
    with pytest.raises(StoreError, match="activation store not found"):
        open_store(tmp_path / "missing")
    afile = tmp_path / "file.lmdb"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is not an LMDB store \\(it is a file"):
        open_store(afile)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="is not an LMDB store \\(no data.mdb"):
        open_store(tmp_path / "dir")
    foreign = tmp_path / "foreign.lmdb"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:  # what the seed's logger wrote: pickles in the main DB
        txn.put(b"k", b"\x80\x04N.")
    env.close()
    with pytest.raises(StoreError, match="an LMDB database but not a tracekit activation store"):
        open_store(foreign)
    with pytest.raises(StoreError, match="not a tracekit activation store"):
        ActivationStoreWriter(foreign, PROV)


def test_corrupt_entry_raises_store_error_on_get(tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch([_entry("a")])
        with writer.env.begin(write=True) as txn:
            db = writer.env.open_db(b"activations", txn=txn)
            txn.put(prompt_key("a").encode(), b"TKA1garbage", db=db)
    with open_store(path) as store, pytest.raises(StoreError, match="is corrupt"):
        store.get_by_prompt("a")


# --- `tracekit log` / `log stats` without a model ----------------------------------------------
def _qa(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_log_stats_table_and_json(cli, tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch([_entry("a"), _entry("b")])
    result = cli("log", "stats", path)
    assert result.exit_code == 0, result.output
    assert "2 (2 with activations)" in result.output and "org/model-a" in result.output
    result = cli("log", "stats", path, "--json")
    data = json.loads(result.stdout)
    assert data["entries"] == 2 and data["arrays"]["layer_2"]["dtype"] == "float32"
    bad = cli("log", "stats", tmp_path / "nope")
    assert bad.exit_code == 1 and "activation store not found" in " ".join(bad.output.split())


def test_log_stats_names_the_weights_and_no_missing_revision(cli, tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    prov = {**PROV, "revision": None, "quantization": "gptq 4-bit", "weights_sha256": "ab" * 32}
    with ActivationStoreWriter(path, prov) as writer:
        writer.write_batch([_entry("a")])
    out = " ".join(cli("log", "stats", path).output.replace("│", " ").split())
    assert "model org/model-a (gptq 4-bit, sha256 abababababab), layers [1, 2]" in out, out
    assert "revision" not in out


def test_log_refuses_a_store_from_another_model_before_loading_it(cli, tmp_path: Path):
    path = tmp_path / "acts.lmdb"
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch([_entry("a")])
    qa = _qa(tmp_path, ['{"prompt": "q"}'])
    result = cli("log", "--qa", qa, "--lmdb", path)
    assert result.exit_code == 1
    assert (
        "was written by another setup: model 'org/model-a' (store) != "
        "'HuggingFaceTB/SmolLM2-135M-Instruct' (this run)" in " ".join(result.output.split())
    )


@pytest.mark.parametrize(
    ("lines", "extra", "fragment", "code"),
    [
        (['{"prompt": "q"}', '{"prompt": '], [], "qa.jsonl line 2: not valid JSON", 1),
        (['{"prompt": "q"}', "[1]"], [], "qa.jsonl line 2: not a JSON object", 1),
        (['{"question": "q"}'], [], "qa.jsonl line 1: no text field 'prompt'", 1),
        (['{"prompt": "q"}'], ["--prompt-template", "Q: A:"], "has no {question} placeholder", 2),
        (['{"prompt": "q"}'], ["--sequence-mode", "tokens"], "--sequence-mode", 2),
    ],
)
def test_log_bad_input_is_one_line(cli, tmp_path: Path, lines, extra, fragment, code):
    result = cli("log", "--qa", _qa(tmp_path, lines), "--lmdb", tmp_path / "s.lmdb", *extra)
    assert result.exit_code == code, result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "s.lmdb").exists()


def test_log_on_a_path_that_is_not_a_store(cli, tmp_path: Path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    result = cli("log", "--qa", _qa(tmp_path, ['{"prompt": "q"}']), "--lmdb", notes)
    assert result.exit_code == 1
    assert "is not an LMDB store (no data.mdb inside)" in " ".join(result.output.split())


def test_a_store_killed_before_its_first_commit_counts_as_empty(tmp_path: Path):
    # a log run SIGKILLed between creating data.mdb and its first transaction (found by the
    # crash test) left a store that the next run refused as "not a tracekit activation store"
    from tracekit.jobs.log import LogConfig, _precheck_store
    from tracekit.models.loading import ModelConfig
    from tracekit.storage.activation_store import nothing_committed

    path = tmp_path / "acts.lmdb"
    lmdb.open(str(path), max_dbs=4, map_size=1 << 20).close()
    assert nothing_committed(path)
    config = LogConfig(qa=tmp_path / "qa.jsonl", lmdb=path)
    _precheck_store(config, ModelConfig())  # no error: an empty store
    with ActivationStoreWriter(path, PROV) as writer:
        writer.write_batch([_entry("a")])
    assert not nothing_committed(path)
