"""The generation engine interface: what every engine takes and returns.

An engine turns a batch of prompts into responses and, when asked, pooled activations captured
*during* generation. The reference engine (:class:`tracekit.engines.hf.HFEngine`)
is a plain PyTorch decode loop over any Hugging Face causal LM; faster engines (static KV cache,
CUDA graphs) subclass the same :class:`GenerationEngine` and register a name in
:data:`ENGINES`, so ``generate``, ``log`` and the benchmark select them with one flag. Every
engine's ``start`` takes a :class:`GenerationRequest`; an engine may return from it before the
device is done, so that a caller can queue the next batch first.

Contract every engine keeps (the tests check the reference engine against it):

- prompts are token ids (already templated) or strings (tokenized as-is, no special tokens
  added); rows are left-padded and always run with an attention mask;
- each row stops at its own eos (any id in ``stop_token_ids``) or at ``max_new_tokens``; the
  eos token is not part of the response; ``finish_reason`` is ``"eos"`` or ``"length"``;
- pooled activations follow the definitions in :mod:`tracekit.engines.pooling` (layer
  numbering of README "Layer indexing"), are float32 on the CPU, shaped
  ``[batch, n_layers, hidden]`` per pooling, and equal a teacher-forced forward over
  prompt + response (:func:`tracekit.engines.teacher_forced.pooled_forward`) within float
  tolerance;
- greedy decoding (``temperature == 0`` or ``do_sample=False``) gives a row the same tokens
  whatever else is in its batch, up to floating-point differences between batch shapes;
- sampling draws each row from its own random generator seeded by ``row_seeds`` (the caller
  derives them, e.g. from the run seed and a row id), so a row's random stream does not depend
  on batch composition or order. Tokens then match across batch sizes as long as the
  logits match to within sampling resolution; bit-identity is only promised for the same
  batch on the same device and build.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field, model_validator

from tracekit.config.base import TracekitConfig
from tracekit.engines.host_copy import HostCopy as HostCopy  # re-exported: the interface
from tracekit.engines.host_copy import to_device as to_device
from tracekit.engines.pooling import Pooling
from tracekit.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tracekit.engines.steering import Steering
    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "length"]
Prompt = str | Sequence[int]


class GenerationParams(TracekitConfig):
    """Sampling parameters shared by every engine."""

    max_new_tokens: int = Field(default=150, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0)
    """0 means greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    do_sample: bool | None = None
    """None: sample when ``temperature > 0``; False forces greedy decoding."""
    seed: int | None = None
    """Base seed; rows without an explicit seed use ``seed + row index`` within the call."""

    @model_validator(mode="after")
    def _sampling_consistent(self) -> GenerationParams:
        if self.do_sample and self.temperature == 0:
            raise ValueError("do_sample=True needs temperature > 0 (temperature 0 is greedy)")
        return self

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0


@dataclass(frozen=True)
class CaptureSpec:
    """Which layers (tracekit numbering) to capture and how to pool them."""

    layers: tuple[int, ...]
    poolings: tuple[Pooling, ...] = (Pooling.response_avg,)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("capture needs at least one layer")
        if not self.poolings:
            raise ConfigError("capture needs at least one pooling")


@dataclass
class GenerationOutput:
    """What an engine returns for one batch, row order = prompt order."""

    response_ids: list[list[int]]
    """Generated tokens per row, eos excluded."""
    texts: list[str]
    """Decoded responses (special tokens skipped)."""
    finish_reasons: list[FinishReason]
    prompt_lengths: list[int]
    """Real (unpadded) prompt length per row, in tokens."""
    pooled: dict[Pooling, torch.Tensor] = field(default_factory=dict)
    """Per pooling: ``[batch, n_layers, hidden]`` float32 on the CPU (empty without capture)."""
    layers: tuple[int, ...] = ()
    """The captured layers, in the order of the tensors' second axis."""

    @property
    def n_new_tokens(self) -> int:
        return sum(len(ids) for ids in self.response_ids)


@dataclass(frozen=True)
class GenerationRequest:
    """One batch's arguments, as :meth:`GenerationEngine.generate` takes them."""

    prompts: Sequence[Prompt]
    params: GenerationParams
    capture: CaptureSpec | None = None
    row_seeds: Sequence[int] | None = None
    pad_to: int | None = None
    steering: Steering | None = None


class PendingOutput(Protocol):
    """A batch handed to an engine: :meth:`result` returns its output, waiting if needed."""

    def result(self) -> GenerationOutput: ...


@dataclass
class Ready:
    """A :class:`PendingOutput` already done (engines that only run a batch to its end)."""

    output: GenerationOutput

    def result(self) -> GenerationOutput:
        return self.output


