"""Prompt building: a trait instruction and a question into the exact text and ids sent.

With a chat template the instruction is the system prompt; templates without a system role
(they raise when given one, as Gemma's does) get it prepended to the user turn instead. Without a
chat template (``--no-chat-template``, base models) the prompt is plain text:
``"{instruction}\\n\\n{question}\\n"``, tokenized with the tokenizer's own special tokens
(e.g. BOS). The returned text is what tracekit saves as the ``prompt`` column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tracekit.errors import ModelError


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt as sent to the model: its text and its token ids."""

    text: str
    ids: list[int]
    template: str
    """``chat-system``, ``chat-user-prefix`` (no system role) or ``plain``."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def build_prompt(
    tokenizer: Any,
    question: str,
    instruction: str | None = None,
    use_chat_template: bool = True,
    model_name: str = "the model",
) -> BuiltPrompt:
    """The prompt for ``question`` under ``instruction`` (see the module docstring)."""
    if not use_chat_template:
        text = f"{instruction}\n\n{question}\n" if instruction else f"{question}\n"
        return BuiltPrompt(text=text, ids=encode_prompt_text(tokenizer, text), template="plain")
    if not has_chat_template(tokenizer):
        raise ModelError(
            f"{model_name} has no chat template",
            "pass --no-chat-template to send plain-text prompts (base models)",
        )
    template = "chat-system"
    if instruction:
        try:
            text = _render(
                tokenizer,
                [
                    {"role": "system", "content": instruction},
                    {"role": "user", "content": question},
                ],
            )
        except Exception:  # jinja raises its own error types for "system role not supported"
            template = "chat-user-prefix"
            text = _render(tokenizer, [{"role": "user", "content": f"{instruction}\n\n{question}"}])
    else:
        text = _render(tokenizer, [{"role": "user", "content": question}])
    return BuiltPrompt(text=text, ids=encode_prompt_text(tokenizer, text), template=template)


def encode_prompt_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a saved prompt text, with the tokenizer's special tokens added only once.

    A rendered chat template already starts with its BOS text (Llama, Gemma, Mistral); adding
    special tokens again would double it. Plain prompts get the tokenizer's own BOS, if any.
    Used for fresh prompts and for prompts read back from a CSV (stage 2), so both agree.
    """
    bos = getattr(tokenizer, "bos_token", None)
    already = isinstance(bos, str) and bool(bos) and text.startswith(bos)
    ids = tokenizer(text, add_special_tokens=not already)["input_ids"]
    return [int(t) for t in ids]
