"""Test tiers: unit (no model), integration (the embedded model, loaded once per session),
gpu (needs CUDA; skipped elsewhere)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct on CPU in float32, shared by the whole session.

    Tests must not mutate it (no hooks left behind, no weight changes).
    """
    from tracekit.models import ModelConfig, load_model

    return load_model(ModelConfig(device="cpu", dtype="float32"))


@pytest.fixture()
def cli():
    """Invoke the tracekit CLI in-process; returns the typer testing result."""
    from typer.testing import CliRunner

    from tracekit.cli import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return invoke


@pytest.fixture()
def two_processes():
    """Run ``tracekit ARGS --num-processes 2 --json`` as a real process tree (torchrun, gloo on
    CPU); assert it succeeded and return its JSON summary."""
    import json
    import subprocess
    import sys

    def run(*args: object, timeout: float = 300) -> dict:
        command = [sys.executable, "-m", "tracekit", *(str(a) for a in args)]
        done = subprocess.run(
            [*command, "--num-processes", "2", "--json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-8000:]
        return json.loads(done.stdout)

    return run


@pytest.fixture()
def traced_compile(monkeypatch):
    """The CUDA engine's compiled path without a GPU: ``torch.compile`` with torch's
    ``aot_eager`` backend (dynamo and AOT autograd trace the functions whole, with the engine's
    ``fullgraph=True``; no inductor), the engine's caches of compiled functions emptied, dynamo
    reset before and after."""
    import torch

    from tracekit.engines.cuda import compiled

    compile_ = torch.compile

    def traced(fn, **kw):
        kw.pop("options", None)  # inductor's options
        return compile_(fn, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", traced)
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled, "_COMPILED_DYNAMIC", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