class GenerationEngine(ABC):
    """A batched, padding-correct generator with optional pooled capture.

    An engine implements :meth:`_start`; :meth:`generate` and :meth:`start` take the arguments
    and check them once for every engine. ``supports_steering``: whether the engine takes
    ``steering=`` (a :class:`~tracekit.engines.steering.Steering`); one that does not refuses
    it with a :class:`ConfigError`.
    """

    name: str
    loaded: LoadedModel
    supports_steering: bool = False

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        capture: CaptureSpec | None = None,
        row_seeds: Sequence[int] | None = None,
        *,
        pad_to: int | None = None,
        steering: Steering | None = None,
    ) -> GenerationOutput:
        """Generate for ``prompts`` (one batch; the caller chooses the batch size).

        ``pad_to``: the caller's batch size. An engine that prepares its steps per batch size
        (the CUDA engine compiles, times kernels and captures graphs) may run a smaller batch
        as this many rows, so a run's last batch reuses the prepared steps; the output still
        has one row per prompt. Every batch of a run then has the same shape, in one process
        or several. Engines without such a cost ignore it.

        ``steering`` adds a vector to the residual stream (:mod:`tracekit.engines.steering`),
        in engines with ``supports_steering``.
        """
        request = GenerationRequest(prompts, params, capture, row_seeds, pad_to, steering)
        return self.start(request).result()

    def start(self, request: GenerationRequest) -> PendingOutput:
        """Hand a batch to the engine without waiting for it where the engine can.

        An engine may queue the batch's device work and return before that work ends. A
        caller that starts the next batch before taking this one's result keeps the device
        busy while the host turns results into text and records (the CUDA engine does this;
        ``tracekit generate`` runs its batches so). Other engines run the batch here and
        return it :class:`Ready`.
        """
        if request.steering is not None:
            check_steering(self)
        return self._start(request)

    @abstractmethod
    def _start(self, request: GenerationRequest) -> PendingOutput:
        """Run or queue ``request`` (its arguments already checked)."""


def check_steering(engine: GenerationEngine) -> None:
    """Raise :class:`ConfigError` when ``engine`` cannot steer."""
    if not getattr(engine, "supports_steering", False):
        raise ConfigError(
            f"the {engine.name} engine does not steer yet",
            "pass --engine hf to generate with --steer-vector",
        )


ENGINES: dict[str, str] = {
    "hf": "tracekit.engines.hf:HFEngine",
    "cuda": "tracekit.engines.cuda.engine:CudaEngine",
}
"""Engine name -> ``module:Class``; the class is built as ``Class(loaded_model)`` and answers
``Class.supports(model)`` (whether it runs that model; ``auto`` asks the fast engine)."""


def resolve_engine_name(name: str, loaded: LoadedModel, *, steering: bool = False) -> str:
    """``auto`` -> ``cuda`` for a model on one CUDA device that the fast path supports (with
    ``steering``, only where the engine class says ``supports_steering``), else ``hf``; any
    other name is returned as given."""
    if name != "auto":
        return name
    if loaded.device.type != "cuda":
        return "hf"
    if steering and not getattr(engine_class("cuda"), "supports_steering", False):
        return "hf"
    return "cuda" if engine_class("cuda").supports(loaded.model) else "hf"


def check_engine_name(name: str) -> str:
    """``name`` if it is ``auto`` or a registered engine, else a ``ValueError`` naming them
    (a config validator: an unknown engine is refused before the model loads)."""
    if name != "auto" and name not in ENGINES:
        raise ValueError(f"unknown engine '{name}': use auto, {', '.join(sorted(ENGINES))}")
    return name


def engine_class(name: str) -> Any:
    """The class registered as ``name`` in :data:`ENGINES` (imported now)."""
    import importlib

    target = ENGINES.get(name)
    if target is None:
        raise ConfigError(
            f"unknown engine '{name}'", f"available engines: auto, {', '.join(sorted(ENGINES))}"
        )
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_engine(name: str, loaded: LoadedModel, *, steering: bool = False) -> GenerationEngine:
    """Build the engine registered as ``name`` (or ``auto``) for ``loaded``; ``steering``: the
    run steers (``auto`` then picks an engine that can). Under ``auto`` a fast engine comes
    wrapped in :class:`FallbackEngine`: if it fails, the reference engine takes over (one
    warning) instead of the run stopping."""
    resolved = resolve_engine_name(name, loaded, steering=steering)
    engine: GenerationEngine = engine_class(resolved)(loaded)
    if name == "auto" and resolved != "hf":
        return FallbackEngine(engine)
    return engine


