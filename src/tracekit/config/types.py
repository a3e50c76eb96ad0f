"""Field types that parse tracekit's domain values: layer specs, batch sizes, normalizations.

Parsing lives in the types so every command and config file reads ``"0-2,10"`` the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, Field, GetCoreSchemaHandler
from pydantic_core import core_schema

MAX_BATCH_SIZE = 4096

BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE, description="rows per forward pass")]
"""A batch size: a positive integer, at most :data:`MAX_BATCH_SIZE`."""

_NAME_HINT = "use letters, digits, '_', '-' or '.'"


def check_name(value: str, what: str) -> str:
    """``value`` stripped, if it can name a folder of its own; else :class:`ValueError`."""
    value = value.strip()
    if not value or "/" in value or "\\" in value or value.startswith("."):
        raise ValueError(f"invalid {what} name '{value}': {_NAME_HINT}")
    return value


FolderName = Annotated[str, AfterValidator(lambda v: check_name(v, "experiment or trait"))]
"""An experiment or trait name: one folder, no separators, not hidden."""


def split_commas(value: Any) -> Any:
    """``"a, b"`` -> ``["a", "b"]`` (empty parts dropped), for a list option given as one
    string on the command line or in a config file; any other value as it is (a validator)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_ITEM = re.compile(r"^\s*(\d+)\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


class LayerSpec:
    """A set of layer indices written as ``"0-2,10,15-17"``; ``"all"`` means every layer.

    Parses into sorted unique non-negative ints and prints back canonically (runs of
    consecutive layers collapse into ranges), so it round-trips through JSON and config files.
    Layer indices follow tracekit's one convention (README, "Layer indexing"): 0 is the
    embedding output, ``i >= 1`` is the residual stream after decoder block ``i - 1``.
    """

    __slots__ = ("_layers",)

    def __init__(self, layers: Iterable[int] | None) -> None:
        if layers is None:
            self._layers: tuple[int, ...] | None = None
            return
        items = sorted(set(int(x) for x in layers))
        if not items:
            raise ValueError("layer spec selects no layers")
        if items[0] < 0:
            raise ValueError(f"invalid layer '{items[0]}': layers are non-negative integers")
        self._layers = tuple(items)

    # --- parsing and printing -------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> LayerSpec:
        """Parse ``"0-5"``, ``"2,5,10"``, ``"0-2,10,15-17"`` or ``"all"``."""
        if not isinstance(text, str):
            raise ValueError(f"layer spec must be text like '0-2,10', got {text!r}")
        stripped = text.strip()
        if not stripped:
            raise ValueError("empty layer spec: give layers like '0-5', '2,5,10' or 'all'")
        if stripped.lower() == "all":
            return cls(None)
        layers: list[int] = []
        for part in stripped.split(","):
            if not part.strip():
                raise ValueError(
                    f"empty item in layer spec '{text}' (look for ',,' or a trailing ',')"
                )
            if match := _ITEM.match(part):
                layers.append(int(match.group(1)))
            elif match := _RANGE.match(part):
                start, end = int(match.group(1)), int(match.group(2))
                if start > end:
                    raise ValueError(
                        f"invalid layer range '{part.strip()}' in '{text}': "
                        "start is greater than end"
                    )
                layers.extend(range(start, end + 1))
            elif part.strip().startswith("-") and _ITEM.match(part.strip()[1:]):
                raise ValueError(
                    f"invalid layer '{part.strip()}' in '{text}': layers are non-negative integers"
                )
            else:
                raise ValueError(
                    f"invalid layer item '{part.strip()}' in '{text}': "
                    "use integers and ranges like '0-2,10'"
                )
        return cls(layers)

    def __str__(self) -> str:
        if self._layers is None:
            return "all"
        parts: list[str] = []
        start = prev = self._layers[0]
        for layer in (*self._layers[1:], None):
            if layer is not None and layer == prev + 1:
                prev = layer
                continue
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            if layer is not None:
                start = prev = layer
        return ",".join(parts)

    def __repr__(self) -> str:
        return f"LayerSpec({str(self)!r})"

    # --- set-like access ------------------------------------------------------------------
    @property
    def is_all(self) -> bool:
        return self._layers is None

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers; raises for ``all``, which needs :meth:`resolve` with a layer count."""
        if self._layers is None:
            raise ValueError("layer spec 'all' must be resolved against a model first")
        return self._layers

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """Concrete layers for a model with ``n_layers`` selectable layers (0..n_layers-1).

        Raises ``ValueError`` naming every layer outside the model.
        """
        if self._layers is None:
            return tuple(range(n_layers))
        bad = [layer for layer in self._layers if layer >= n_layers]
        if bad:
            shown = ", ".join(str(b) for b in bad[:5])
            raise ValueError(f"layer(s) {shown} out of range: valid layers are 0-{n_layers - 1}")
        return self._layers

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerSpec):
            return self._layers == other._layers
        if isinstance(other, str):
            try:
                return self == LayerSpec.parse(other)
            except ValueError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._layers)

    # --- pydantic integration -------------------------------------------------------------
    @classmethod
    def _validate(cls, value: Any) -> LayerSpec:
        if isinstance(value, LayerSpec):
            return value
        if isinstance(value, bool):
            raise ValueError("layer spec must be text like '0-2,10' or a list of integers")
        if isinstance(value, int):
            return cls([value])
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("a layer list must hold integers only")
            return cls(value)
        raise ValueError("layer spec must be text like '0-2,10' or a list of integers")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
            json_schema_input_schema=core_schema.str_schema(),
        )


def parse_layers_arg(text: str) -> list[int]:
    """Seed-compatible helper: ``"0-2,10,15-17"`` -> ``[0, 1, 2, 10, 15, 16, 17]``."""
    return list(LayerSpec.parse(text).layers)
