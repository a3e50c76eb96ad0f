"""The ``--sae DIR`` layouts, choosing one SAE per layer, and the one layer mapping.

**Layer mapping (the one place it is defined).** SAE releases number layers by decoder block:
Gemma Scope's residual ``layer_N`` and SAELens's ``blocks.N.hook_resid_post`` encode the
residual stream *leaving* block N. In tracekit's numbering (README, "Layer indexing") that
vector is layer ``N + 1``; tracekit layer 0 (the embedding output) has no SAE in these releases.
So ``--sae DIR`` folders keep the release's own numbers, and tracekit layer L reads
``DIR/layer_{L-1}``: :func:`release_layer` and :func:`tracekit_layer` convert.

Two layouts are accepted, per layer:

- Gemma Scope, as the release is laid out: ``layer_N/width_W/average_l0_K/params.npz``
  (several widths and L0s may sit side by side; ``--sae-width`` and ``--sae-l0`` pick), or a
  single ``layer_N/params.npz``;
- SAELens, one folder per layer: ``layer_N/cfg.json`` + ``layer_N/sae_weights.safetensors``.
  Its ``hook_name`` is checked: ``blocks.N.hook_resid_post`` (or the identical
  ``blocks.{N+1}.hook_resid_pre``) belongs in ``layer_N``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tracekit.errors import InputError
from tracekit.sae.formats import (
    GEMMA_SCOPE_FILE,
    SAELENS_CONFIG,
    average_l0_from_path,
    load_gemma_scope,
    load_saelens,
)
from tracekit.sae.model import SparseAutoencoder

logger = logging.getLogger(__name__)

_LAYER_DIR = re.compile(r"^layer_(\d+)$")
_WIDTH_DIR = re.compile(r"^width_(\d+)([km]?)$", re.IGNORECASE)
_WIDTH_TEXT = re.compile(r"^\s*(\d+)\s*([km]?)\s*$", re.IGNORECASE)
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}

LAYOUT_HINT = (
    "--sae DIR holds layer_N/width_W/average_l0_K/params.npz (Gemma Scope) or "
    "layer_N/cfg.json + sae_weights.safetensors (SAELens), N = the release's layer number"
)


def release_layer(layer: int) -> int:
    """SAE-release layer number (block index) of tracekit layer ``layer`` (>= 1)."""
    if layer < 1:
        raise ValueError("tracekit layer 0 is the embedding output; SAE releases have none for it")
    return layer - 1


def tracekit_layer(release: int) -> int:
    """tracekit layer number of an SAE release's layer ``release`` (resid_post of that block)."""
    return release + 1


def parse_width(text: str) -> int:
    """``"16k"`` -> 16384, ``"1m"`` -> 1048576, ``"2048"`` -> 2048 (Gemma Scope's units)."""
    match = _WIDTH_TEXT.match(str(text))
    if not match:
        raise ValueError(f"invalid SAE width '{text}': use a number like 16384 or 16k")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_l0_choice(text: str) -> tuple[float | None, dict[int, float]]:
    """Parse ``--sae-l0``: ``"100"`` (every layer) and/or ``"12:82,13:84"`` (release layers).

    Returns (target for every layer, per-release-layer targets). Per layer, the available
    average L0 nearest the target is chosen.
    """
    default: float | None = None
    per_layer: dict[int, float] = {}
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise ValueError("empty --sae-l0: give a target like 100 or per layer like 12:82")
    for item in items:
        try:
            if ":" in item:
                layer_text, value_text = item.split(":", 1)
                layer = int(layer_text)
                if layer < 0:
                    raise ValueError
                per_layer[layer] = float(value_text)
            else:
                if default is not None:
                    raise ValueError
                default = float(item)
        except ValueError:
            raise ValueError(
                f"invalid --sae-l0 item '{item}' in '{text}': use one number (nearest L0 for "
                "every layer) and/or LAYER:L0 pairs with the release's layer numbers"
            ) from None
    return default, per_layer


@dataclass(frozen=True)
class SaeChoice:
    """Which SAE file serves one tracekit layer."""

    layer: int  # tracekit numbering
    release_layer: int
    path: Path  # params.npz or an SAELens folder
    format: str


def available_release_layers(root: Path) -> list[int]:
    """Release layer numbers of the ``layer_N`` folders under ``root``."""
    if not root.is_dir():
        raise InputError(f"SAE folder not found: {root}", "check the --sae path")
    found = [
        int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _LAYER_DIR.match(p.name))
    ]
    if not found:
        raise InputError(f"SAE folder {root} has no layer_N folders", LAYOUT_HINT)
    return sorted(found)


def _width_of_dir(path: Path) -> int | None:
    for part in reversed(path.parts):
        if match := _WIDTH_DIR.match(part):
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
    return None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _choose_gemma_scope(
    layer_dir: Path, names: str, width: int | None, l0_target: float | None
) -> Path:
    candidates = sorted(layer_dir.glob(f"*/*/{GEMMA_SCOPE_FILE}"))
    if not candidates:
        raise InputError(f"no SAE for {names}: {layer_dir} holds no SAE", LAYOUT_HINT)
    if width is not None:
        widths = sorted({w for c in candidates if (w := _width_of_dir(c)) is not None})
        candidates = [c for c in candidates if _width_of_dir(c) == width]
        if not candidates:
            raise InputError(
                f"no SAE of width {width} for {names} in {layer_dir}",
                f"widths there: {', '.join(str(w) for w in widths) or 'none named width_W'}",
            )
    widths_left = {_width_of_dir(c) for c in candidates}
    if len(widths_left) > 1:
        raise InputError(
            f"{layer_dir} holds SAEs of several widths for {names}",
            "pick one with --sae-width (e.g. 16k); widths: "
            + ", ".join(sorted({c.parent.parent.name for c in candidates})),
        )
    if len(candidates) == 1:
        return candidates[0]
    l0s = [(average_l0_from_path(c), c) for c in candidates]
    known = [(l0, c) for l0, c in l0s if l0 is not None]
    shown = ", ".join(_fmt(l0) for l0, _ in sorted(known, key=lambda item: item[0]))
    if l0_target is None or len(known) != len(candidates):
        raise InputError(
            f"{layer_dir} holds {len(candidates)} SAEs for {names} (average L0: {shown})",
            "pick one with --sae-l0 N (the nearest average L0 per layer) or LAYER:N",
        )
    # nearest target; on a tie the sparser SAE (smaller L0)
    return min(known, key=lambda item: (abs(item[0] - l0_target), item[0]))[1]