def falls_back(exc: BaseException) -> bool:
    """Whether :class:`FallbackEngine` hands a batch that raised ``exc`` to the reference
    engine: not for running out of memory (the caller retries a smaller batch) nor for the
    caller's own mistakes (:class:`~tracekit.errors.InputError`, :class:`ConfigError`), which
    the reference engine would raise too."""
    from tracekit.errors import InputError

    if isinstance(exc, (InputError, ConfigError)) or not isinstance(exc, Exception):
        return False
    message = str(exc).lower()
    return "out of memory" not in message and type(exc).__name__ != "OutOfMemoryError"


class FallbackEngine(GenerationEngine):
    """``auto``'s fast engine, with the reference engine behind it.

    A batch the fast engine fails on (a compilation it cannot do, a shape it does not take) is
    run again by the reference engine, with one warning naming the error; every later batch
    goes to the reference engine too, so a run never mixes engines after a failure. Errors that
    the reference engine would raise as well (:func:`falls_back`) propagate.
    """

    def __init__(self, fast: GenerationEngine) -> None:
        self.fast = fast
        self.loaded = fast.loaded
        self.name = fast.name
        """The engine that runs the next batch: the fast one's name, ``hf`` after a failure."""
        self.supports_steering = bool(getattr(fast, "supports_steering", False))
        self.fallback: GenerationEngine | None = None

    def plan_job(self, rows: int, max_new_tokens: int, batch_size: int) -> bool:
        """The fast engine's ``plan_job`` where it has one (see the CUDA engine's)."""
        plan = getattr(self.fast, "plan_job", None)
        return bool(plan(rows, max_new_tokens, batch_size)) if plan is not None else False

    @property
    def setup_parts(self) -> dict[str, float]:
        """The fast engine's one-time work by part (compilation, capture...), where it
        reports any."""
        return dict(getattr(self.fast, "setup_parts", {}))

    def _switch(self, exc: BaseException) -> GenerationEngine:
        logger.warning(
            "the %s engine failed on this model (%s: %s); the run falls back to the hf engine",
            self.fast.name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        self.fallback = engine_class("hf")(self.loaded)  # by name: hf imports this module
        self.name = self.fallback.name
        return self.fallback

    def _start(self, request: GenerationRequest) -> PendingOutput:
        """Start ``request`` on the engine in use; a failure of the fast engine, when starting
        the batch or when taking its result, reruns the batch on the reference."""
        if self.fallback is not None:
            return self.fallback.start(request)
        try:
            pending = self.fast.start(request)
        except Exception as exc:
            if not falls_back(exc):
                raise
            return self._switch(exc).start(request)
        return _Guarded(self, pending, request)


class _Guarded:
    """A fast engine's pending batch whose failure reruns it on the reference engine."""

    def __init__(
        self, owner: FallbackEngine, pending: PendingOutput, request: GenerationRequest
    ) -> None:
        self._owner, self._pending, self._request = owner, pending, request

    def result(self) -> GenerationOutput:
        try:
            return self._pending.result()
        except Exception as exc:
            if not falls_back(exc):
                raise
            owner = self._owner
            engine = owner.fallback if owner.fallback is not None else owner._switch(exc)
            return engine.start(self._request).result()


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end a row: the tokenizer's eos plus the generation config's eos ids."""
    ids: list[int] = []
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    gen_cfg = getattr(loaded.model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(extra, int):
        extra = [extra]
    for token in extra or []:
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    return ids


def sampling_seeds(
    params: GenerationParams, row_seeds: Sequence[int] | None, batch: int
) -> list[int] | None:
    """Each row's sampling seed for a batch of ``batch`` rows (None when greedy): ``row_seeds``,
    else ``params.seed`` plus the row's index, else fresh entropy plus the row's index (drawn
    without touching torch's global generator)."""
    import secrets

    if params.greedy:
        return None
    if row_seeds is not None and len(row_seeds) != batch:
        raise ValueError("row_seeds must have one seed per prompt")
    if row_seeds is not None:
        return list(row_seeds)
    base = params.seed if params.seed is not None else secrets.randbits(31)
    return [base + i for i in range(batch)]


def encode_prompts(tokenizer: object, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids for each prompt; strings are tokenized as-is (no special tokens added)."""
    out: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            out.append([int(t) for t in ids])
        else:
            out.append([int(t) for t in prompt])
        if not out[-1]:
            raise ConfigError("an empty prompt cannot be generated from")
    return out


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[batch, max_len]`` with padding on the left."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return to_device(ids, device), to_device(mask, device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, as HF generate derives them for left padding."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)
