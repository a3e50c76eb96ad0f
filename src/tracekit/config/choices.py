"""The closed sets of values that options take (normalizations, strategies, formats, steering).

Plain enums with no pydantic import: the CLI declares its options with them, and ``--help``
and TAB completion must not pay for pydantic. Configs use the same enums as field types.
"""

from __future__ import annotations

from enum import StrEnum


class Normalization(StrEnum):
    """How features are scaled before they are saved in a dataset."""

    standardize = "standardize"
    minmax = "minmax"
    none = "none"


class Strategy(StrEnum):
    """What a dataset maps from and to."""

    embedding_to_feature = "embedding-to-feature"
    hidden_to_feature = "hidden-to-feature"
    hidden_to_concept = "hidden-to-concept"

    @property
    def predicts_feature(self) -> bool:
        return self is not Strategy.hidden_to_concept


class DecodeFormat(StrEnum):
    """Which renderings ``decode`` writes."""

    json = "json"
    md = "md"
    both = "both"

    @property
    def extensions(self) -> tuple[str, ...]:
        return ("json", "md") if self is DecodeFormat.both else (self.value,)


class VectorMethod(StrEnum):
    """How ``extract vectors`` turns paired activations into a vector (``vectors.methods``)."""

    mean_diff = "mean_diff"
    pca_diff = "pca_diff"
    probe = "probe"


class NegRule(StrEnum):
    """Which neg rows pass the judge filter: ``mirrored`` keeps neg ``trait < 100 - threshold``
    (persona_vectors' ``generate_vec.py``), ``same`` keeps neg ``trait < threshold``."""

    mirrored = "mirrored"
    same = "same"


class VectorExport(StrEnum):
    """Extra formats ``extract vectors`` writes."""

    gguf = "gguf"


class SteerPositions(StrEnum):
    """Where ``generate --steer-vector`` adds the vector (:mod:`tracekit.engines.steering`)."""

    response = "response"
    """The positions that produce response tokens: the last prompt position in the prefill
    and the fed token of every decode step (persona_vectors' ``steering_type="response"``)."""
    prompt = "prompt"
    """Every prompt position in the prefill; nothing while decoding."""
    all = "all"
    """Every position of every forward call."""


class SteerControl(StrEnum):
    """The control direction of a steering sweep."""

    random = "random"


class SteerPrompts(StrEnum):
    """Which rows a steered run asks: the questions without instruction, or the trait's
    pos/neg instructed rows."""

    neutral = "neutral"
    trait = "trait"


class ReportPolarity(StrEnum):
    """Which rows of each steering set ``report steering`` reads (``pos``/``neg``: the sets of
    a ``--steer-prompts trait`` sweep)."""

    all = "all"
    neutral = "neutral"
    pos = "pos"
    neg = "neg"


class JudgeBackendName(StrEnum):
    """Where judge scores come from: an OpenAI-compatible server, or a local model."""

    openai = "openai"
    local = "local"


class DtypeName(StrEnum):
    """The dtype a model is loaded in (``--dtype``, ``log --model-dtype``); ``auto`` is bfloat16
    on CUDA and float32 elsewhere (:func:`tracekit.models.loading.resolve_dtype`)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StoreDtype(StrEnum):
    """The dtype ``log`` stores activations in (``log --dtype``)."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class SequenceMode(StrEnum):
    """Which positions ``log`` stores (``--sequence-mode``)."""

    all = "all"
    """The real prompt tokens and the response tokens."""
    prompt = "prompt"
    """The real prompt tokens (padding excluded)."""
    response = "response"
    """The response tokens, the eos token excluded."""


class SaeStorage(StrEnum):
    """How ``extract features`` writes SAE activations (``--sae-storage``)."""

    dense = "dense"
    """``activations`` ``[layers, tokens, width]``, as the seed has it."""
    sparse = "sparse"
    """CSR indices and values (much smaller; build-dataset reads both)."""


class DeviceMapName(StrEnum):
    """How a model is spread over devices (``--device-map``); unset: one device."""

    auto = "auto"
    """accelerate places a model too large for one device over all devices."""
