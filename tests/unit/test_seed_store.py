"""The seed's LMDB activation store (seed 003): prompt-hash keys in the main database, values
holding JSON metadata or a pickled ``{activations, metadata}`` dict. ``reconstruct`` and
``log stats`` read it (pickles only through the restricted unpickler, or ``--allow-pickle``),
with the same statistics and output as for a tracekit store holding the same entries."""

import json
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tracekit.actlog.prompts import DEFAULT_TEMPLATE, format_prompt
from tracekit.storage.activation_store import ActivationStoreWriter, PendingEntry, prompt_key
from tracekit.storage.restricted_pickle import UnsafePickleError, restricted_loads

QUESTIONS = ["Who played Sarah Packard?", "What is the capital of France?", "Name a color."]
STAT_FIELDS = (
    "qa_rows",
    "store_entries",
    "matched",
    "qa_unmatched",
    "store_unmatched",
    "corrupted",
    "without_activations",
)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _seed_meta(i: int) -> dict:
    """Metadata as the seed's logger kept it (seed 003's output fields)."""
    return {
        "generation": f"answer {i}",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "input_length": 15 + i,
        "timestamp": 1703123456.789 + i,
    }


def _key(question: str) -> bytes:
    return prompt_key(format_prompt(DEFAULT_TEMPLATE, question)).encode()


def _seed_store(path: Path, values: dict[bytes, bytes]) -> Path:
    """An LMDB environment written as the seed's logger wrote it: the main database only."""
    env = lmdb.open(str(path), map_size=16 << 20)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()
    return path


def _json_values(questions=QUESTIONS) -> dict[bytes, bytes]:
    return {_key(q): json.dumps(_seed_meta(i)).encode() for i, q in enumerate(questions)}


def _pickled_values(questions=QUESTIONS, protocol=pickle.DEFAULT_PROTOCOL) -> dict[bytes, bytes]:
    return {
        _key(q): pickle.dumps(
            {
                "activations": {"layer_16": np.full((4 + i, 8), i, dtype=np.float16)},
                "metadata": _seed_meta(i),
            },
            protocol=protocol,
        )
        for i, q in enumerate(questions)
    }


def _tracekit_store(path: Path, questions=QUESTIONS) -> Path:
    """A tracekit store holding the same entries (the reference for statistics and output)."""
    with ActivationStoreWriter(path, {"model": "meta-llama/Llama-3.1-8B-Instruct"}) as writer:
        writer.write_batch(
            [
                PendingEntry(
                    _key(q).decode(),
                    {**_seed_meta(i), "prompt": format_prompt(DEFAULT_TEMPLATE, q)},
                    {"layer_16": np.full((4 + i, 8), i, dtype=np.float16)},
                )
                for i, q in enumerate(questions)
            ]
        )
    return path


def _qa(path: Path) -> Path:
    rows = [
        json.dumps({"index": i, "prompt": q, "answer": f"a{i}"}) for i, q in enumerate(QUESTIONS)
    ]
    rows.append(json.dumps({"index": 3, "prompt": "Not logged?", "answer": "-"}))
    path.write_text("\n".join(rows) + "\n")
    return path


def _reconstruct(cli, tmp_path: Path, store: Path, *extra: str):
    out = tmp_path / f"{store.name}.jsonl"
    result = cli(
        "reconstruct", "--qa_output_path", _qa(tmp_path / "qa.jsonl"), "--lmdb_path", store,
        "--output_path", out, "--json", *extra,
    )  # fmt: skip
    return result, out


@pytest.mark.parametrize("values", [_json_values, _pickled_values], ids=["json", "pickle"])
def test_reconstruct_reads_a_seed_store_like_a_tracekit_one(cli, tmp_path: Path, values):
    seed = _seed_store(tmp_path / "seed.lmdb", values())
    ours = _tracekit_store(tmp_path / "ours.lmdb")
    result, out = _reconstruct(cli, tmp_path, seed)
    assert result.exit_code == 0, result.output
    reference, reference_out = _reconstruct(cli, tmp_path, ours)
    assert reference.exit_code == 0, reference.output
    stats, expected = json.loads(result.stdout), json.loads(reference.stdout)
    assert {k: stats[k] for k in STAT_FIELDS} == {k: expected[k] for k in STAT_FIELDS}
    assert (stats["matched"], stats["qa_unmatched"]) == (3, 1)
    assert out.read_text() == reference_out.read_text()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[1]["generation"] == "answer 1" and rows[1]["timestamp"] == 1703123457.789


