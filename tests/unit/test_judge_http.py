"""The openai backend against a real chat-completions server on 127.0.0.1 (tests/judge_server.py):
exact scores from known logprobs, retries on injected faults, Retry-After, bounded attempts,
the cache, the API key never leaking, and one clear line for each bad input."""

import csv
import itertools
import json
import socket

import pytest

from judge_server import JudgeServer
from tracekit.console import err_console, out_console
from tracekit.judge import JudgeConfig, judge_rows

TEMPLATE = "Rate this.\nQuestion: {question}\nAnswer: {answer}\nScore:"
SECRET = "sk-test-SECRET-4242-do-not-leak"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No judge settings from the developer's shell; no rich wrapping of long messages."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "TRACEKIT_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(err_console, "width", 1000)
    monkeypatch.setattr(out_console, "width", 1000)


@pytest.fixture()
def server():
    with JudgeServer(slow_s=1.0) as srv:
        yield srv


def fast(server, tmp_path, **overrides):
    """A config with short timeouts and tiny backoff so fault tests stay fast."""
    values = {
        "backend": "openai",
        "base_url": server.base_url,
        "timeout": 0.3,
        "max_attempts": 4,
        "backoff": 0.01,
        "backoff_max": 0.02,
        "cache": tmp_path / "cache.sqlite",
    }
    values.update(overrides)
    return JudgeConfig(**values)


def row(script: str, question: str = "q") -> dict:
    return {"id": script, "question": question, "response": f"<<{script}>>"}


def test_exact_scores_through_every_fault_and_no_row_lost(server, tmp_path):
    rows = [
        row("lp=85:0.5,90:0.25,Hi:0.25"),
        row("lp=10:0.6,20:0.2;fault=429x2;ra=0"),
        row("lp=50:1.0;fault=500"),
        row("lp=30:0.5,40:0.5;fault=503x2"),
        row("lp=70:0.9;fault=slow"),
        row("lp=0:0.4,100:0.4;fault=badjson"),
        row("lp=60:0.3;fault=shape"),
        row("fault=drop"),
        row("text=Score: 64;nolp"),
        row("lp=REF:0.9,5:0.1"),
        row("lp=The:0.9,5:0.1"),
        row("digits=85:0.75,90:0.25"),
    ]
    # 0.6 s: still below the slow fault's 1 s, with room for a loaded machine (every retry
    # is counted below, so a timeout that only the load caused would fail the test)
    config = fast(server, tmp_path, timeout=0.6)
    result = judge_rows(rows, config, trait_prompt=TEMPLATE)
    by_id = {r["id"]: r for r in result.rows}
    assert len(result.rows) == len(rows) and [r["id"] for r in result.rows] == [
        r["id"] for r in rows
    ]
    expected_scores = {
        "lp=85:0.5,90:0.25,Hi:0.25": (85 * 0.5 + 90 * 0.25) / 0.75,
        "lp=10:0.6,20:0.2;fault=429x2;ra=0": 12.5,
        "lp=50:1.0;fault=500": 50.0,
        "lp=30:0.5,40:0.5;fault=503x2": 35.0,
        "lp=70:0.9;fault=slow": 70.0,
        "lp=0:0.4,100:0.4;fault=badjson": 50.0,
        "lp=60:0.3;fault=shape": 60.0,
        "fault=drop": 50.0,
    }
    for key, score in expected_scores.items():
        got = by_id[key]
        assert (got["trait_status"], got["trait_method"]) == ("ok", "logprobs"), key
        assert got["trait_score"] == pytest.approx(score), key
    assert by_id["lp=85:0.5,90:0.25,Hi:0.25"]["trait_mass"] == pytest.approx(0.75)
    text = by_id["text=Score: 64;nolp"]
    assert (text["trait_score"], text["trait_method"], text["trait_mass"]) == (64, "text", None)
    assert by_id["lp=REF:0.9,5:0.1"]["trait_status"] == "refused"
    low = by_id["lp=The:0.9,5:0.1"]
    assert (low["trait_status"], low["trait_score"], low["trait_mass"]) == (
        "low_mass",
        None,
        pytest.approx(0.1),
    )
    split = by_id["digits=85:0.75,90:0.25"]  # a digit-splitting judge, asked for the 2nd digit
    assert (split["trait_score"], split["trait_method"]) == (pytest.approx(86.25), "digits")
    assert split["trait_mass"] == pytest.approx(1.0)
    counts = result.summary.metrics["trait"]
    assert (counts.scored, counts.refused, counts.low_mass, counts.failed) == (10, 1, 1, 0)
    assert counts.methods == {"logprobs": 8, "text": 1, "digits": 1}
    assert result.summary.notes() == [
        "trait: 1 by text, 1 by digits (the other 8 by logprobs): see the method column"
    ]
    assert counts.retries == 2 + 1 + 2 + 1 + 1 + 1 + 1, {
        k[-40:]: v for k, v in server.attempts.items()
    }  # 429x2 500 503x2 slow json shape drop
    # the digit row: the template once, then the next token after "8" and after "9"; the two
    # rows whose only number is a lone "5": one next-digit request each (it may be split)
    assert counts.requests == len(rows) + counts.retries + 3 + 2 == server.requests
    assert (low["trait_method"], by_id["lp=REF:0.9,5:0.1"]["trait_method"]) == ("digits",) * 2
    sent = server.log[0]["body"]
    assert (sent["model"], sent["logprobs"], sent["top_logprobs"], sent["temperature"]) == (
        "gpt-4.1-mini",
        True,
        20,
        0,
    )
    assert sent["messages"][0]["content"].startswith("Rate this.\nQuestion: q\nAnswer: <<")


