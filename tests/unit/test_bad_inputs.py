"""The bad-input table (issue 31, points 3 and 4): every case is one error line, its exit code,
and nothing written or overwritten (the files under the test's folder are byte-identical and
no file is added).

No case loads a model's weights: each is refused before that (the pickled-weights case reads
a model folder's config and tokenizer and stops at the weights). Usage errors that click
reports itself (exit 2) are checked for their substance only, not their layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "make_example_data", Path(__file__).parents[2] / "examples" / "make_example_data.py"
)
assert _spec is not None and _spec.loader is not None
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

KEY = "sk-proj-Q2h4Jx9LmN0pR7sT1uV3wX5yZ8aB6cD"
"""Looks like an OpenAI project key; must never appear in any output."""


@dataclass
class Case:
    setup: Callable[[Path], list[str]]
    """Writes the inputs under the folder; returns the command's arguments."""
    code: int
    says: str
    """Part of the error line (what is wrong), whitespace-normalised."""
    usage: bool = False
    """A usage error click reports itself: only the exit code and ``says`` are checked."""
    read_only: str | None = None
    """A folder (relative) to make read-only before running."""
    per_file: bool = False
    """A verb over many files (decode): a 'failed' line per file, then the one error line."""


def _sentences(folder: Path, n: int = 2, **overrides: np.ndarray) -> Path:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arrays = ex.sentence_arrays(rng, label=i, n_fragments=3)
        arrays.update(overrides)
        np.savez(folder / f"sentence_{i:06d}.npz", **arrays)
    return folder


def _build(tmp: Path, inputs: Path, out: str = "out.npz") -> list[str]:
    return ["build-dataset", "--strategy", "hidden-to-concept", "--layer", "1",
            "--input", str(inputs), "--output", str(tmp / out)]  # fmt: skip


def _trait(tmp: Path, **acts: np.ndarray) -> list[str]:
    """An experiment trait with responses and (given) activation files; extract vectors args."""
    root = tmp / "exp" / "e" / "t"
    (root / "responses").mkdir(parents=True)
    (root / "activations").mkdir()
    for pol in ("pos", "neg"):
        (root / "responses" / f"{pol}.csv").write_text("id,question,prompt,response\n0,q,p,r\n")
        array = acts.get(pol, np.ones((1, 2, 4), np.float32))
        np.save(root / "activations" / f"{pol}_response_avg.npy", array, allow_pickle=True)
    return ["extract", "vectors", "--experiment", "e", "--trait", "t",
            "--experiments-dir", str(tmp / "exp")]  # fmt: skip


def _cache(tmp: Path, completions: list[str], full_texts: list[str]) -> list[str]:
    from tracekit.storage.generation_cache import CacheFiles

    files = CacheFiles.of(tmp / "gen" / "m" / "generations" / "c_completions.npy")
    files.npy("completions").parent.mkdir(parents=True)
    np.save(files.npy("completions"), np.array(completions))
    np.save(files.npy("full_texts"), np.array(full_texts))
    return ["decode", "--base-dir", str(tmp / "gen")]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _log(tmp: Path, qa: bytes | str, *extra: str) -> list[str]:
    return ["log", "--qa", str(_write(tmp / "qa.jsonl", qa)), "--lmdb", str(tmp / "store"), *extra]


def _judge(tmp: Path, *extra: str, rows: bytes | str = "question,response\nq,r\n") -> list[str]:
    return ["judge", "--input", str(_write(tmp / "rows.csv", rows)), "--eval-prompt",
            "{question} {answer}", "--judge-model", "m", "--base-url", "http://127.0.0.1:9",
            *extra]  # fmt: skip


def _generate(tmp: Path, *extra: str) -> list[str]:
    return ["generate", "--experiment", "e", "--traits", "refusal",
            "--experiments-dir", str(tmp / "exp"), *extra]  # fmt: skip


def _features(tmp: Path, csv: bytes | str, *extra: str) -> list[str]:
    return ["extract", "features", "--sentences", str(_write(tmp / "s.csv", csv)),
            "--output", str(tmp / "feats"), "--label-column", "label", *extra]  # fmt: skip


def _config(tmp: Path, text: str) -> str:
    return str(_write(tmp / "c.toml", text))


def _pickled_model(tmp: Path) -> list[str]:
    import pickle

    from tracekit.models.embedded import embedded_model_dir

    source, folder = embedded_model_dir(), tmp / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'executed'}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    return _generate(tmp, "--model", str(folder))


def _tokenizerless_model(tmp: Path) -> Path:
    """A model folder with config.json and weights but no tokenizer files."""
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"never read")
    return folder


