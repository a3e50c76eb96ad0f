"""The engine base class: ``generate`` and ``start`` take a batch's arguments once for every
engine, and refuse steering for an engine that cannot steer before it runs anything."""

import numpy as np
import pytest

from tracekit.engines.interface import (
    FallbackEngine,
    GenerationEngine,
    GenerationOutput,
    GenerationParams,
    GenerationRequest,
    Ready,
)
from tracekit.engines.steering import Steering
from tracekit.errors import ConfigError


class _Recording(GenerationEngine):
    """An engine without steering that records the requests it is handed."""

    name = "recording"

    def __init__(self) -> None:
        self.loaded = None  # type: ignore[assignment]  # no model: nothing is generated
        self.requests: list[GenerationRequest] = []

    def _start(self, request: GenerationRequest) -> Ready:
        self.requests.append(request)
        rows = len(request.prompts)
        return Ready(GenerationOutput([[1]] * rows, ["a"] * rows, ["length"] * rows, [1] * rows))


def test_generate_hands_its_arguments_to_the_engine_as_one_request():
    engine = _Recording()
    params = GenerationParams(max_new_tokens=3, temperature=0)
    out = engine.generate([[5, 6], [7]], params, None, [4, 9], pad_to=8)
    assert out.texts == ["a", "a"]
    assert engine.requests == [GenerationRequest([[5, 6], [7]], params, None, [4, 9], 8, None)]


def test_an_engine_that_does_not_steer_refuses_steering_before_it_runs():
    engine = _Recording()
    steering = Steering(0, np.array([1.0, 0.0], dtype=np.float32), 1.0)
    params = GenerationParams(max_new_tokens=3, temperature=0)
    with pytest.raises(ConfigError, match="recording engine does not steer"):
        engine.generate([[5]], params, steering=steering)
    with pytest.raises(ConfigError, match="recording engine does not steer"):
        FallbackEngine(engine).start(GenerationRequest([[5]], params, steering=steering))
    assert engine.requests == []