def test_retry_after_is_honoured(server, tmp_path):
    result = judge_rows(
        [row("lp=50:1.0;fault=429;ra=0.4")], fast(server, tmp_path), trait_prompt=TEMPLATE
    )
    assert result.rows[0]["trait_score"] == 50
    first, second = (entry["time"] for entry in server.log)
    assert second - first >= 0.35  # the backoff alone would wait at most 0.02 s


def test_a_server_rejecting_logprobs_is_asked_without_them(tmp_path):
    with JudgeServer(reject_logprobs=True) as server:
        rows = [row("text=72;nolp"), row("text=I'm sorry, I can't;nolp"), row("text=5;nolp")]
        config = fast(server, tmp_path, concurrency=1)
        result = judge_rows(rows, config, trait_prompt=TEMPLATE)
        got = [(r["trait_score"], r["trait_status"], r["trait_method"]) for r in result.rows]
        assert got == [(72, "ok", "text"), (None, "refused", "text"), (5, "ok", "text")]
        # one rejected request, then none with logprobs
        assert [bool(e["body"].get("logprobs")) for e in server.log] == [True] + [False] * 3


def test_concurrency_limit_holds(tmp_path):
    with JudgeServer(latency=0.05) as server:
        rows = [row(f"lp={n}:1.0") for n in range(8)]
        result = judge_rows(rows, fast(server, tmp_path, concurrency=2), trait_prompt=TEMPLATE)
        assert [r["trait_score"] for r in result.rows] == list(range(8))
        assert server.max_in_flight <= 2


def write_csv(path, rows, columns=("id", "question", "instruction", "prompt", "response")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, f"{c}-{r['id']}") for c in columns})


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def cli_args(server, tmp_path, *extra):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEMPLATE)
    return [
        "judge",
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--eval-prompt",
        prompt,
        "--timeout",
        "0.3",
        "--max-attempts",
        "3",
        "--backoff",
        "0.01",
        "--cache",
        tmp_path / "cache.sqlite",
        *extra,
    ]


