"""Loading a causal LM and its tokenizer: by hub id, local folder, or the embedded default.

Device and dtype are resolved once, explicitly (:func:`resolve_device`, :func:`resolve_dtype`),
never inside config validators. ``auto`` dtype is bfloat16 on CUDA and float32 elsewhere;
``device_map="auto"`` hands placement of models larger than one device to accelerate.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import field_validator

from tracekit.config.base import TracekitConfig
from tracekit.config.choices import DeviceMapName, DtypeName
from tracekit.errors import ModelError
from tracekit.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir
from tracekit.models.layers import LayerHandles

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class ModelChoice(TracekitConfig):
    """Which model, and where: the fields :class:`ModelConfig` shares with the configs of
    ``generate`` and ``extract activations`` (:class:`tracekit.config.generate.RuntimeOptions`)."""

    model: str | None = None
    """Hub id or local folder; ``None`` is the embedded SmolLM2-135M-Instruct."""
    revision: str | None = None
    dtype: DtypeName = DtypeName.auto
    device: str = "auto"
    device_map: DeviceMapName | None = None

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        value = value.strip().lower()
        head = value.split(":", 1)[0]
        if head not in ("auto", "cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"unknown device '{value}': use auto, cpu, cuda, cuda:N or mps")
        return value


class ModelConfig(ModelChoice):
    """Which model to load, and where."""

    trust_remote_code: bool = False


@dataclass
class LoadedModel:
    """A model ready for tracekit: module, tokenizer, layer handles and provenance."""

    model: Any
    tokenizer: Any
    name: str
    revision: str | None
    source_path: str
    dtype: torch.dtype
    device: torch.device
    handles: LayerHandles
    quantization: str | None = None
    """How the weights were quantized before loading (``None``: not quantized)."""
    weights_sha256: str | None = None
    """SHA-256 of the weight file(s) (tracekit.models.weights), ``None`` when unknown."""

    def provenance(self) -> dict[str, str | None]:
        """The model id with what pins down its weights; recorded wherever a model id is."""
        return {
            "model": self.name,
            "quantization": self.quantization,
            "weights_sha256": self.weights_sha256,
        }

    @property
    def label(self) -> str:
        """The model for a summary line: id, quantization and a short weights hash."""
        from tracekit.models.weights import short_weights

        detail = short_weights(self.provenance())
        return f"{self.name} ({detail})" if detail else self.name

    @property
    def n_layers(self) -> int:
        """Selectable layers (embedding output + one per decoder block)."""
        return self.handles.n_layers

    @property
    def hidden_size(self) -> int:
        return self.handles.hidden_size

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> dict[str, Any]:
        """Provenance for metadata files."""
        import torch
        import transformers

        return {
            **self.provenance(),
            "revision": self.revision,
            "source_path": self.source_path,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "architecture": type(self.model).__name__,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``mps``, else ``cpu``."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device '{device}' requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: DtypeName, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def _model_source(cfg: ModelChoice) -> tuple[str, str]:
    """(display name, path or hub id to load from)."""
    if cfg.model is None:
        return EMBEDDED_MODEL_NAME, str(embedded_model_dir())
    path = Path(cfg.model).expanduser()
    if path.is_file():
        raise ModelError(
            f"--model {path} is a file, not a model folder",
            "point --model at a Hugging Face model folder (config.json + weights) or give a hub id",
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} has no config.json",
                "point --model at a Hugging Face model folder or give a hub id",
            )
        return cfg.model, str(path)
    if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1:
        raise ModelError(f"model path not found: {cfg.model}", "check the --model path")
    return cfg.model, cfg.model


def known_weights(cfg: ModelChoice) -> dict[str, str | None]:
    """What pins down the weights of the model ``cfg`` names, as far as known before loading
    it (:func:`tracekit.models.weights.weights_before_loading`): lets a resume refuse an
    output from other weights without a model load."""
    from tracekit.models.weights import weights_before_loading

    _, source = _model_source(cfg)
    return weights_before_loading(source, cfg.revision)


@contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' own tqdm bars ("Loading weights") while tracekit loads a model:
    tracekit reports progress through its own console; the caller's setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer_only(cfg: ModelConfig) -> tuple[str, Any]:
    """(display name, tokenizer) of the model ``cfg`` names, without loading its weights."""
    name, source = _model_source(cfg)
    with quiet_hf_progress():
        return name, load_tokenizer(source, cfg)


def load_tokenizer(source: str, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except ValueError as exc:  # e.g. a folder without tokenizer files: transformers' own words
        raise ModelError(
            f"cannot load the tokenizer of model '{source}': {' '.join(str(exc).split())}",
            "a model folder needs its tokenizer files (tokenizer.json, or tokenizer_config.json "
            "with the files it names) next to config.json",
        ) from exc
    except OSError as exc:  # e.g. a hub id that is not in the local cache, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load the tokenizer of model '{source}': {first}",
            "give a local model folder, or a hub id that is in the local Hugging Face cache",
        ) from exc
    if tokenizer.pad_token is None:
        # Safe only because tracekit pads on the left and always passes an attention mask.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(cfg: ModelConfig | None = None) -> LoadedModel:
    """Load the model and tokenizer ``cfg`` names (the embedded default when ``model`` is None)."""
    cfg = cfg or ModelConfig()
    with quiet_hf_progress():
        return _load_model(cfg)


def _load_model(cfg: ModelConfig) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    name, source = _model_source(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        tokenizer = load_tokenizer(source, cfg)
        kwargs: dict[str, Any] = {
            "revision": cfg.revision,
            "dtype": dtype,
            "trust_remote_code": cfg.trust_remote_code,
        }
        if cfg.device_map is not None:
            kwargs["device_map"] = cfg.device_map.value
        with warnings.catch_warnings():  # torch's note on a pickle it is about to refuse
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met more than tensors
        raise ModelError(
            f"cannot load model '{name}': its weights file is a pickle that holds more than "
            "tensors, and loading it would run code from the file",
            "convert the weights to safetensors with a tool you trust, or use another model",
        ) from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load model '{name}': {first}",
            "give a local model folder, or a hub id that is in the local Hugging Face cache",
        ) from exc
    if cfg.device_map is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    handles = LayerHandles.of(model)
    first_param = next(model.parameters())
    from tracekit.models.weights import weights_provenance

    weights = weights_provenance(source, cfg.revision, model.config)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        revision=cfg.revision,
        source_path=source,
        dtype=first_param.dtype if dtype is None else dtype,
        device=first_param.device if cfg.device_map is not None else torch.device(device),
        handles=handles,
        quantization=weights["quantization"],
        weights_sha256=weights["weights_sha256"],
    )
