"""`tracekit reconstruct` over stores written by the store writer (no model needed)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tracekit.actlog.prompts import DEFAULT_TEMPLATE, format_prompt
from tracekit.storage.activation_store import ActivationStoreWriter, PendingEntry, prompt_key

QUESTIONS = ["Who played Sarah Packard?", "What is the capital of France?", "Name a color."]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _meta(prompt: str, i: int) -> dict:
    return {
        "prompt": prompt,
        "generation": f"answer {i}",
        "model": "org/model",
        "input_length": 10 + i,
        "timestamp": 1700000000.5 + i,
        "messages": None,
        "trim_position": i,
        "finish_reason": "eos",
    }


def _store(path: Path, questions=QUESTIONS, template=DEFAULT_TEMPLATE, record_template=True):
    provenance = {
        "model": "org/model",
        "prompt_format": "template",
        "prompt_template": template if record_template else None,
    }
    with ActivationStoreWriter(path, provenance) as writer:
        entries = []
        for i, question in enumerate(questions):
            prompt = format_prompt(template, question)
            entries.append(
                PendingEntry(prompt_key(prompt), _meta(prompt, i), {"layer_3": np.ones((2, 4))})
            )
        writer.write_batch(entries)
    return writer


def _qa(path: Path, questions, extra_lines=()) -> Path:
    rows = [
        json.dumps({"index": i, "prompt": q, "answer": f"a{i}"}) for i, q in enumerate(questions)
    ]
    path.write_text("\n".join([*rows, *extra_lines]) + "\n")
    return path


def _run(cli, tmp_path: Path, *extra: str):
    return cli(
        "reconstruct",
        "--qa_output_path",  # the seed's spelling
        tmp_path / "qa.jsonl",
        "--lmdb_path",
        tmp_path / "acts.lmdb",
        "--output_path",
        tmp_path / "out.jsonl",
        *extra,
    )


def test_matches_by_hash_and_writes_qa_fields_plus_generation(cli, tmp_path: Path):
    _store(tmp_path / "acts.lmdb", QUESTIONS[:2])
    _qa(tmp_path / "qa.jsonl", [*QUESTIONS, QUESTIONS[0]])  # one unmatched, one repeated row
    result = _run(cli, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert {k: stats[k] for k in ("qa_rows", "store_entries", "matched", "qa_unmatched")} == {
        "qa_rows": 4,
        "store_entries": 2,
        "matched": 3,
        "qa_unmatched": 1,
    }
    assert stats["store_unmatched"] == 0 and stats["corrupted"] == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 3]
    assert rows[1] == {
        "index": 1,
        "prompt": QUESTIONS[1],
        "answer": "a1",
        "generation": "answer 1",
        "model": "org/model",
        "input_length": 11,
        "timestamp": 1700000000.5 + 1,
        "messages": None,
        "trim_position": 1,
    }
    again = _run(cli, tmp_path)
    assert again.exit_code == 1 and "output already exists" in again.output
    assert _run(cli, tmp_path, "--force").exit_code == 0


def test_statistics_table(cli, tmp_path: Path):
    _store(tmp_path / "acts.lmdb", QUESTIONS)
    _qa(tmp_path / "qa.jsonl", QUESTIONS[1:])
    result = _run(cli, tmp_path)
    assert result.exit_code == 0, result.output
    flat = _flat(result.output)
    for label, value in [
        ("QA rows", 2),
        ("store entries", 3),
        ("matched (rows written)", 2),
        ("QA rows unmatched", 0),
        ("store entries unmatched", 1),
        ("corrupted entries skipped", 0),
    ]:
        assert f"{label} │ {value} │" in flat


def test_zero_matches_shows_closest_prompt_and_fails(cli, tmp_path: Path):
    _store(tmp_path / "acts.lmdb", QUESTIONS)
    _qa(tmp_path / "qa.jsonl", QUESTIONS)
    result = _run(cli, tmp_path, "--prompt-template", "Q: {question}\nA:")
    assert result.exit_code == 1
    flat = _flat(result.output)
    assert "first QA prompt as formatted: 'Q: Who played Sarah Packard?\\nA:'" in flat
    assert (
        "closest prompt in the store: 'user: Answer in one sentence. "
        "Q:Who played Sarah Packard?\\n A:'" in flat
    )
    assert "error: no QA row matched an entry of" in flat
    assert not (tmp_path / "out.jsonl").exists()


def test_default_template_comes_from_the_store_then_the_seed(cli, tmp_path: Path):
    custom = "Question: {question}\nAnswer:"
    _store(tmp_path / "acts.lmdb", QUESTIONS, template=custom)
    _qa(tmp_path / "qa.jsonl", QUESTIONS)
    result = _run(cli, tmp_path, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["matched"] == 3
    assert "Question: {question}" in json.loads(result.stdout)["prompt_format"]


def test_corrupt_entries_and_entries_without_activations_are_skipped(cli, tmp_path: Path):
    writer = _store(tmp_path / "acts.lmdb", QUESTIONS)
    env = writer.env.__class__(str(tmp_path / "acts.lmdb"), max_dbs=4)
    acts, meta = env.open_db(b"activations"), env.open_db(b"meta")
    keys = [prompt_key(format_prompt(DEFAULT_TEMPLATE, q)).encode() for q in QUESTIONS]
    with env.begin(write=True) as txn:
        txn.put(keys[0], b"{not json", db=meta)  # unreadable metadata
        txn.put(keys[1], b"TKA1\xff\xff\xff\xff", db=acts)  # unreadable activations header
        txn.put(b"f" * 64, json.dumps({"prompt": "x"}).encode(), db=meta)  # key != sha256(prompt)
        txn.put(prompt_key("lonely").encode(), json.dumps({"prompt": "lonely"}).encode(), db=meta)
    env.close()
    _qa(tmp_path / "qa.jsonl", QUESTIONS)
    result = _run(cli, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (stats["store_entries"], stats["corrupted"], stats["without_activations"]) == (5, 3, 1)
    assert (stats["matched"], stats["qa_unmatched"], stats["store_unmatched"]) == (1, 2, 0)
    rows = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(r)["index"] for r in rows] == [2]


@pytest.mark.parametrize(
    ("extra_line", "args", "code", "fragment"),
    [
        ("{oops", [], 1, "qa.jsonl line 4: not valid JSON"),
        ("{oops", ["--skip-bad-lines"], 0, None),
        ('{"prompt": 1}', [], 1, "qa.jsonl line 4: no text field 'prompt'"),
        (None, ["--prompt-template", "no placeholder"], 2, "has no {question} placeholder"),
    ],
)
def test_bad_input(cli, tmp_path: Path, extra_line, args, code, fragment):
    _store(tmp_path / "acts.lmdb", QUESTIONS)
    _qa(tmp_path / "qa.jsonl", QUESTIONS, [extra_line] if extra_line else [])
    result = _run(cli, tmp_path, *args, "--json")
    assert result.exit_code == code, result.output
    if fragment:
        assert fragment in _flat(result.output)
    else:
        stats = json.loads(result.stdout)
        assert stats["bad_lines"] == 1 and stats["matched"] == 3


def test_store_path_that_is_not_a_store(cli, tmp_path: Path):
    _qa(tmp_path / "qa.jsonl", QUESTIONS)
    (tmp_path / "acts.lmdb").write_text("not a store")
    result = _run(cli, tmp_path)
    assert result.exit_code == 1 and "is not an LMDB store" in _flat(result.output)


def test_options_from_a_config_file_and_cli_overrides(cli, tmp_path: Path):
    _store(tmp_path / "acts.lmdb", QUESTIONS)
    _qa(tmp_path / "qa.jsonl", QUESTIONS)
    config = tmp_path / "tracekit.toml"
    config.write_text(
        f'[reconstruct]\nqa_output_path = "{tmp_path / "qa.jsonl"}"\n'
        f'lmdb-path = "{tmp_path / "acts.lmdb"}"\nprompt_template = "Q: {{question}}"\n'
    )
    out = tmp_path / "from-config.jsonl"
    miss = cli("reconstruct", "--config", config, "--output-path", out)
    assert miss.exit_code == 1 and "no QA row matched" in _flat(miss.output)  # file's template
    hit = cli(
        "reconstruct", "--config", config, "--output-path", out,
        "--prompt-template", DEFAULT_TEMPLATE,
    )  # fmt: skip
    assert hit.exit_code == 0, hit.output
    assert len(out.read_text().splitlines()) == 3
