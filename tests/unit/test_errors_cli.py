"""One place turns core errors into one red line and an exit code."""

import typer
from typer.testing import CliRunner

from tracekit.cli import TracekitGroup
from tracekit.errors import ConfigError, InputError


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer(cls=TracekitGroup)

    @app.command("boom")
    def boom() -> None:
        raise exc

    @app.command("calm")
    def calm() -> None:
        pass

    return app


def test_tracekit_error_is_one_line_with_hint_and_exit_code(monkeypatch):
    monkeypatch.delenv("TRACEKIT_DEBUG", raising=False)
    result = CliRunner().invoke(
        _app(InputError("file x.npy is truncated", "re-run the job")), ["boom"]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0] == "error: file x.npy is truncated"
    assert lines[1].strip() == "hint: re-run the job"
    assert "Traceback" not in result.output


def test_a_long_message_stays_on_one_line_at_any_width(monkeypatch):
    """Rich wraps at the console's width (80 off a terminal): the message and the hint each
    stay one line, so a log or ``grep error:`` holds the whole message."""
    from tracekit.console import err_console

    monkeypatch.delenv("TRACEKIT_DEBUG", raising=False)
    monkeypatch.setattr(err_console, "width", 40)
    path = "/tmp/" + "deeply/nested/" * 8 + "sentence_000000.npz"
    result = CliRunner().invoke(
        _app(InputError(f"Layer 6 not found in data: {path} has layers 1-5", "pick " * 20)),
        ["boom"],
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0] == f"error: Layer 6 not found in data: {path} has layers 1-5"
    assert lines[1].strip() == "hint: " + ("pick " * 20).strip()
    assert len(lines) == 2


def test_config_error_exits_2(monkeypatch):
    monkeypatch.delenv("TRACEKIT_DEBUG", raising=False)
    result = CliRunner().invoke(_app(ConfigError("--layers: bad")), ["boom"])
    assert result.exit_code == 2 and "error: --layers: bad" in result.output


def test_unexpected_exception_is_one_line_unless_debug(monkeypatch):
    monkeypatch.delenv("TRACEKIT_DEBUG", raising=False)
    result = CliRunner().invoke(_app(RuntimeError("kaput\nsecond line")), ["boom"])
    assert result.exit_code == 1
    assert "error: unexpected RuntimeError: kaput" in result.output
    assert "second line" not in result.output and "TRACEKIT_DEBUG=1" in result.output
    monkeypatch.setenv("TRACEKIT_DEBUG", "1")
    result = CliRunner().invoke(_app(RuntimeError("kaput")), ["boom"])
    assert isinstance(result.exception, RuntimeError)  # re-raised, so a traceback is shown


def test_brackets_in_messages_are_printed_literally(monkeypatch):
    monkeypatch.delenv("TRACEKIT_DEBUG", raising=False)
    result = CliRunner().invoke(
        _app(InputError("shape [3, 576] in [bold]x.npz", "see [docs]")), ["boom"]
    )
    assert "error: shape [3, 576] in [bold]x.npz" in result.output
    assert "hint: see [docs]" in result.output
    result = CliRunner().invoke(_app(KeyError("[red]k")), ["boom"])
    assert "unexpected KeyError: '[red]k'" in result.output
