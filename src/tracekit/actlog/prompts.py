"""QA input and prompt formatting for ``log`` and ``reconstruct``: one definition for both.

A raw question becomes the text sent to the model either through a plain template (the seed's
``user: Answer in one sentence. Q:{question}\\n A:``) or through the tokenizer's chat template.
The store key is the SHA-256 of that text, so ``reconstruct`` must format exactly as ``log`` did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekit.errors import ConfigError, InputError

DEFAULT_TEMPLATE = "user: Answer in one sentence. Q:{question}\n A:"
"""The seed's prompt format (``reconstruct_inference.py``)."""
PLACEHOLDER = "{question}"


def check_template(template: str) -> str:
    """``template`` if it holds ``{question}``; ``ValueError`` otherwise (for validators)."""
    if PLACEHOLDER not in template:
        raise ValueError(
            f"prompt template {template!r} has no {PLACEHOLDER} placeholder: "
            "write where the question goes, e.g. 'Q:{question}\\n A:'"
        )
    return template


def format_prompt(template: str, question: str) -> str:
    """Fill ``{question}`` in ``template``; other braces stay literal (no ``str.format``)."""
    return template.replace(PLACEHOLDER, question)


def render_chat(tokenizer: Any, question: str) -> str:
    """``question`` as one user turn through the chat template, generation prompt on."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "--chat needs a tokenizer with a chat template, and this one has none",
            "use --prompt-template instead",
        )
    messages = [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def prompt_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of a formatted prompt, with the tokenizer's BOS added once (a chat text has it)."""
    bos = getattr(tokenizer, "bos_token", None)
    already = isinstance(bos, str) and bool(bos) and text.startswith(bos)
    return [int(t) for t in tokenizer(text, add_special_tokens=not already)["input_ids"]]


def text_sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class QARows:
    """Rows of a QA JSONL file, with the questions pulled out and bad lines counted."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


def _qa_problem(line: str, question_field: str) -> str | None:
    """What is wrong with one QA line, None if nothing."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get(question_field), str):
        return f"no text field '{question_field}'"
    return None


def read_qa_jsonl(
    path: Path, question_field: str = "prompt", skip_bad_lines: bool = False
) -> QARows:
    """Read ``path`` (one JSON object per line, the question in ``question_field``).

    A malformed line (bad JSON, not UTF-8, no question) raises :class:`InputError` naming its
    number, unless ``skip_bad_lines`` (then it is counted in ``bad_lines``). Blank lines are
    ignored; a file with no question at all is an error (before any model is loaded).
    """
    if not path.is_file():
        raise InputError(f"QA file not found: {path}", "check the path of the QA JSONL file")
    out = QARows()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            problem: str | None
            try:  # strictly: a replaced byte would be logged under the hash of other text
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
            else:
                if not line.strip():
                    continue
                problem = _qa_problem(line, question_field)
            if problem is not None:
                if not skip_bad_lines:
                    raise InputError(
                        f"{path} line {number}: {problem}",
                        "fix the line, or pass --skip-bad-lines to skip malformed lines",
                    )
                out.bad_lines.append(number)
                continue
            row = json.loads(line)
            out.rows.append(row)
            out.questions.append(row[question_field])
    if not out.questions:
        skipped = f" ({len(out.bad_lines)} malformed line(s) skipped)" if out.bad_lines else ""
        raise InputError(
            f"{path} holds no questions{skipped}",
            f"give a JSONL file with one object per line and the question in '{question_field}'",
        )
    return out
