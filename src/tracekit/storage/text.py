"""Reading text files people give tracekit: strictly UTF-8, or one line naming the bad line.

Decoding with ``errors="replace"`` would turn bad bytes into U+FFFD, and the replaced text would
be used (and hashed, and logged) as if it were the input.
"""

from __future__ import annotations

from pathlib import Path

from tracekit.errors import InputError


def read_utf8(path: Path, what: str = "file") -> str:
    """The text of ``path``; :class:`InputError` naming the first line that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path} line {line} is not valid UTF-8 (byte {data[exc.start]:#04x})",
            f"save the {what} as UTF-8",
        ) from None
