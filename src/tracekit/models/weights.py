"""What exactly was loaded: the weights' SHA-256 and their quantization, for provenance.

A model id alone does not say which weights ran: the embedded model is SmolLM2-135M-Instruct
*Q4_1 de-quantized*, not the hub's bf16 checkpoint, and a folder can be edited in place.
Every output that records a model id also records :func:`weights_provenance`'s two fields.

``weights_sha256`` is the SHA-256 of the weight file when there is one (the GGUF file for the
embedded model), else of the lines ``"<file name>  <sha256>\\n"`` of every weight file in name
order. A file in the Hugging Face cache is a link to a blob named by its SHA-256, so it costs
nothing; any other file is hashed once and remembered in
``<tracekit cache dir>/weights-sha256.json`` under its path, size and modification time, so
later loads cost nothing either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekit.errors import InputError
from tracekit.storage.atomic import atomic_open, file_lock

logger = logging.getLogger(__name__)

WEIGHTS_FIELDS = ("quantization", "weights_sha256")
"""The fields recorded next to a model id that pin down its weights."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_BLOB_NAME = re.compile(r"^[0-9a-f]{64}$")


def _memo_path() -> Path:
    from tracekit.models.embedded import cache_root

    return cache_root() / "weights-sha256.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of one weight file: free for Hugging Face cache blobs, else hashed once."""
    real = path.resolve()
    if path.is_symlink() and _BLOB_NAME.match(real.name):
        return real.name  # HF cache: LFS blobs are stored under their SHA-256
    stat = real.stat()
    memo_key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = _memo_path()
    memo: dict[str, str] = {}
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(memo_key), str):
        return memo[memo_key]
    logger.info("hashing %s once (SHA-256, for provenance)", real)
    from tracekit.models.embedded import sha256_of

    value = sha256_of(real)
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(memo_file.with_suffix(".lock")):
            try:
                current = json.loads(memo_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                current = {}
            current[memo_key] = value
            with atomic_open(memo_file, "w") as out:
                json.dump(current, out, indent=0)
    except OSError as exc:  # a read-only cache only costs the hash next time
        logger.debug("cannot remember the weights hash in %s: %s", memo_file, exc)
    return value


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (not its sub-folders), by name."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def files_sha256(files: list[Path]) -> str | None:
    """The ``weights_sha256`` of a set of weight files (see the module docstring)."""
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{p.name}  {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def model_folder(source: str, revision: str | None) -> Path | None:
    """The local folder a model loads from (a path, or its snapshot in the HF cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache in a form we can read: no hash
        return None


def quantization_of(config: Any) -> str | None:
    """``"gptq 4-bit"``, ``"bitsandbytes 8-bit"``, ... from a model config, None if plain."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    data = quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()
    method = str(data.get("quant_method", "quantized"))
    bits = data.get("bits") or (
        4 if data.get("load_in_4bit") else 8 if data.get("load_in_8bit") else None
    )
    return f"{method} {bits}-bit" if bits else method


def weights_provenance(source: str, revision: str | None, config: Any) -> dict[str, str | None]:
    """``{"quantization": ..., "weights_sha256": ...}`` of a model loaded from ``source``."""
    known = weights_before_loading(source, revision)
    return {
        "quantization": known["quantization"]
        if "quantization" in known
        else quantization_of(config),
        "weights_sha256": known.get("weights_sha256"),
    }


def weights_before_loading(source: str, revision: str | None) -> dict[str, str | None]:
    """The fields of :func:`weights_provenance` known without loading the model: both for the
    embedded model (its folder's record of the GGUF file), ``weights_sha256`` for a folder or
    a hub id in the local cache (the hash is remembered, so the record after the load costs
    nothing more), ``{}`` otherwise. ``quantization`` of other models comes from the loaded
    config."""
    from tracekit.models.embedded import embedded_source_record

    embedded = embedded_source_record(Path(source)) if Path(source).is_dir() else None
    if embedded is not None:
        return embedded
    folder = model_folder(source, revision)
    if folder is None:
        return {}
    try:
        sha = files_sha256(weight_files(folder))
    except OSError as exc:
        logger.warning("cannot hash the weights in %s: %s", folder, exc)
        return {}
    return {} if sha is None else {"weights_sha256": sha}


def short_weights(provenance: dict[str, Any]) -> str:
    """``"Q4_1 GGUF de-quantized, sha256 3f2a…"`` for a summary line ('' when unknown)."""
    parts = []
    if provenance.get("quantization"):
        parts.append(str(provenance["quantization"]))
    if provenance.get("weights_sha256"):
        parts.append(f"sha256 {str(provenance['weights_sha256'])[:12]}")
    return ", ".join(parts)


def weights_mismatch(
    old: Mapping[str, Any], new: Mapping[str, Any], where: str = "store"
) -> str | None:
    """How the weights recorded in ``old`` (an output's, named ``where``) and ``new`` (this
    run's) differ, as ``field 'old' (where) != 'new' (this run)``; None when they agree or
    cannot be compared: a record without the fields (an older tracekit's) or an unknown hash
    matches any weights (:func:`weights_unrecorded` tells the caller to say so)."""
    for name in WEIGHTS_FIELDS:
        if name not in old or name not in new:
            continue
        if name == "weights_sha256" and (old[name] is None or new[name] is None):
            continue
        if old[name] != new[name]:
            return (
                f"{name} {shown_value(old[name])} ({where}) != {shown_value(new[name])} (this run)"
            )
    return None


def weights_unrecorded(record: Mapping[str, Any]) -> bool:
    """Whether a record leaves its weights unchecked (an older tracekit's, or an unknown hash)."""
    return record.get("weights_sha256") is None


def shown_value(value: Any, limit: int = 80) -> str:
    """A recorded value in a mismatch message, the same in every message: a string quoted,
    None as ``none`` (for ``quantization``: not quantized), anything else as JSON; cut to
    ``limit`` characters."""
    if value is None:
        return "none"
    text = repr(str(value)) if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class WeightsAgreement:
    """One model and one set of weights across many inputs: :meth:`add` each input's
    ``model``, ``quantization`` and ``weights_sha256``; one that disagrees with the first input
    recording the field is refused. A field an input lacks (an older tracekit's), an unknown
    model or an unknown hash is not compared; ``quantization`` None means "not quantized"."""

    inputs: str  # what the inputs are, in the message: "the sentence files"
    hint: str  # what to do when they disagree
    first: dict[str, tuple[Any, str]] = field(default_factory=dict)  # field: (value, input)
    recorded: dict[str, int] = field(default_factory=dict)  # field: how many inputs record it
    n_inputs: int = 0

    def add(self, where: str, record: Mapping[str, Any]) -> None:
        self.n_inputs += 1
        for name in ("model", *WEIGHTS_FIELDS):
            value = record.get(name)
            if name not in record or (value is None and name != "quantization"):
                continue
            agreed, first = self.first.setdefault(name, (value, where))
            self.recorded[name] = self.recorded.get(name, 0) + 1
            if value != agreed:
                raise InputError(
                    f"{self.inputs} come from different weights: {name} {shown_value(agreed)} "
                    f"({first}) != {shown_value(value)} ({where})",
                    self.hint,
                )

    def agreed(self) -> dict[str, Any]:
        """The fields every input records, with their one value."""
        return {k: v for k, (v, _) in self.first.items() if self.recorded[k] == self.n_inputs}

    def partial(self) -> dict[str, int]:
        """The fields only some inputs record: how many do (the others may differ)."""
        return {k: n for k, n in self.recorded.items() if n < self.n_inputs}
