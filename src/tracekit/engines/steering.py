"""Steering: add ``coef * v`` to the residual stream while generating.

Layer numbering is tracekit's (README "Layer indexing"): the vector of layer ``L`` is added
where layer ``L`` is read, i.e. to the output of decoder block ``L - 1`` (layer 0: to the input
of block 0, the embedding output), so every later block and every captured layer ``>= L`` sees
the steered stream. Captured activations of a steered run are therefore the steered model's.

Positions (``positions``), per forward call of the decode loop:

- ``response`` (the default, persona_vectors' ``steering_type="response"``): the positions
  that produce response tokens, i.e. the last prompt position in the prefill and the fed token
  of every decode step;
- ``prompt``: every prompt position in the prefill, nothing while decoding;
- ``all``: every position of every call (padding positions too; attention never reads them).

A steering *sweep* (:func:`steering_sets`) is one output set per coefficient, and with
``--steer-control random`` one more per non-zero coefficient along a seeded random direction of
the same norm as the vector (coefficient 0 is the same run in both, so it is generated once).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tracekit.config.choices import SteerControl, SteerPositions
from tracekit.errors import ConfigError, InputError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tracekit.models.layers import LayerHandles

STEERING_DIR = "steering"


@dataclass(frozen=True)
class Steering:
    """One steered run: ``coef * vector`` added at ``layer`` on ``positions``."""

    layer: int
    vector: np.ndarray
    """float32 ``[hidden]``: the direction, before the coefficient."""
    coef: float
    positions: SteerPositions = SteerPositions.response
    """A plain string is taken too (``"all"``); anything but the three names is refused."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", SteerPositions(self.positions))

    def delta(self, like: torch.Tensor) -> torch.Tensor:
        """``coef * vector`` in the dtype and on the device of ``like``."""
        import torch

        return (torch.from_numpy(self.vector) * self.coef).to(like.device, like.dtype)


def check_fits(handles: LayerHandles, steering: Steering, model_name: str = "the model") -> None:
    """Raise :class:`ConfigError` when ``steering``'s layer or size does not fit the model."""
    if not 0 <= steering.layer < handles.n_layers:
        raise ConfigError(
            f"--steer-layer: layer {steering.layer} out of range: {model_name} has layers "
            f"0-{handles.n_layers - 1}"
        )
    if steering.vector.shape != (handles.hidden_size,):
        raise ConfigError(
            f"--steer-vector: a vector of size {steering.vector.shape[-1]} does not fit "
            f"{model_name}'s hidden size {handles.hidden_size}",
            "use a vector extracted from this model",
        )