def test_pickles_of_every_protocol_load_through_the_restricted_unpickler(cli, tmp_path: Path):
    for protocol in (2, 3, 4, 5):
        store = _seed_store(tmp_path / f"p{protocol}.lmdb", _pickled_values(protocol=protocol))
        result, _ = _reconstruct(cli, tmp_path, store)
        assert result.exit_code == 0, (protocol, result.output)
        assert json.loads(result.stdout)["matched"] == 3


def test_log_stats_on_a_seed_store(cli, tmp_path: Path):
    values = {**_pickled_values(QUESTIONS[:2]), **_json_values(QUESTIONS[2:])}
    store = _seed_store(tmp_path / "seed.lmdb", values)
    result = cli("log", "stats", store, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "seed-003-lmdb"
    assert (data["entries"], data["with_activations"]) == (3, 1 + 1)
    assert data["arrays"]["layer_16"] == {
        "dtype": "float16",
        "width": [8],
        "entries": 2,
        "positions": 4 + 5,
    }
    table = cli("log", "stats", store)
    assert table.exit_code == 0 and "seed-003-lmdb" in table.output


class _Exploit:
    """A pickle that runs a shell command when loaded (what a hostile store could hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("verb", ["reconstruct", "log stats"])
def test_a_malicious_pickle_is_refused_and_never_run(cli, tmp_path: Path, verb):
    marker = tmp_path / "pwned"
    values = _pickled_values()
    values[_key(QUESTIONS[1])] = pickle.dumps(
        {"activations": None, "metadata": {"generation": _Exploit(marker)}}
    )
    store = _seed_store(tmp_path / "seed.lmdb", values)
    if verb == "reconstruct":
        result, out = _reconstruct(cli, tmp_path, store)
        assert not out.exists()
    else:
        result = cli("log", "stats", store)
    assert result.exit_code == 1
    text = _flat(result.output)
    assert f"entry {_key(QUESTIONS[1]).decode()}" in text and "posix.system" in text
    assert "--allow-pickle" in text and "Traceback" not in result.output
    assert not marker.exists()


def test_other_classes_are_refused_by_name_and_loaded_with_allow_pickle(cli, tmp_path: Path):
    import torch

    values = {
        _key(q): pickle.dumps({"activations": torch.ones(2, 4), "metadata": _seed_meta(i)})
        for i, q in enumerate(QUESTIONS)
    }
    store = _seed_store(tmp_path / "seed.lmdb", values)
    refused, out = _reconstruct(cli, tmp_path, store)
    assert refused.exit_code == 1 and "torch._utils._rebuild_tensor_v2" in _flat(refused.output)
    allowed, out = _reconstruct(cli, tmp_path, store, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["matched"] == 3 and out.is_file()


def test_corrupt_values_are_counted_like_a_tracekit_stores(cli, tmp_path: Path):
    values = _json_values()
    values[_key(QUESTIONS[0])] = b"{not json"
    values[_key(QUESTIONS[1])] = pickle.dumps({"metadata": _seed_meta(1)})[:-5]  # truncated
    values[prompt_key("x").encode()] = json.dumps({"prompt": "y", "generation": "g"}).encode()
    store = _seed_store(tmp_path / "seed.lmdb", values)
    result, _ = _reconstruct(cli, tmp_path, store)
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (stats["store_entries"], stats["corrupted"], stats["matched"]) == (4, 3, 1)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_builds_arrays_scalars_and_containers(protocol):
    value = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": [np.float64(1.5), np.int64(3), b"raw", (1, "x"), {2, 3}, frozenset({4}), 1 + 2j],
        "c": np.array(["s", "t"]),
    }
    loaded = restricted_loads(pickle.dumps(value, protocol=protocol))
    assert np.array_equal(loaded["a"], value["a"]) and loaded["a"].dtype == np.float32
    assert loaded["b"] == value["b"] and loaded["c"].tolist() == ["s", "t"]


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (b"cos\nsystem\n(S'true'\ntR.", "os.system"),
        (b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval"),
        (b"cbuiltins\ngetattr\n.", "builtins.getattr"),
        (b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.", "rot13"),
        (pickle.dumps(np.array([object()], dtype=object)), "builtins.object"),
    ],
)
def test_restricted_unpickler_refuses_anything_else_by_name(payload, named):
    with pytest.raises(UnsafePickleError, match=named.replace(".", r"\.")):
        restricted_loads(payload)