def test_cli_in_place_then_rerun_is_all_cache_hits(cli, server, tmp_path):
    data = tmp_path / "pos.csv"
    rows = [row("lp=20:0.5,40:0.5"), row("lp=90:1.0", question='a "quoted", multi\nline q')]
    write_csv(data, rows)
    before = read_csv(data)
    result = cli(*cli_args(server, tmp_path, "--input", data))
    assert result.exit_code == 0, result.output
    after = read_csv(data)
    assert [r["trait_score"] for r in after] == ["30.0", "90.0"]
    assert [r["trait_status"] for r in after] == ["ok", "ok"]
    for old, new in zip(before, after, strict=True):  # generate's columns are untouched
        assert {k: new[k] for k in old} == old
    assert list(after[0])[:5] == ["id", "question", "instruction", "prompt", "response"]
    meta = json.loads((tmp_path / "pos.csv.judge.json").read_text())
    assert meta["judge"]["judge_model"] == "gpt-4.1-mini" and meta["total"]["scored"] == 2
    assert server.requests == 2
    again = cli(*cli_args(server, tmp_path, "--input", data, "--json"))
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["total"]["cache_hits"] == 2 and summary["total"]["requests"] == 0
    assert server.requests == 2  # the rerun sent nothing
    assert read_csv(data) == after


def test_cli_failed_rows_are_kept_and_set_the_exit_code(cli, server, tmp_path):
    data = tmp_path / "r.csv"
    write_csv(data, [row("lp=10:1.0"), row("fault=500x99"), row("lp=30:1.0")])
    out = tmp_path / "judged.csv"
    result = cli(*cli_args(server, tmp_path, "--input", data, "--output", out))
    assert result.exit_code == 1
    assert "error: 1 judgment(s) failed" in result.output
    judged = read_csv(out)
    assert [r["trait_status"] for r in judged] == ["ok", "failed: HTTP 500 after 3 attempts", "ok"]
    assert [r["trait_score"] for r in judged] == ["10.0", "", "30.0"]
    assert server.requests == 2 + 3
    exists = cli(*cli_args(server, tmp_path, "--input", data, "--output", out))
    assert exists.exit_code == 1 and "output already exists" in exists.output
    # the retry of a failed row goes to the server again; the others come from the cache
    allowed = cli(
        *cli_args(server, tmp_path, "--input", data, "--output", out, "--force", "--allow-failures")
    )
    assert allowed.exit_code == 0, allowed.output
    assert server.requests == 5 + 3


def test_jsonl_with_other_column_names_and_coherence(cli, server, tmp_path):
    data = tmp_path / "r.jsonl"
    data.write_text(
        json.dumps({"q": "why?", "a": "<<lp=75:1.0>>", "n": 3})
        + "\n\n"
        + json.dumps({"q": "how?", "a": "<<lp=25:1.0>>", "n": 4})
        + "\n"
    )
    options = tmp_path / "judge.toml"
    options.write_text('[judge]\nquestion_column = "q"\nresponse-column = "a"\nmetrics = "trait"\n')
    # the config file supplies the column names; the flag overrides its metrics
    result = cli(
        *cli_args(server, tmp_path, "--input", data, "--config", options),
        "--metrics",
        "trait,coherence",
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(r["n"], r["trait_score"], r["coherence_score"]) for r in lines] == [
        (3, 75.0, 75.0),
        (4, 25.0, 25.0),
    ]
    prompts = [entry["body"]["messages"][0]["content"] for entry in server.log]
    assert sum("coherence" in p for p in prompts) == 2 and server.requests == 4


def test_api_key_is_sent_but_never_written_anywhere(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with JudgeServer(api_key=SECRET) as server:
        data = tmp_path / "r.csv"
        write_csv(data, [row("lp=40:1.0"), row("lp=60:1.0;fault=429")])
        result = cli("-vv", *cli_args(server, tmp_path, "--input", data, "--json"))
        assert result.exit_code == 0, result.output
        assert {entry["auth"] for entry in server.log} == {f"Bearer {SECRET}"}
        assert SECRET not in result.output
        assert "retry 1" in result.output  # debug logging was on, and still no key in it
        # wrong key: the server echoes it back in its error body; tracekit must not print it
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-KEY-999")
        wrong = cli(*cli_args(server, tmp_path, "--input", data, "--no-cache"))
        assert wrong.exit_code == 1
        assert (
            "rejected the API key (HTTP 401): the key in $OPENAI_API_KEY is wrong or missing"
            in (wrong.output)
        )
        assert "sk-wrong-KEY-999" not in wrong.output
        monkeypatch.delenv("OPENAI_API_KEY")
        missing = cli(*cli_args(server, tmp_path, "--input", data, "--no-cache"))
        assert missing.exit_code == 1 and "is wrong or missing" in missing.output
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"r.csv", "r.csv.judge.json", "cache.sqlite"}
    for path in written:
        content = path.read_bytes()
        assert SECRET.encode() not in content and b"sk-wrong-KEY-999" not in content, path