class SteeringHook:
    """Adds a :class:`Steering` to the residual stream at its layer while entered.

    The engine sets :attr:`prefill` before each forward call (True for the prompt pass, False
    for decode steps); ``response`` and ``prompt`` positions depend on it. Enter it *before*
    any capture hooks on the same block, so that they see the steered stream.
    """

    def __init__(self, handles: LayerHandles, steering: Steering) -> None:
        check_fits(handles, steering)
        self.handles = handles
        self.steering = steering
        self.prefill = True
        self._delta: torch.Tensor | None = None
        self._hook: Any = None

    def add(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[batch, seq, d]`` with the steering added at this call's positions."""
        if self._delta is None or self._delta.device != hidden.device:
            self._delta = self.steering.delta(hidden)
        delta = self._delta.to(hidden.dtype)
        positions = self.steering.positions
        if positions == "all" or (positions == "response" and not self.prefill):
            return hidden + delta
        if positions == "prompt":
            return hidden + delta if self.prefill else hidden
        steered = hidden.clone()  # response positions in the prefill: the last one only
        steered[:, -1, :] += delta
        return steered

    def __enter__(self) -> SteeringHook:
        layer = self.steering.layer
        if layer == 0:
            self._hook = self.handles.blocks[0].register_forward_pre_hook(
                self._pre_hook, with_kwargs=True
            )
        else:
            self._hook = self.handles.blocks[layer - 1].register_forward_hook(self._post_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _pre_hook(
        self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (self.add(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.add(kwargs["hidden_states"])}

    def _post_hook(self, module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            return (self.add(output[0]), *output[1:])
        return self.add(output)


# --- vector files ---------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _vector_layers(path: Path) -> list[int] | None:
    """The layer of each row of a vectors file, from ``extract vectors``' metadata beside it."""
    meta = path.with_name(f"{path.stem}_metadata.json")
    if not meta.is_file():
        return None
    try:
        layers = json.loads(meta.read_text(encoding="utf-8")).get("layers")
        return [int(item["layer"]) for item in layers]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def load_vector_file(path: Path) -> np.ndarray:
    """A ``.npy`` (no pickle) or ``.pt`` (``weights_only``) vectors file as float32."""
    import numpy as np

    from tracekit.storage.vectors import read_vectors

    array = read_vectors(path, "--steer-vector", "check the path")
    array = array.astype("float32")
    if not np.isfinite(array).all():
        raise InputError(f"--steer-vector: {path} holds nan or inf values")
    return array


def select_vector(array: np.ndarray, layers: list[int] | None, layer: int, path: Path) -> Any:
    """The ``[hidden]`` vector of ``layer`` in a vectors file's ``array``."""
    if array.ndim == 1:
        return array
    if layers is not None and len(layers) == array.shape[0]:
        if layer not in layers:
            raise InputError(
                f"--steer-layer: {path} has no vector for layer {layer} "
                f"(its layers: {_span(layers)})",
                "pick one of its layers, or extract vectors with that layer captured",
            )
        return array[layers.index(layer)]
    if layer >= array.shape[0]:
        raise InputError(
            f"--steer-layer: {path} has {array.shape[0]} rows (layers 0-{array.shape[0] - 1}); "
            f"no row for layer {layer}",
            "pick a layer it holds",
        )
    return array[layer]


def _span(layers: list[int]) -> str:
    return ",".join(str(x) for x in layers[:8]) + (",..." if len(layers) > 8 else "")


def random_direction(vector: np.ndarray, seed: int) -> np.ndarray:
    """A seeded Gaussian direction with the norm of ``vector`` (float32, the same on any host)."""
    import numpy as np

    draw = np.random.default_rng(seed).standard_normal(vector.shape[0])
    scale = _norm(vector) / float(np.linalg.norm(draw))
    return np.asarray(draw * scale, dtype="float32")


# --- sweeps ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteeringSet:
    """One output set of a sweep: a direction (the vector or the control) and a coefficient."""

    steering: Steering
    direction: Literal["vector", "random"]
    vector_file: Path
    vector_sha256: str
    control_seed: int | None = None

    @property
    def subdir(self) -> Path:
        """Where the set's outputs go, under the trait's folder."""
        coef = self.steering.coef + 0.0  # -0.0 -> 0.0
        return Path(STEERING_DIR) / f"L{self.steering.layer}" / self.direction / f"coef{coef:+g}"

    def describe(self) -> dict[str, Any]:
        """What a run records (metadata, resume settings) about its steering."""
        return {
            "vector_file": str(self.vector_file),
            "vector_sha256": self.vector_sha256,
            "layer": self.steering.layer,
            "coef": self.steering.coef,
            "positions": self.steering.positions,
            "direction": self.direction,
            "control_seed": self.control_seed,
            "norm": float(_norm(self.steering.vector)),
        }


def _norm(vector: np.ndarray) -> float:
    import numpy as np

    return float(np.linalg.norm(vector.astype("float64")))


def steering_sets(
    vector_file: Path,
    layer: int,
    coefs: tuple[float, ...],
    positions: SteerPositions,
    control: SteerControl | None,
    control_seed: int,
) -> list[SteeringSet]:
    """Every output set of a sweep, vector sets first; reads and checks the vector file
    (before any model is loaded)."""
    array = load_vector_file(vector_file)
    vector = select_vector(array, _vector_layers(vector_file), layer, vector_file)
    sha = file_sha256(vector_file)
    sets = [
        SteeringSet(Steering(layer, vector, coef, positions), "vector", vector_file, sha)
        for coef in coefs
    ]
    if control == SteerControl.random:
        control_vector = random_direction(vector, control_seed)
        sets += [
            SteeringSet(
                Steering(layer, control_vector, coef, positions),
                "random",
                vector_file,
                sha,
                control_seed,
            )
            for coef in coefs
            if coef != 0
        ]
    return sets
