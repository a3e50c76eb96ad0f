"""Reading one SAE from disk, without any hub access: Gemma Scope and SAELens folders.

- **Gemma Scope**: a ``params.npz`` with ``W_enc`` ``[d_in, width]``, ``b_enc``, ``threshold``,
  ``b_dec`` (and ``W_dec``, which encoding does not need); JumpReLU. The release's folder
  ``.../average_l0_N/params.npz`` states the SAE's average L0 (N).
- **SAELens**: a folder with ``cfg.json`` and ``sae_weights.safetensors``; architectures
  ``standard`` (ReLU, or TopK via ``activation_fn``), ``jumprelu`` and ``topk``. The average L0 is
  ``k`` for TopK SAEs, a numeric ``average_l0``/``l0`` key in ``cfg.json`` if present, else
  unknown (NaN in the files).

Files are read with ``allow_pickle=False``; every problem becomes an :class:`InputError` that
names the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tracekit.errors import InputError
from tracekit.sae.model import Activation, InputNorm, SparseAutoencoder

logger = logging.getLogger(__name__)

GEMMA_SCOPE_FILE = "params.npz"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

_GS_KEYS = ("W_enc", "b_enc", "b_dec", "threshold")  # W_dec is not needed to encode
_L0_DIR = re.compile(r"^average_l0_(\d+(?:\.\d+)?)$")


def average_l0_from_path(path: Path) -> float | None:
    """The N of the nearest ``average_l0_N`` folder above ``path`` (Gemma Scope naming)."""
    for part in reversed(path.parts):
        if match := _L0_DIR.match(part):
            return float(match.group(1))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Turn any failure to parse ``path`` into one :class:`InputError` naming it."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # zip/safetensors errors differ by damage; all mean "corrupt"
        raise InputError(
            f"cannot read SAE file {path}: {_first_line(exc)}",
            f"the file is damaged or not a {kind} file; re-download it",
        ) from exc


def _require_keys(path: Path, wanted: Sequence[str], present: Sequence[str], what: str) -> None:
    missing = [key for key in wanted if key not in present]
    if missing:
        raise InputError(
            f"SAE file {path} lacks {', '.join(missing)} "
            f"(it holds {', '.join(sorted(present)) or 'nothing'})",
            f"{what} stores {', '.join(wanted)}",
        )


def _check_vector(name: str, array: Any, length: int, source: Path) -> None:
    if tuple(array.shape) != (length,):
        raise InputError(
            f"SAE file {source}: {name} has shape {tuple(array.shape)}, expected ({length},)",
            "the file is not a consistent SAE; re-download or re-export it",
        )


def load_gemma_scope(params: Path) -> SparseAutoencoder:
    """Load a Gemma Scope ``params.npz`` (JumpReLU)."""
    import numpy as np
    import torch

    if not params.is_file():
        raise InputError(f"SAE file not found: {params}")
    with _reading(params, "numpy .npz"), np.load(params, allow_pickle=False) as data:
        _require_keys(params, _GS_KEYS, data.files, "a Gemma Scope params.npz")
        arrays = {k: np.asarray(data[k], dtype=np.float32) for k in _GS_KEYS}
    w_enc = arrays["W_enc"]
    if w_enc.ndim != 2:
        raise InputError(f"SAE file {params}: W_enc has shape {w_enc.shape}, expected 2-D")
    d_in, width = w_enc.shape
    _check_vector("b_enc", arrays["b_enc"], width, params)
    _check_vector("threshold", arrays["threshold"], width, params)
    _check_vector("b_dec", arrays["b_dec"], d_in, params)
    return SparseAutoencoder(
        W_enc=torch.from_numpy(w_enc),
        b_enc=torch.from_numpy(arrays["b_enc"]),
        b_dec=torch.from_numpy(arrays["b_dec"]),
        threshold=torch.from_numpy(arrays["threshold"]),
        activation="jumprelu",
        format="gemma-scope",
        path=params,
        average_l0=average_l0_from_path(params),
    )


def _read_saelens_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / SAELENS_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"SAE config not found: {cfg_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"cannot read SAE config {cfg_path}: {_first_line(exc)}",
            "cfg.json must be the JSON config SAELens saves next to sae_weights.safetensors",
        ) from exc
    if not isinstance(cfg, dict):
        raise InputError(f"SAE config {cfg_path} must hold a JSON object")
    return cfg


def saelens_hook_name(cfg: dict[str, Any]) -> str | None:
    """The hook an SAELens SAE was trained on (top level in v5 configs, ``metadata`` in v6)."""
    name = cfg.get("hook_name")
    if name is None and isinstance(cfg.get("metadata"), dict):
        name = cfg["metadata"].get("hook_name")
    return name if isinstance(name, str) else None


def _saelens_activation(cfg: dict[str, Any], cfg_path: Path) -> tuple[Activation, int | None]:
    architecture = str(cfg.get("architecture") or "standard").lower()
    act_fn = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if architecture == "jumprelu":
        return "jumprelu", None
    if architecture == "topk" or (architecture == "standard" and act_fn == "topk"):
        k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(
                f"SAE config {cfg_path}: a TopK SAE needs a positive integer 'k', got {k!r}"
            )
        return "topk", k
    if architecture == "standard" and act_fn == "relu":
        return "relu", None
    raise InputError(
        f"SAE config {cfg_path}: architecture '{architecture}' with activation '{act_fn}' "
        "is not supported",
        "tracekit encodes SAELens 'standard' (ReLU), 'jumprelu' and 'topk' SAEs",
    )


def _saelens_input_norm(cfg: dict[str, Any], cfg_path: Path) -> InputNorm:
    norm = cfg.get("normalize_activations") or "none"
    if norm in ("none", "constant_norm_rescale", "layer_norm"):
        return norm  # type: ignore[return-value]
    raise InputError(
        f"SAE config {cfg_path}: normalize_activations='{norm}' is not supported",
        "tracekit applies 'none', 'constant_norm_rescale' and 'layer_norm'; fold a dataset "
        "scaling factor into W_enc/b_enc before exporting",
    )


def _declared_l0(cfg: dict[str, Any]) -> float | None:
    for key in ("average_l0", "l0"):
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def load_saelens(folder: Path) -> SparseAutoencoder:
    """Load an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    import torch

    cfg_path = folder / SAELENS_CONFIG
    cfg = _read_saelens_config(folder)
    activation, k = _saelens_activation(cfg, cfg_path)
    input_norm = _saelens_input_norm(cfg, cfg_path)
    weights = folder / SAELENS_WEIGHTS
    if not weights.is_file():
        raise InputError(f"SAE weights not found: {weights}", f"{cfg_path} needs it beside it")
    wanted = ["W_enc", "b_enc", "b_dec"]
    from safetensors import safe_open

    with _reading(weights, "safetensors"), safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
        if activation == "jumprelu":
            wanted.append("threshold" if "threshold" in keys else "log_threshold")
        _require_keys(weights, wanted, keys, f"a {activation} SAELens SAE")
        tensors = {key: handle.get_tensor(key).to(torch.float32) for key in wanted}
    w_enc = tensors["W_enc"]
    if w_enc.ndim != 2:
        raise InputError(f"SAE file {weights}: W_enc has shape {tuple(w_enc.shape)}, expected 2-D")
    d_in, width = (int(n) for n in w_enc.shape)
    for key, expected in (("d_in", d_in), ("d_sae", width)):
        declared = cfg.get(key)
        if declared is not None and declared != expected:
            raise InputError(
                f"SAE {folder}: cfg.json says {key}={declared} but W_enc is [{d_in}, {width}]",
                "cfg.json and sae_weights.safetensors come from different SAEs",
            )
    _check_vector("b_enc", tensors["b_enc"], width, weights)
    _check_vector("b_dec", tensors["b_dec"], d_in, weights)
    threshold = None
    if activation == "jumprelu":
        threshold = tensors.get("threshold")
        if threshold is None:  # training checkpoints store log(threshold)
            threshold = torch.exp(tensors["log_threshold"])
        _check_vector("threshold", threshold, width, weights)
    if activation == "topk" and k is not None and k > width:
        raise InputError(f"SAE config {cfg_path}: k={k} exceeds the SAE width {width}")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    average_l0 = float(k) if k is not None else _declared_l0(cfg)
    return SparseAutoencoder(
        W_enc=w_enc.contiguous(),
        b_enc=tensors["b_enc"],
        b_dec=tensors["b_dec"],
        threshold=threshold,
        activation=activation,
        format="saelens",
        path=folder,
        k=k,
        apply_b_dec_to_input=bool(apply_b_dec),
        input_norm=input_norm,
        average_l0=average_l0 if average_l0 is not None else average_l0_from_path(folder),
        hook_name=saelens_hook_name(cfg),
    )


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Load one SAE: a ``params.npz`` file, or a folder holding ``params.npz`` or ``cfg.json``."""
    target = Path(path).expanduser()
    if target.is_file():
        if target.name == SAELENS_CONFIG or target.name == SAELENS_WEIGHTS:
            return load_saelens(target.parent)
        return load_gemma_scope(target)
    if (target / SAELENS_CONFIG).is_file():
        return load_saelens(target)
    if (target / GEMMA_SCOPE_FILE).is_file():
        return load_gemma_scope(target / GEMMA_SCOPE_FILE)
    raise InputError(
        f"no SAE at {target}",
        f"expected a Gemma Scope {GEMMA_SCOPE_FILE} or an SAELens folder with {SAELENS_CONFIG} "
        f"and {SAELENS_WEIGHTS}",
    )