def test_unreachable_server_is_one_line(cli, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path / "r.csv"
    write_csv(data, [row("lp=40:1.0")])
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEMPLATE)
    result = cli(
        "judge",
        "--input",
        data,
        "--eval-prompt",
        prompt,
        "--base-url",
        f"http://127.0.0.1:{port}/v1",
        "--max-attempts",
        "2",
        "--backoff",
        "0.01",
        "--no-cache",
    )
    assert result.exit_code == 1
    assert (
        f"error: cannot reach the judge server at http://127.0.0.1:{port}/v1/chat/completions"
        in (result.output)
    )


def test_bad_inputs_are_one_clear_line(cli, server, tmp_path):
    data = tmp_path / "r.csv"
    write_csv(data, [{"id": "1", "question": "q"}], columns=("id", "question", "answer"))
    missing = cli(*cli_args(server, tmp_path, "--input", data))
    assert missing.exit_code == 1
    assert f"error: {data} has no column 'response' (columns: id, question, answer)" in (
        missing.output
    )
    assert "--response-column" in missing.output
    write_csv(data, [row("lp=1:1")])
    unknown = cli("judge", "--input", data, "--trait", "nope", "--base-url", server.base_url)
    assert unknown.exit_code == 1 and "error: unknown trait 'nope'" in unknown.output
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result = cli(*cli_args(server, tmp_path, "--input", empty))
    assert result.exit_code == 1 and f"error: input file {empty} is empty" in result.output
    empty.write_text("question,response\n")
    result = cli(*cli_args(server, tmp_path, "--input", empty))
    assert result.exit_code == 1 and f"error: input file {empty} has no rows" in result.output
    bad = cli(*cli_args(server, tmp_path, "--input", data, "--metrics", "trait,style"))
    assert bad.exit_code == 2 and "unknown metric 'style'" in bad.output
    assert server.requests == 0


def test_existing_judge_columns_keep_their_place(cli, server, tmp_path):
    data = tmp_path / "r.csv"
    columns = ("id", "question", "response", "trait_score", "extra")
    write_csv(data, [{**row("lp=33:1.0"), "trait_score": ""}], columns=columns)
    result = cli(*cli_args(server, tmp_path, "--input", data))
    assert result.exit_code == 0, result.output
    judged = read_csv(data)
    assert list(judged[0]) == [*columns, "trait_mass", "trait_status", "trait_method"]
    assert (judged[0]["trait_score"], judged[0]["extra"]) == ("33.0", "extra-lp=33:1.0")


def test_a_run_stopped_midway_keeps_every_answer_it_got(server, tmp_path):
    from tracekit.errors import JudgeError

    rows = [row(f"lp={n}:1.0") for n in range(20, 23)] + [row("lp=50:1.0;fault=401")]
    rows += [row(f"lp={n}:1.0") for n in range(10, 13)]
    config = fast(server, tmp_path, concurrency=1)
    with pytest.raises(JudgeError, match="rejected the API key"):
        judge_rows(rows, config, trait_prompt=TEMPLATE)
    assert server.requests == 4  # three answers, then the stop
    result = judge_rows(rows, config, trait_prompt=TEMPLATE)
    assert result.summary.metrics["trait"].cache_hits == 3
    assert server.requests == 4 + 4  # only the four not answered before
    assert [r["trait_score"] for r in result.rows] == [20, 21, 22, 50, 10, 11, 12]