CASES: dict[str, Case] = {
    # --- layer specs, batch sizes and other option values ----------------------------------
    "generate: layer spec '0-'": Case(lambda t: _generate(t, "--layers", "0-"), 2, "--layers"),
    "generate: layer spec 'x'": Case(lambda t: _generate(t, "--layers", "x"), 2, "--layers"),
    "generate: layer spec '-3'": Case(lambda t: _generate(t, "--layers", "-3"), 2, "--layers"),
    "generate: batch size 0": Case(
        lambda t: _generate(t, "--batch-size", "0"), 2, "--batch-size", usage=True
    ),
    "generate: batch size 'many'": Case(
        lambda t: _generate(t, "--batch-size", "many"), 2, "--batch-size", usage=True
    ),
    "generate: experiment name '../x'": Case(
        lambda t: [
            "generate",
            "--experiment",
            "../x",
            "--traits",
            "refusal",
            "--experiments-dir",
            str(t / "exp"),
        ],
        2,
        "invalid experiment name",
    ),  # fmt: skip
    "log: batch size 0": Case(
        lambda t: _log(t, '{"prompt": "q"}\n', "--batch-size", "0"), 2, "--batch-size", usage=True
    ),
    "log: layer spec '3-1'": Case(
        lambda t: _log(t, '{"prompt": "q"}\n', "--layers", "3-1"), 2, "--layers"
    ),
    "judge: concurrency 0": Case(
        lambda t: _judge(t, "--concurrency", "0"), 2, "--concurrency", usage=True
    ),
    # --- config files -----------------------------------------------------------------------
    "config: wrong type overridden by a flag": Case(
        lambda t: [
            *_build(t, _sentences(t / "d")),
            "--normalize",
            "minmax",
            "--config",
            _config(t, "[build-dataset]\nnormalize = 5\n"),
        ],
        2,
        "'normalize' in",
    ),  # fmt: skip
    "config: wrong type": Case(
        lambda t: [
            *_build(t, _sentences(t / "d")),
            "--config",
            _config(t, '[build-dataset]\ntest_fraction = "half"\n'),
        ],
        2,
        "'test_fraction' in",
    ),  # fmt: skip
    "config: unknown key": Case(
        lambda t: [
            *_build(t, _sentences(t / "d")),
            "--config",
            _config(t, '[build-dataset]\nnormalise = "minmax"\n'),
        ],
        2,
        "unknown option 'normalise'",
    ),  # fmt: skip
    "config: not UTF-8": Case(
        lambda t: [
            *_build(t, _sentences(t / "d")),
            "--config",
            str(_write(t / "c.toml", b"normalize = '\xff'\n")),
        ],
        2,
        "is not valid UTF-8",
    ),  # fmt: skip
    "config: broken TOML": Case(
        lambda t: [*_build(t, _sentences(t / "d")), "--config", _config(t, "normalize = \n")],
        2,
        "c.toml",
    ),  # fmt: skip
    # --- the key is never echoed ------------------------------------------------------------
    "judge: a key given as --api-key-env": Case(
        lambda t: _judge(t, "--api-key-env", KEY), 2, "expects the NAME of an environment variable"
    ),
    "judge: a key in a [judge] table": Case(
        lambda t: _judge(t, "--config", _config(t, f'[judge]\napi_key_env = "{KEY}"\n')),
        2,
        "expects the NAME of an environment variable",
    ),  # fmt: skip
    "judge: a key-like value without dashes": Case(
        lambda t: _judge(t, "--api-key-env", "sk_live_51HGt2kLmN0pQ7sT1uV3wX"),
        2,
        "expects the NAME of an environment variable",
    ),  # fmt: skip
    # --- npy / npz: corrupt, truncated, empty, pickled, wrong shapes ------------------------
    "build-dataset: 2-D hidden_states": Case(
        lambda t: _build(t, _sentences(t / "d", hidden_states=np.ones((4, 48), np.float32))),
        1,
        "'hidden_states' has shape (4, 48), expected [layers, fragments, width]",
    ),  # fmt: skip
    "build-dataset: hidden_states rows unlike 'layers'": Case(
        lambda t: _build(t, _sentences(t / "d", layers=np.arange(2))),
        1,
        "'hidden_states' has 7 layer rows but 'layers' lists 2",
    ),  # fmt: skip
    "build-dataset: truncated npz": Case(
        lambda t: _build(t, _truncate(_sentences(t / "d"), "sentence_000001.npz")),
        1,
        "sentence_000001.npz",
    ),  # fmt: skip
    "build-dataset: empty npz": Case(
        lambda t: _build(t, _empty(_sentences(t / "d"), "sentence_000001.npz")),
        1,
        "sentence_000001.npz",
    ),  # fmt: skip
    "build-dataset: pickled array in an npz": Case(
        lambda t: _build(
            t, _sentences(t / "d", concept_strength_label=np.array([{"x": 1}], dtype=object))
        ),
        1,
        "pickle",
    ),  # fmt: skip
    "build-dataset: existing output": Case(
        lambda t: _build(t, _sentences(t / "d"), _existing(t, "out.npz")),
        1,
        "already exists",
    ),  # fmt: skip
    "extract vectors: object-dtype activations": Case(
        lambda t: _trait(t, pos=np.array([[None]], dtype=object)),
        1,
        "it holds Python objects, which would need pickle to load",
    ),  # fmt: skip
    "extract vectors: 2-D activations": Case(
        lambda t: _trait(t, neg=np.ones((1, 8), np.float32)),
        1,
        "neg_response_avg.npy is not [rows, layers, hidden] floats: it has shape (1, 8)",
    ),  # fmt: skip
    "extract vectors: text activations": Case(
        lambda t: _trait(t, neg=np.array([[["a"]]])),
        1,
        "it holds <U1 values",
    ),  # fmt: skip
    "extract vectors: truncated activations": Case(
        lambda t: _truncated_trait(t), 1, "pos_response_avg.npy is not [rows, layers, hidden]"
    ),
    "decode: completions and full texts of different lengths": Case(
        lambda t: _cache(t, ["a", "b"], ["a"]),
        1,
        "holds 2 items but c_full_texts.npy holds 1",
        per_file=True,
    ),
    "decode: empty cache file": Case(
        lambda t: _empty_cache(t), 1, "not a valid .npy file", per_file=True
    ),
    "decode: pickled cache of objects that are not plain data": Case(
        lambda t: _pickled_cache(t), 1, "is a pickle that needs decimal.Decimal", per_file=True
    ),
    # --- JSONL / CSV: empty, truncated, not UTF-8 -------------------------------------------
    "log: empty QA file": Case(lambda t: _log(t, ""), 1, "qa.jsonl holds no questions"),
    "log: QA file of blank lines": Case(lambda t: _log(t, "\n\n"), 1, "holds no questions"),
    "log: QA line not UTF-8": Case(
        lambda t: _log(t, b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'),
        1,
        "qa.jsonl line 2: not valid UTF-8 (byte 0xe9 at column 16)",
    ),  # fmt: skip
    "log: truncated QA line": Case(
        lambda t: _log(t, '{"prompt": "a"}\n{"prompt": "b'), 1, "line 2: not valid JSON"
    ),
    "log: every line skipped": Case(
        lambda t: _log(t, "[1]\n", "--skip-bad-lines"), 1, "holds no questions (1 malformed"
    ),
    "judge: empty input": Case(lambda t: _judge(t, rows=""), 1, "is empty"),
    "judge: input not UTF-8": Case(
        lambda t: _judge(t, rows=b"question,response\nq,caf\xe9\n"), 1, "rows.csv"
    ),
    "extract activations: responses not UTF-8": Case(
        lambda t: _responses(t, b"question,response\nq,caf\xe9\n"), 1, "line 2 is not valid UTF-8"
    ),
    "extract activations: empty responses CSV": Case(
        lambda t: _responses(t, b""), 1, "is missing column(s) question, response"
    ),
    "extract features: sentences not UTF-8": Case(
        lambda t: _features(t, b"sentence,label\ncaf\xe9,1\n"), 1, "s.csv line 2 is not valid UTF-8"
    ),
    "extract features: empty sentences CSV": Case(lambda t: _features(t, ""), 1, "s.csv"),
    "extract features: no rows": Case(lambda t: _features(t, "sentence,label\n"), 1, "no rows"),
    # --- odd and read-only output paths -----------------------------------------------------
    "build-dataset: output parent is a file": Case(
        lambda t: _build(t, _sentences(t / "d"), _existing(t, "blocker") + "/out.npz"),
        1,
        "blocker is a file, not a folder",
    ),  # fmt: skip
    "build-dataset: read-only output folder": Case(
        lambda t: _build(t, _sentences(t / "d"), "ro/out.npz"),
        1,
        "to create files in",
        read_only="ro",
    ),  # fmt: skip
    "generate: experiments dir is a file": Case(
        lambda t: _generate(_file_at(t, "exp")), 2, "is a file", usage=True
    ),
    "generate: read-only experiments dir": Case(
        lambda t: _generate(t), 1, "to create files in", read_only="exp"
    ),
    "log: store parent is a file": Case(
        lambda t: [
            "log",
            "--qa",
            str(_write(t / "qa.jsonl", '{"prompt": "q"}\n')),
            "--lmdb",
            str(_write(t / "blocker", "x")) + "/store",
        ],
        1,
        "blocker is a file, not a folder",
    ),  # fmt: skip
    "extract features: output is a file": Case(
        lambda t: _features(_file_at(t, "feats"), "sentence,label\na,1\n"),
        2,
        "is a file",
        usage=True,
    ),
    # --- models -----------------------------------------------------------------------------
    "generate: --model is a weights file": Case(
        lambda t: _generate(t, "--model", str(_write(t / "w.pt", b"\x80\x04K\x01."))),
        1,
        "w.pt is a file, not a model folder",
    ),  # fmt: skip
    "generate: pickled weights in a model folder": Case(
        _pickled_model, 1, "its weights file is a pickle that holds more than tensors"
    ),
    "log: a model folder without tokenizer files": Case(
        lambda t: [
            "log",
            "--qa",
            str(_write(t / "qa.jsonl", '{"prompt": "q"}\n')),
            "--lmdb",
            str(t / "store"),
            "--model",
            str(_tokenizerless_model(t)),
            "--device",
            "cpu",
        ],
        1,
        "cannot load the tokenizer of model",
    ),  # fmt: skip
}


def _truncate(folder: Path, name: str) -> Path:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return folder


def _empty(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(b"")
    return folder


def _file_at(tmp: Path, name: str) -> Path:
    """``tmp`` after writing a file at ``tmp / name`` (where a verb wants a folder)."""
    _write(tmp / name, "x")
    return tmp


def _existing(tmp: Path, name: str) -> str:
    return str(_write(tmp / name, "keep me"))


def _truncated_trait(tmp: Path) -> list[str]:
    args = _trait(tmp)
    path = tmp / "exp" / "e" / "t" / "activations" / "pos_response_avg.npy"
    path.write_bytes(path.read_bytes()[:100])
    return args


def _empty_cache(tmp: Path) -> list[str]:
    args = _cache(tmp, ["a"], ["a"])  # (a good file of a pair would still decode)
    for kind in ("completions", "full_texts"):
        (tmp / "gen" / "m" / "generations" / f"c_{kind}.npy").write_bytes(b"")
    return args


def _pickled_cache(tmp: Path) -> list[str]:
    args = _cache(tmp, ["a"], ["a"])
    for kind in ("completions", "full_texts"):
        path = tmp / "gen" / "m" / "generations" / f"c_{kind}.npy"
        np.save(path, np.array([Decimal("1")], dtype=object), allow_pickle=True)
    return args


def _responses(tmp: Path, csv: bytes) -> list[str]:
    _write(tmp / "exp" / "e" / "t" / "responses" / "pos.csv", csv)
    _write(tmp / "exp" / "e" / "t" / "responses" / "neg.csv", "question,response\nq,r\n")
    return ["extract", "activations", "--experiment", "e", "--trait", "t",
            "--experiments-dir", str(tmp / "exp")]  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_read_only(args: list[str], folder: Path) -> tuple[int, str]:
    """Run the CLI in a child with ``folder`` read-only: chmod for a normal user; for root
    (whom permissions do not stop) a read-only bind mount in a user + mount namespace."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "COLUMNS": "400"}
    command = [sys.executable, "-m", "tracekit", *args]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        finally:
            folder.chmod(0o755)
    else:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a folder read-only")
        mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount, str(folder), *command],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        if "mount:" in done.stderr:
            pytest.skip("unprivileged user namespaces are disabled: no read-only bind mount")
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name: str, tmp_path: Path, cli, monkeypatch):
    from tracekit.console import err_console, out_console

    monkeypatch.setattr(err_console, "width", 1000)  # no wrapping of long temp paths
    monkeypatch.setattr(out_console, "width", 1000)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    case = CASES[name]
    args = case.setup(tmp_path)
    before = _snapshot(tmp_path)
    if case.read_only is not None:
        (tmp_path / case.read_only).mkdir(exist_ok=True)
        before = _snapshot(tmp_path)
        code, output = _run_read_only(args, tmp_path / case.read_only)
    else:
        result = cli(*args)
        code, output = result.exit_code, result.output
    flat = " ".join(output.replace("│", " ").split())  # (click's usage box, if any)
    assert code == case.code, output
    assert " ".join(case.says.split()) in flat, output
    assert "Traceback" not in output and "unexpected" not in output, output
    assert KEY not in output and "sk_live_51HGt2kLmN0pQ7sT1uV3wX" not in output
    if not case.usage:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        if case.per_file:
            failed = [line for line in output.splitlines() if line.startswith("failed")]
            says = " ".join(case.says.split())
            assert any(says in " ".join(f.split()) for f in failed), output
            assert "nothing was written" in output
    if not case.usage and not case.per_file:
        others = [
            line for line in output.splitlines()
            if line.strip() and not line.startswith(("error:", "  hint:"))
        ]  # fmt: skip
        assert others == [], output  # one line (and its hint): no warnings, no progress
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten
    assert not (tmp_path / "executed").exists()
    json.dumps(name)  # (names are plain text: they show in pytest's ids)
