"""The one exception hierarchy of tracekit.

Core code raises these; the CLI turns them into a single red line and a non-zero exit
(``tracekit.cli``). Each message says what is wrong; ``hint`` says what to do about it.
"""

from __future__ import annotations

import re

KEY_PATTERN = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{12,}|\b(?:sk|hf|ghp|gho|github_pat|xox[bpas])_[A-Za-z0-9_]{12,}"
    r"|\bAIza[0-9A-Za-z_-]{20,}|\bBearer\s+\S{12,}"
)
"""Text that looks like an API key or token (OpenAI, Anthropic, Hugging Face, GitHub, Slack,
Google): :func:`redact_keys` hides it in anything tracekit prints."""


def redact_keys(text: str) -> str:
    """``text`` with anything that looks like an API key replaced by ``<redacted key>``."""
    return KEY_PATTERN.sub("<redacted key>", text)


class TracekitError(Exception):
    """Base class: an error a user can act on."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(TracekitError, ValueError):
    """An option, config file or spec (layers, batch size, ...) is invalid."""

    exit_code = 2


class InputError(TracekitError):
    """An input file or directory is missing, unreadable or malformed."""


class UnsafeInputError(InputError):
    """Reading an input would execute code from it (pickle) and the user did not allow that."""


class OutputExistsError(TracekitError):
    """An output already exists and ``--force`` was not given."""


class OutputLockedError(TracekitError):
    """Another process is writing the same output (its one-writer lock is held)."""


class DiskFullError(TracekitError):
    """An output cannot be written: no space left, a disk quota or a file size limit."""


class ModelError(TracekitError):
    """A model or tokenizer cannot be loaded or does not fit the request."""


class JudgeError(TracekitError):
    """A judge backend failed in a way that stops the run (bad key, unreachable server)."""


class StoreError(TracekitError):
    """An activation store (LMDB) is missing, corrupt or incompatible."""


class NotImplementedYetError(TracekitError):
    """A command that a later release implements."""

    exit_code = 2