def test_progress_counts_cached_and_duplicate_rows_once_each(server, tmp_path):
    config = fast(server, tmp_path)
    judge_rows([row("lp=40:1.0")], config, trait_prompt=TEMPLATE)  # cached for the run below
    rows = [row("lp=40:1.0"), row("lp=60:1.0"), row("lp=60:1.0"), row("lp=80:1.0")]
    calls: list[tuple[int, int]] = []
    result = judge_rows(
        rows,
        config,
        trait_prompt=TEMPLATE,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [r["trait_score"] for r in result.rows] == [40, 60, 60, 80]
    assert server.requests == 1 + 2  # the duplicate pair is asked once
    # the cached row before any request, then one call per answer: the pair's answer counts
    # both of its rows
    assert calls[0] == (1, 4) and calls[-1] == (4, 4) and len(calls) == 3
    assert sorted(b[0] - a[0] for a, b in itertools.pairwise(calls)) == [1, 2]


# --- digit-splitting judges (SmolLM2, Qwen, Gemma, Mistral, Llama-2 tokenizers) --------------
DIGIT_ROWS = {
    # whole-number distribution the imitated model answers with -> (expected score, mass)
    "digits=85:0.6,90:0.3,7:0.1": (0.6 * 85 + 0.3 * 90 + 0.1 * 7, 1.0),
    "digits=100:0.5,10:0.25,1:0.25": ((50 + 2.5 + 0.25) / 1.0, 1.0),
    "digits=0:0.2,3:0.1,31:0.3,5:0.1,55:0.1": ((0 + 0.3 + 9.3 + 0.5 + 5.5) / 0.8, 0.8),
    # greedy answer "4" alone: the first-token rule would say 5.2 (the mean of 4, 7 and 8)
    "digits=4:0.35,48:0.3,79:0.2,8:0.15": (1.4 + 14.4 + 15.8 + 1.2, 1.0),
}


@pytest.mark.parametrize(("template", "shape"), [("apply", "legacy"), ("tokenize", "content")])
def test_digit_split_judge_gets_whole_number_probabilities(tmp_path, template, shape):
    """First-token alternatives "8", "9", "7" (no multi-digit number): tracekit asks the
    server for the next token after each first digit (and after "10") and scores the exact
    mean over whole numbers, not the mean of the first digits (the silent 0-9 scale)."""
    with JudgeServer(template=template, completions_shape=shape) as server:
        rows = [row(script) for script in DIGIT_ROWS]
        result = judge_rows(rows, fast(server, tmp_path), trait_prompt=TEMPLATE)
        for got in result.rows:
            score, mass = DIGIT_ROWS[got["id"]]
            assert (got["trait_status"], got["trait_method"]) == ("ok", "digits"), got
            assert got["trait_score"] == pytest.approx(score), got["id"]
            assert got["trait_mass"] == pytest.approx(mass), got["id"]
        follow_ups = [e["body"]["prompt"] for e in server.log if e["path"] == "/v1/completions"]
        rendered = "<|im_start|>user\n" + TEMPLATE.format(question="q", answer="<<{}>>")
        # every follow-up continues the rendered prompt with the digits written so far
        assert all(p.startswith(rendered.split("<<")[0]) for p in follow_ups)
        tails = sorted(p.rpartition("<|im_start|>assistant\n")[2] for p in follow_ups)
        assert tails == sorted(["8", "9", "7", "1", "10", "0", "3", "5", "4", "7", "8"])
        assert result.summary.judge["digit_split"] == "completions"
        assert result.summary.notes() == []
        # cached with their whole-number probabilities: a rerun asks nothing
        before = server.requests
        again = judge_rows(rows, fast(server, tmp_path), trait_prompt=TEMPLATE)
        assert server.requests == before
        assert [r["trait_score"] for r in again.rows] == [r["trait_score"] for r in result.rows]


@pytest.mark.parametrize(
    "server_options",
    [{"completions": False}, {"completions_shape": "none"}],
    ids=["no-completions", "completions-without-logprobs"],
)
def test_digit_split_judge_without_completions_falls_back_to_text_for_the_run(
    tmp_path, caplog, server_options
):
    """A server that cannot be asked for the next digit: one warning, and every row of the
    run (also those with usable logprobs) is scored from the answer text, so the column holds
    one kind of score; the incomplete answers are not cached."""
    with JudgeServer(**server_options) as server:
        rows = [row("digits=85:0.6,90:0.4"), row("lp=20:0.5,40:0.5;text=30"), row("digits=7:1")]
        config = fast(server, tmp_path, concurrency=1)
        with caplog.at_level("WARNING", logger="tracekit.judge.backends"):
            result = judge_rows(rows, config, trait_prompt=TEMPLATE)
        got = [(r["trait_score"], r["trait_method"], r["trait_mass"]) for r in result.rows]
        assert got == [(85, "text", None), (30, "text", None), (7, "text", None)]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "one digit per token" in warnings[0], warnings
        assert result.summary.judge["digit_split"] == "unsupported"
        assert result.summary.notes()[0].startswith("the judge splits numbers into digits")
        asked = server.requests
        judge_rows(rows, config, trait_prompt=TEMPLATE)
        assert server.requests > asked  # digit-split rows are asked again, never half-cached


def test_digit_split_detection_from_alternatives():
    from tracekit.judge.scoring import looks_digit_split

    assert looks_digit_split((("3", -1.0), ("1", -1.5), ("5", -2.0), ("The", -3.0)))
    assert looks_digit_split(((" 3", -1.0), (" 1", -1.5)))
    assert not looks_digit_split((("85", -0.5), ("8", -1.0), ("9", -2.0)))  # whole numbers
    assert not looks_digit_split((("7", -0.1), ("The", -3.0)))  # one digit: nothing to tell
    assert not looks_digit_split((("The", -0.1), ("I", -3.0)))


def test_a_lone_digit_on_a_server_without_completions_keeps_first_token_scoring(tmp_path):
    """One single digit among the alternatives may be a whole-number tokenizer's answer (as
    OpenAI's): without next-digit requests it keeps first-token scoring, with no warning and
    no text fallback; only a clearly split answer switches the run to text."""
    with JudgeServer(completions=False) as server:
        rows = [row("lp=7:0.8,The:0.2"), row("lp=40:0.5,60:0.5")]
        result = judge_rows(rows, fast(server, tmp_path), trait_prompt=TEMPLATE)
        got = [(r["trait_score"], r["trait_method"]) for r in result.rows]
        assert got == [(7, "logprobs"), (50, "logprobs")]
        assert result.summary.judge["digit_split"] == "unseen"
        assert result.summary.notes() == []


def test_an_answer_cached_before_digit_detection_is_asked_again(tmp_path):
    """A cache written by a tracekit that averaged first digits holds the answer without the
    split flag: it is asked again (with next digits), never scored on the 0-9 scale."""
    import math

    from tracekit.judge.cache import JudgeCache, cache_key
    from tracekit.judge.scoring import RawAnswer

    with JudgeServer() as server:
        judged = row("digits=85:0.6,90:0.3,7:0.1")
        config = fast(server, tmp_path)
        old = RawAnswer(
            text="85",
            top_logprobs=tuple((d, math.log(p)) for d, p in (("8", 0.6), ("9", 0.3), ("7", 0.1))),
        )
        key = cache_key("openai", "gpt-4.1-mini", "trait", TEMPLATE, "q", judged["response"])
        cache = JudgeCache(config.cache)
        cache.put(key, "openai", "gpt-4.1-mini", "trait", old)
        cache.close()
        result = judge_rows([judged], config, trait_prompt=TEMPLATE)
        (got,) = result.rows
        assert (got["trait_method"], got["trait_score"]) == ("digits", pytest.approx(78.7))
        assert result.summary.metrics["trait"].cache_hits == 0