def _check_saelens_hook(folder: Path, hook_name: str | None, release: int, names: str) -> None:
    if hook_name is None:
        return
    match = _HOOK.match(hook_name)
    if match is None:
        logger.info(
            "SAE %s: hook '%s' not recognised; trusting the folder number", folder, hook_name
        )
        return
    block, point = int(match.group(1)), match.group(2)
    if (point, block) in (("resid_post", release), ("resid_pre", release + 1)):
        return
    if point in ("resid_post", "resid_pre"):
        true_release = block if point == "resid_post" else block - 1
        raise InputError(
            f"SAE {folder} was trained on {hook_name} (tracekit layer "
            f"{tracekit_layer(true_release)}), but {folder.name} must hold the SAE of "
            f"blocks.{release}.hook_resid_post for {names}",
            f"move it to layer_{true_release}"
            if true_release >= 0
            else "it encodes the embedding output, which tracekit does not pair with an SAE",
        )
    raise InputError(
        f"SAE {folder} was trained on {hook_name}, not on the residual stream",
        "tracekit pairs hidden states with residual-stream SAEs (hook_resid_post)",
    )


def choose_saes(
    root: str | Path,
    layers: Sequence[int],
    width: int | None = None,
    l0: str | None = None,
) -> dict[int, SaeChoice]:
    """Pick the SAE for each tracekit layer in ``layers`` under ``root`` (no weights loaded)."""
    base = Path(root).expanduser()
    available = available_release_layers(base)
    default_l0, per_layer_l0 = parse_l0_choice(l0) if l0 else (None, {})
    choices: dict[int, SaeChoice] = {}
    for layer in layers:
        if layer == 0:
            raise InputError(
                "tracekit layer 0 (the embedding output) has no SAE",
                "drop 0 from --layers: embeddings are always saved in the 'embeddings' array",
            )
        release = release_layer(layer)
        names = f"tracekit layer {layer} (SAE release layer {release})"
        layer_dir = base / f"layer_{release}"
        if not layer_dir.is_dir():
            tracekit_available = ", ".join(str(tracekit_layer(r)) for r in available)
            raise InputError(
                f"no SAE for {names}: {layer_dir} does not exist",
                f"{base} has SAEs for tracekit layers {tracekit_available}; "
                "choose --layers among them",
            )
        if (layer_dir / SAELENS_CONFIG).is_file():
            choices[layer] = SaeChoice(layer, release, layer_dir, "saelens")
        elif (layer_dir / GEMMA_SCOPE_FILE).is_file():
            choices[layer] = SaeChoice(layer, release, layer_dir / GEMMA_SCOPE_FILE, "gemma-scope")
        else:
            target = per_layer_l0.get(release, default_l0)
            path = _choose_gemma_scope(layer_dir, names, width, target)
            choices[layer] = SaeChoice(layer, release, path, "gemma-scope")
    unused = sorted(set(per_layer_l0) - {c.release_layer for c in choices.values()})
    if unused:
        raise InputError(
            f"--sae-l0 names release layer(s) {', '.join(map(str, unused))}, "
            "which are not among the chosen layers",
            "LAYER in LAYER:L0 is the release's number (tracekit layer minus 1)",
        )
    return choices


def default_sae_layers(root: str | Path) -> list[int]:
    """tracekit layers that ``root`` has SAEs for (used when ``--layers`` is not given)."""
    return [tracekit_layer(r) for r in available_release_layers(Path(root).expanduser())]


def load_chosen(choice: SaeChoice) -> SparseAutoencoder:
    """Load the SAE of one choice, checking an SAELens hook against the folder number."""
    names = f"tracekit layer {choice.layer} (SAE release layer {choice.release_layer})"
    if choice.format == "saelens":
        sae = load_saelens(choice.path)
        _check_saelens_hook(choice.path, sae.hook_name, choice.release_layer, names)
        return sae
    return load_gemma_scope(choice.path)


def load_saes(
    root: str | Path,
    layers: Sequence[int],
    width: int | None = None,
    l0: str | None = None,
) -> dict[int, SparseAutoencoder]:
    """One loaded SAE per tracekit layer in ``layers`` from an ``--sae DIR`` folder.

    All SAEs must share one width (the files store one ``activations`` array per sentence).
    """
    choices = choose_saes(root, layers, width, l0)
    saes = {layer: load_chosen(choice) for layer, choice in choices.items()}
    widths = {layer: sae.width for layer, sae in saes.items()}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"layer {layer}: {w}" for layer, w in widths.items())
        raise InputError(
            f"the chosen SAEs differ in width ({shown})",
            "choose one width for every layer with --sae-width, or fewer --layers",
        )
    d_ins = {sae.d_in for sae in saes.values()}
    if len(d_ins) > 1:
        raise InputError(f"the chosen SAEs differ in input width ({sorted(d_ins)})")
    return saes
