"""The generation cache: ``<stem>_{completions,full_texts}.npy`` + JSON + Markdown + metadata.

A cache is named by its *stem path*, e.g. ``experiments/m/generations/x/all/n1374_t1.0_maxtok100``;
its files are ``<stem>_completions.npy``, ``<stem>_full_texts.npy`` (fixed-width unicode arrays,
readable without pickle), their ``.json`` (a JSON array of strings) and ``.md`` renderings, and
``<stem>_metadata.json``. Every file is written atomically, and the metadata file last, so a
cache whose metadata exists is complete.

This module owns the on-disk format (writing, reading, rendering); ``tracekit.jobs.decode``
walks a tree of caches and renders the ones that lack JSON/Markdown.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, overload

from tracekit.errors import InputError, UnsafeInputError
from tracekit.storage.atomic import save_npy, write_json, write_text
from tracekit.storage.npy import read_npy_header
from tracekit.storage.restricted_pickle import UnsafePickleError, restricted_load

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

Kind = Literal["completions", "full_texts"]
KINDS: tuple[Kind, ...] = ("completions", "full_texts")
RENDER_FORMATS = ("json", "md")

# the markdown title and per-item heading of each kind (seed 001's shape)
_MD_TITLES: dict[str, tuple[str, str]] = {
    "completions": ("Completions Only", "Completion"),
    "full_texts": ("Full Texts", "Full Text"),
}
NO_METADATA = "unknown (no metadata file)"
"""Model and time of a cache without ``<stem>_metadata.json``."""
# metadata keys that name the generating model / the generation time, first match wins
# (older caches used other spellings)
_MODEL_KEYS = ("model", "model_name", "gen_model", "model_id")
_TIME_KEYS = ("generated", "generated_at", "timestamp", "created_at", "date")
_SUFFIXES = (
    "_completions.npy",
    "_full_texts.npy",
    "_completions.json",
    "_full_texts.json",
    "_completions.md",
    "_full_texts.md",
    "_metadata.json",
)


@dataclass(frozen=True)
class CacheFiles:
    """The paths of one generation cache, derived from its stem path."""

    stem: Path

    @classmethod
    def of(cls, cache_path: str | os.PathLike[str]) -> CacheFiles:
        """Files of the cache at ``cache_path``: its stem, or the path of any of its files."""
        text = os.fspath(cache_path)
        for suffix in _SUFFIXES:
            if text.endswith(suffix):
                text = text[: -len(suffix)]
                break
        return cls(Path(text))

    def npy(self, kind: Kind) -> Path:
        return self.stem.with_name(f"{self.stem.name}_{kind}.npy")

    def rendered(self, kind: Kind, fmt: str) -> Path:
        return self.stem.with_name(f"{self.stem.name}_{kind}.{fmt}")

    @property
    def metadata(self) -> Path:
        return self.stem.with_name(f"{self.stem.name}_metadata.json")


def kind_of(npy_path: Path) -> Kind:
    """``completions`` or ``full_texts`` for a cache ``.npy`` file name."""
    for kind in KINDS:
        if npy_path.name.endswith(f"_{kind}.npy"):
            return kind
    raise InputError(
        f"{npy_path} is not a generation cache file",
        "cache files end in _completions.npy or _full_texts.npy",
    )


# --- rendering ------------------------------------------------------------------------------
def model_name(metadata: Mapping[str, Any]) -> str:
    """The generating model recorded in ``metadata`` ("unknown" when absent)."""
    for key in _MODEL_KEYS:
        if metadata.get(key):
            return str(metadata[key])
    return "unknown"


def generated_time(metadata: Mapping[str, Any]) -> str:
    """The generation time recorded in ``metadata`` ("unknown" when absent); a Unix timestamp
    (seconds, as the seeds' ``time.time()``) is shown as ``YYYY-MM-DD HH:MM:SS UTC``."""
    for key in _TIME_KEYS:
        value = metadata.get(key)
        if value:
            return _format_time(value)
    return "unknown"


def _format_time(value: Any) -> str:
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            return value
    if seconds is None:
        return str(value)
    try:
        moment = datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def render_markdown(
    kind: Kind,
    items: Sequence[str],
    metadata: Mapping[str, Any] | None,
    total: int | None = None,
) -> str:
    """Markdown in seed 001's shape: title, **Model:**, **Generated:**, **Count:**, sections.

    ``items`` are the items to show (already limited); ``total`` is how many the cache holds.
    ``metadata`` None: the cache has no metadata file (caches older than it), so the model and
    the generation time are shown as unknown, saying why.
    """
    title, heading = _MD_TITLES[kind]
    total = len(items) if total is None else total
    if metadata is None:
        model = generated = NO_METADATA
    else:
        model, generated = model_name(metadata), generated_time(metadata)
    lines = [
        f"# {title}",
        "",
        f"**Model:** {model}",
        f"**Generated:** {generated}",
        f"**Count:** {len(items)} (showing first {len(items)} of {total})",
        "",
        "---",
        "",
    ]
    for number, text in enumerate(items, start=1):
        lines += [f"## {heading} {number}", "", text, "", "---", ""]
    return "\n".join(lines)


def render_json(items: Sequence[str]) -> str:
    """A JSON array of the items, indented, non-ASCII kept readable."""
    return json.dumps(list(items), indent=2, ensure_ascii=False) + "\n"


def render(
    kind: Kind,
    fmt: str,
    items: Sequence[str],
    metadata: Mapping[str, Any] | None,
    total: int | None = None,
) -> str:
    """The ``fmt`` (``json`` or ``md``) rendering of ``items``."""
    if fmt == "json":
        return render_json(items)
    if fmt == "md":
        return render_markdown(kind, items, metadata, total)
    raise ValueError(f"unknown render format {fmt!r}: use 'json' or 'md'")


# --- writing --------------------------------------------------------------------------------
def _text_array(name: str, values: Iterable[str]) -> np.ndarray:
    import numpy as np

    items = list(values)
    bad = next((i for i, v in enumerate(items) if not isinstance(v, str)), None)
    if bad is not None:
        raise InputError(
            f"{name}[{bad}] is {type(items[bad]).__name__}, not str",
            "pass a sequence of strings",
        )
    # fixed-width unicode ('<U'): loads without pickle; an empty list still gets a text dtype
    return np.array(items, dtype=str) if items else np.array([], dtype="<U1")


def save_generations_to_cache(
    cache_path: str | os.PathLike[str],
    full_texts: Sequence[str],
    completions: Sequence[str],
    metadata: Mapping[str, Any],
    *,
    formats: Iterable[str] = RENDER_FORMATS,
    limit: int | None = None,
) -> CacheFiles:
    """Write a generation cache at stem path ``cache_path`` and return its file paths.

    Writes ``<stem>_full_texts.npy`` and ``<stem>_completions.npy`` (fixed-width unicode, no
    pickle), their ``.json`` / ``.md`` renderings for each of ``formats`` (the first ``limit``
    items; all when ``None``), then ``<stem>_metadata.json``. ``cache_path`` may also be the
    path of one of the cache's files (``..._completions.npy``). Metadata gets ``count`` and,
    when missing, ``generated`` (local time, ``YYYY-MM-DD HH:MM:SS``). Each file is written
    atomically and the metadata last; nothing is written when an argument is invalid.
    """
    files = CacheFiles.of(cache_path)
    wanted = list(formats)
    unknown = [f for f in wanted if f not in RENDER_FORMATS]
    if unknown:
        raise ValueError(f"unknown render format {unknown[0]!r}: use 'json' and/or 'md'")
    if limit is not None and limit < 1:
        raise ValueError("limit must be a positive number of items")
    arrays = {
        "full_texts": _text_array("full_texts", full_texts),
        "completions": _text_array("completions", completions),
    }
    if len(arrays["full_texts"]) != len(arrays["completions"]):
        raise InputError(
            f"full_texts has {len(arrays['full_texts'])} items but completions has "
            f"{len(arrays['completions'])}",
            "pass one full text per completion",
        )
    meta = dict(metadata)
    meta["count"] = len(arrays["completions"])
    if not any(meta.get(key) for key in _TIME_KEYS):
        meta["generated"] = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"metadata for {files.stem} cannot be written as JSON: {exc}",
            "use str, int, float, bool, list and dict values only",
        ) from None
    for kind in KINDS:
        save_npy(files.npy(kind), arrays[kind])
    for kind in KINDS:
        items = arrays[kind].tolist()
        shown = items if limit is None else items[:limit]
        for fmt in wanted:
            write_text(files.rendered(kind, fmt), render(kind, fmt, shown, meta, len(items)))
    write_json(files.metadata, meta)
    logger.debug("saved generation cache %s (%d items)", files.stem, meta["count"])
    return files


# --- reading --------------------------------------------------------------------------------
def read_text_array(
    path: Path, *, limit: int | None = None, allow_pickle: bool = False
) -> tuple[list[str], int]:
    """The first ``limit`` strings of a cache ``.npy`` (all if ``None``) and its item count.

    Fixed-width text arrays are memory-mapped, so ``limit`` reads only what it shows. Old caches
    hold a pickle: an object array (``np.save`` of ``dtype=object`` texts) or a bare pickled
    list of texts (``np.load(allow_pickle=True)`` reads both). They are unpickled by the
    restricted unpickler (plain containers, strings, numbers, numpy arrays), and one that needs
    any other class raises :class:`UnsafeInputError` naming it, before anything is called.
    ``allow_pickle`` loads them with :mod:`pickle` instead, which executes code from the file.
    """
    import numpy as np

    if not path.is_file():
        raise InputError(f"cache file not found: {path}", "check the cache path")
    with path.open("rb") as handle:
        header = _npy_header(path, handle)
        if header is None or header[1].hasobject:  # a bare pickle, or an object array's
            values = _unpickle_texts(path, handle, allow_pickle)
            total = len(values)
            chosen: Any = values if limit is None else values[:limit]
            return [_as_text(v) for v in chosen], total
    shape, dtype = header
    if dtype.kind not in ("U", "S"):
        raise InputError(
            f"{path} holds {dtype} values, not texts", "a generation cache holds strings"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        chosen = array if limit is None else array[:limit]
        items = [_as_text(v) for v in chosen.tolist()]
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(
            f"cannot read {path}: the file is truncated or corrupt ({_first_line(exc)})",
            "regenerate the cache or remove the file",
        ) from None
    return items, int(shape[0])


_PICKLE_START = b"\x80"  # the PROTO opcode that starts a pickle of protocol 2 or later


def _npy_header(path: Path, handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a ``.npy`` header (``handle`` is left at the data), or None for a
    file that is a bare pickle (``handle`` back at its start)."""
    if handle.read(1) == _PICKLE_START:
        handle.seek(0)
        return None
    handle.seek(0)
    try:
        shape, _fortran, dtype = read_npy_header(handle)
    except (ValueError, EOFError, OSError) as exc:
        raise InputError(
            f"cannot read {path}: not a valid .npy file ({_first_line(exc)})",
            "regenerate the cache or remove the file",
        ) from None
    if len(shape) != 1:
        raise InputError(
            f"{path} holds an array of shape {tuple(shape)}, not a list of texts",
            "a generation cache holds one text per item",
        )
    return shape, dtype


def _unpickle_texts(path: Path, handle: BinaryIO, allow_pickle: bool) -> list[Any]:
    """The items of the pickle at ``handle``: a one-dimensional array, a list or a tuple."""
    import pickle

    import numpy as np

    try:
        data = pickle.load(handle) if allow_pickle else restricted_load(handle)  # noqa: S301
    except UnsafePickleError as exc:
        raise UnsafeInputError(
            f"{path} is a pickle that needs {exc}, which tracekit does not load (only "
            "containers, strings, numbers and numpy arrays); nothing from it was run",
            "pass --allow-pickle (allow_pickle=True) to load it with pickle, which EXECUTES "
            "CODE from the file: only for a file you trust",
        ) from None
    except Exception as exc:  # unpickling failures come in every type
        raise InputError(
            f"cannot read {path}: the file is truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(exc)})",
            "regenerate the cache or remove the file",
        ) from None
    if isinstance(data, np.ndarray) and data.ndim == 1:
        return data.tolist()
    if isinstance(data, (list, tuple)):
        return list(data)
    what = (
        f"an array of shape {data.shape}"
        if isinstance(data, np.ndarray)
        else (f"a pickled {type(data).__name__}")
    )
    raise InputError(
        f"{path} holds {what}, not a list of texts", "a generation cache holds one text per item"
    )


def check_same_length(files: CacheFiles, n_full_texts: int, n_completions: int) -> None:
    """Refuse a cache whose two arrays disagree: item k of one belongs to item k of the other."""
    if n_full_texts != n_completions:
        raise InputError(
            f"{files.stem}: the cache is damaged: {files.npy('completions').name} holds "
            f"{n_completions} items but {files.npy('full_texts').name} holds {n_full_texts}",
            "regenerate the cache (item k of one file must belong to item k of the other)",
        )


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@overload
def read_metadata(files: CacheFiles, missing_ok: Literal[False] = False) -> dict[str, Any]: ...
@overload
def read_metadata(files: CacheFiles, missing_ok: bool) -> dict[str, Any] | None: ...
def read_metadata(files: CacheFiles, missing_ok: bool = False) -> dict[str, Any] | None:
    """The cache's metadata; a clear :class:`InputError` when missing (None with
    ``missing_ok``) or malformed."""
    path = files.metadata
    if missing_ok and not path.exists():
        return None
    if not path.is_file():
        raise InputError(
            f"metadata file missing: {path}",
            "every cache needs <stem>_metadata.json next to its .npy files "
            '(at least {"model": ...}); regenerate the cache or write it by hand',
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"metadata file {path} is not valid JSON ({_first_line(exc)})",
            "fix or regenerate the metadata file",
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"metadata file {path} must hold a JSON object, not {type(data).__name__}",
            "fix or regenerate the metadata file",
        )
    return data


def load_generations_from_cache(
    cache_path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[list[str], list[str], dict[str, Any]]:
    """``(full_texts, completions, metadata)`` of the cache at stem path ``cache_path``.

    Reads the ``.npy`` files (the source of truth; JSON/Markdown are for people). Old caches
    saved as object arrays are refused unless ``allow_pickle=True``, which executes code from
    the file.
    """
    files = CacheFiles.of(cache_path)
    metadata = read_metadata(files)
    full_texts, _ = read_text_array(files.npy("full_texts"), allow_pickle=allow_pickle)
    completions, _ = read_text_array(files.npy("completions"), allow_pickle=allow_pickle)
    check_same_length(files, len(full_texts), len(completions))
    count = metadata.get("count")
    if isinstance(count, int) and count != len(completions):
        logger.warning(
            "%s: metadata says %d items but the cache holds %d", files.stem, count, len(completions)
        )
    return full_texts, completions, metadata
