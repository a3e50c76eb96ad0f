"""Sentence feature NPZ files (``sentence_000000.npz``, ...; see docs/build-dataset.md): the one
writer (:func:`write_sentence_file`, ``extract features``) and reader (``build-dataset``).

One file per sentence holds ``embeddings`` [fragments, d], ``hidden_states`` [layers, fragments, d]
for the tracekit layers in ``layers`` (files without ``layers``, as seed 004 writes them, are
numbered the seed's way: layer L is ``hidden_states[L]``), SAE activations (dense
``activations`` [layers, fragments, width] or the sparse CSR arrays ``act_values``/
``act_indices``/``act_indptr``/``act_shape``, or none), ``average_l0s``,
``concept_strength_label`` and ``is_final_token``.

Files are read lazily and sliced: :class:`SentenceFile` parses the ``.npy`` headers inside the
zip and reads only the bytes of the rows asked for (the final-token row of the needed layers),
so building a dataset never holds all layers of all files. Stored (uncompressed) members are
read with a plain seek; compressed members are streamed up to the slice. Nothing is unpickled.

:func:`get_final_token_data` gathers the final-token rows of many files into preallocated
arrays in two passes: the first reads only headers and small arrays and validates everything
(model and weights, layers, widths, labels), the second fills the output.

Written: one atomic ``.npz`` per sentence, no object arrays. Seed-compatible arrays:
``embeddings``, ``hidden_states``, ``layers``, ``activations`` (dense layout), ``average_l0s``,
``concept_strength_label``, ``is_final_token``; tracekit additions: ``sae_width``,
``sae_storage``, ``sae_format``, ``sae_layers`` (the release's numbers), ``sentence``,
``tokens``, ``model`` with its ``quantization`` and ``weights_sha256`` (strings, ``""`` for
none; files written before tracekit recorded the weights lack them: :func:`sentence_provenance`
reads all three), and in the sparse layout ``act_values``/``act_indices``/``act_indptr``/
``act_shape`` (CSR over rows ``layer_pos * n_fragments + fragment``) instead of ``activations``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tracekit.errors import InputError, UnsafeInputError
from tracekit.models.weights import WEIGHTS_FIELDS, WeightsAgreement
from tracekit.storage.atomic import save_npz
from tracekit.storage.npy import read_npy_header

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

SENTENCE_GLOB = "sentence_*.npz"
_SENTENCE_NAME = re.compile(r"^sentence_(\d+)\.npz$")
_SPARSE_ARRAYS = ("act_values", "act_indices", "act_indptr", "act_shape")
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)


@dataclass(frozen=True)
class ArrayInfo:
    """Where one array lives inside a sentence file, from its ``.npy`` header."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    member: str
    data_offset: int  # offset of the array data inside the member
    raw_offset: int | None  # absolute offset in the zip file for stored members, else None

    @property
    def size(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


class SentenceFile(Mapping[str, "np.ndarray"]):
    """A lazy, read-only view of one sentence NPZ: ``file["layers"]`` reads one array.

    ``read_rows`` / ``read_flat`` read only the bytes of a slice. Use ``with file.opened():``
    around many reads of the same file to keep it open in between.
    """

    def __init__(self, path: str | Path, index: int | None = None) -> None:
        self.path = Path(path)
        self.index = index if index is not None else sentence_index(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._raw: BinaryIO | None = None
        self._infos: dict[str, ArrayInfo] = {}
        self._names: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"SentenceFile({str(self.path)!r}, index={self.index})"

    # --- opening ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def opened(self) -> Iterator[SentenceFile]:
        """Keep the file open for the duration of the block (reads reuse the handle)."""
        if self._zip is not None:
            yield self
            return
        try:
            raw = self.path.open("rb")
        except OSError as exc:
            raise InputError(f"cannot open sentence file {self.path}: {exc.strerror}") from None
        try:
            self._zip = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raw.close()
            raise self._corrupt(exc) from None
        self._raw = raw
        try:
            yield self
        finally:
            self._zip.close()
            raw.close()
            self._zip = None
            self._raw = None

    def _corrupt(self, exc: BaseException) -> InputError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return InputError(
            f"cannot read sentence file {self.path}: not a valid .npz ({detail})",
            "re-run `tracekit extract features` for it, or remove the file",
        )

    # --- mapping interface ----------------------------------------------------------------------
    def _member_names(self) -> tuple[str, ...]:
        if self._names is None:
            with self.opened():
                assert self._zip is not None
                self._names = tuple(
                    n[:-4] for n in self._zip.namelist() if n.endswith(".npy") and "/" not in n
                )
        return self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._member_names())

    def __len__(self) -> int:
        return len(self._member_names())

    def __contains__(self, name: object) -> bool:
        return name in self._member_names()

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self.read_flat(name, 0, info.size).reshape(
            info.shape, order="F" if info.fortran_order else "C"
        )

    def require(self, name: str, why: str) -> ArrayInfo:
        """The info of ``name``; a clear :class:`InputError` naming ``why`` when it is absent."""
        if name not in self:
            raise InputError(
                f"{self.path} has no '{name}' array, which {why}",
                f"arrays in the file: {', '.join(sorted(self)) or 'none'}",
            )
        return self.info(name)

    # --- headers and slices ---------------------------------------------------------------------
    def info(self, name: str) -> ArrayInfo:
        """Shape, dtype and location of array ``name`` (reads only its header)."""
        cached = self._infos.get(name)
        if cached is not None:
            return cached
        if name not in self:
            raise KeyError(name)
        member = f"{name}.npy"
        with self.opened():
            assert self._zip is not None and self._raw is not None
            try:
                zinfo = self._zip.getinfo(member)
                with self._zip.open(zinfo) as handle:
                    shape, fortran, dtype = read_npy_header(handle)
                    data_offset = handle.tell()
                raw_offset = None
                if zinfo.compress_type == zipfile.ZIP_STORED:
                    self._raw.seek(zinfo.header_offset)
                    fields = _LOCAL_HEADER.unpack(self._raw.read(_LOCAL_HEADER.size))
                    name_len, extra_len = fields[-2], fields[-1]
                    raw_offset = (
                        zinfo.header_offset
                        + _LOCAL_HEADER.size
                        + name_len
                        + extra_len
                        + data_offset
                    )
            except (ValueError, EOFError, OSError, zipfile.BadZipFile, struct.error) as exc:
                raise self._corrupt(exc) from None
        if dtype.hasobject:
            raise UnsafeInputError(
                f"{self.path}: array '{name}' is a pickled object array; reading it would "
                "execute code from the file",
                "sentence files must hold numeric and fixed-width text arrays only",
            )
        info = ArrayInfo(shape, dtype, fortran, member, data_offset, raw_offset)
        self._infos[name] = info
        return info

    def read_flat(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of array ``name`` in its storage order (a 1-D array)."""
        import numpy as np

        info = self.info(name)
        if not 0 <= start <= stop <= info.size:
            raise IndexError(f"{name}[{start}:{stop}] is outside {info.size} elements")
        itemsize = info.dtype.itemsize
        count = stop - start
        with self.opened():
            assert self._zip is not None and self._raw is not None
            try:
                if info.raw_offset is not None:
                    self._raw.seek(info.raw_offset + start * itemsize)
                    data = self._raw.read(count * itemsize)
                else:
                    with self._zip.open(info.member) as handle:
                        handle.seek(info.data_offset + start * itemsize)
                        data = handle.read(count * itemsize)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
                raise self._corrupt(exc) from None
        if len(data) != count * itemsize:
            raise InputError(
                f"cannot read sentence file {self.path}: array '{name}' is truncated",
                "re-run `tracekit extract features` for it, or remove the file",
            )
        return np.frombuffer(data, dtype=info.dtype, count=count).copy()

    def read_rows(self, name: str, index: tuple[int, ...]) -> np.ndarray:
        """``array[index]`` for leading indices, e.g. ``(layer_pos, fragment)``; reads only that."""
        info = self.info(name)
        if len(index) > len(info.shape):
            raise IndexError(f"{len(index)} indices for '{name}' of shape {info.shape}")
        for i, dim in zip(index, info.shape, strict=False):
            if not 0 <= i < dim:
                raise IndexError(f"index {index} out of bounds for '{name}' of shape {info.shape}")
        rest = info.shape[len(index) :]
        if info.fortran_order:  # rare; slicing it would need a strided read
            return self[name][index]
        block = 1
        for dim in rest:
            block *= dim
        flat = 0
        for i, dim in zip(index, info.shape, strict=False):
            flat = flat * dim + i
        return self.read_flat(name, flat * block, (flat + 1) * block).reshape(rest)

    def scalar(self, name: str) -> Any:
        """A 0-d (or one-element) array as a Python value."""
        value = self[name]
        if value.size != 1:
            raise InputError(
                f"{self.path}: '{name}' should hold one value but has shape {value.shape}",
                "a per-sentence field holds a single value",
            )
        return value.reshape(()).item()


def sentence_provenance(sentence: SentenceFile) -> dict[str, str | None]:
    """The file's ``model`` with its ``quantization`` and ``weights_sha256`` (None: not
    quantized, or unknown); a field the file lacks (written before tracekit recorded it, or
    by the seed) is left out."""
    recorded: dict[str, str | None] = {}
    for name in ("model", *WEIGHTS_FIELDS):
        if name in sentence:
            recorded[name] = str(sentence.scalar(name)) or None
    return recorded


def sentence_index(path: Path) -> int:
    """The sentence number in ``sentence_000123.npz`` (123)."""
    match = _SENTENCE_NAME.match(path.name)
    if match is None:
        raise InputError(
            f"{path} is not named sentence_<number>.npz",
            "sentence files are named sentence_000000.npz, sentence_000001.npz, ...",
        )
    return int(match.group(1))


def load_all_sentences(input_dir: str | Path) -> list[SentenceFile]:
    """Every ``sentence_<n>.npz`` in ``input_dir`` as lazy :class:`SentenceFile` views, by n.

    Nothing is read yet: arrays are loaded (or sliced) on access, so this is cheap for any
    number of files. Raises :class:`InputError` when the folder is missing or has no files.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(
            f"input directory not found: {folder}",
            "pass --input pointing at the folder written by `tracekit extract features`",
        )
    files = [p for p in folder.glob(SENTENCE_GLOB) if _SENTENCE_NAME.match(p.name)]
    if not files:
        raise InputError(
            f"No sentence_*.npz files found in {folder}",
            "run `tracekit extract features` first, or check the --input path",
        )
    return sorted((SentenceFile(p) for p in files), key=lambda s: s.index)


# --- final-token gathering ---------------------------------------------------------------------
TRACEKIT_NUMBERING = "tracekit"
SEED_NUMBERING = "seed"


def file_layer_numbers(sentence: SentenceFile) -> tuple[list[int], str]:
    """(the layer numbers of the file's ``hidden_states`` rows, the numbering they follow).

    tracekit's files list them in ``layers``. Seed 004's files have no ``layers`` array and
    address ``hidden_states`` (and ``activations``) by position, so there layer L is row L.
    """
    for name in ("hidden_states", "activations"):
        if name in sentence and len(shape := sentence.info(name).shape) != 3:
            raise InputError(
                f"{sentence.path}: '{name}' has shape {shape}, expected [layers, fragments, width]",
                "rebuild the file with 'tracekit extract features'",
            )
    if "layers" in sentence:
        numbers = [int(x) for x in sentence["layers"].reshape(-1).tolist()]
        if "hidden_states" in sentence and sentence.info("hidden_states").shape[0] != len(numbers):
            raise InputError(
                f"{sentence.path}: 'hidden_states' has {sentence.info('hidden_states').shape[0]} "
                f"layer rows but 'layers' lists {len(numbers)}",
                "rebuild the file with 'tracekit extract features'",
            )
        return numbers, TRACEKIT_NUMBERING
    for name in ("hidden_states", "activations"):
        if name in sentence:
            return list(range(sentence.info(name).shape[0])), SEED_NUMBERING
    if "act_shape" in sentence:
        return list(range(int(sentence["act_shape"].reshape(-1)[0]))), SEED_NUMBERING
    return [], TRACEKIT_NUMBERING


@dataclass
class _FilePlan:
    sentence: SentenceFile
    finals: list[int]  # fragment positions with is_final_token
    layer_source: list[tuple[str, int | None]]  # per requested layer: (array, layer position)
    target_pos: int | None = None
    label: int | None = None
    group: Any = None
    average_l0: float | None = None


@dataclass
class FinalTokenData:
    """Final-token rows gathered from sentence files (see :func:`get_final_token_data`)."""

    sentence_indices: np.ndarray
    layers: tuple[int, ...]
    numbering: str = TRACEKIT_NUMBERING
    """How layer numbers were read: ``tracekit`` (the files' ``layers`` array, README's
    numbering) or ``seed`` (no ``layers`` array: an index into ``hidden_states``)."""
    embeddings: np.ndarray | None = None
    hidden_states: np.ndarray | None = None
    labels: np.ndarray | None = None
    target_activations: np.ndarray | None = None
    average_l0: float | None = None
    sae_width: int | None = None
    groups: np.ndarray | None = None
    provenance: dict[str, str | None] = field(default_factory=dict)
    """The ``model``, ``quantization`` and ``weights_sha256`` every file records (one value:
    files that disagree are refused); quantization None: not quantized."""
    provenance_partial: dict[str, int] = field(default_factory=dict)
    """Fields only some files record: how many do (the others may come from other weights)."""
    n_files: int = 0
    files_without_final_token: list[Path] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        """Seed-style access: ``data['hidden_states']``."""
        return getattr(self, key)

    @property
    def n_samples(self) -> int:
        return int(self.sentence_indices.shape[0])


def _layer_sources(
    sentence: SentenceFile, file_layers: list[int], wanted: Sequence[int]
) -> list[tuple[str, int | None]]:
    sources: list[tuple[str, int | None]] = []
    for layer in wanted:
        if layer in file_layers:
            sources.append(("hidden_states", file_layers.index(layer)))
        elif layer == 0 and "embeddings" in sentence:
            # tracekit layer 0 *is* the embedding output (README, "Layer indexing")
            sources.append(("embeddings", None))
        else:
            shown = _spec(file_layers)
            raise InputError(
                f"Layer {layer} not found in data: {sentence.path} has layers {shown}",
                "pick layers from that list, or re-run `tracekit extract features` with them",
            )
    return sources


def _spec(layers: Sequence[int]) -> str:
    from tracekit.config.types import LayerSpec

    return str(LayerSpec(layers)) if layers else "none"


def _sae_width(sentence: SentenceFile) -> tuple[str | None, int | None, int | None]:
    """(layout, n_layers, width) of the SAE activations in ``sentence`` (None when absent)."""
    if "activations" in sentence:
        shape = sentence.info("activations").shape
        if len(shape) != 3:
            raise InputError(
                f"{sentence.path}: 'activations' has shape {shape}, expected "
                "[layers, fragments, width]"
            )
        return "dense", shape[0], shape[2]
    if all(name in sentence for name in _SPARSE_ARRAYS):
        shape = tuple(int(x) for x in sentence["act_shape"].tolist())
        if len(shape) != 3:
            raise InputError(f"{sentence.path}: 'act_shape' must hold 3 numbers, got {shape}")
        return "sparse", shape[0], shape[2]
    return None, None, None


@dataclass(frozen=True)
class _Request:
    """What :func:`get_final_token_data` gathers (its keyword arguments)."""

    layers: list[int] | None
    embeddings: bool
    hidden_states: bool
    labels: bool
    target: tuple[int, int] | None
    group_field: str | None


@dataclass
class _Survey:
    """The first pass over the files: one :class:`_FilePlan` per file, and what every file
    must agree on (numbering, sizes, the SAE's average L0), set by the first file that has it."""

    request: _Request
    first: Path  # named in the messages about files that disagree
    want_layers: list[int] | None = None
    numbering: str | None = None
    hidden_dim: int | None = None
    embed_dim: int | None = None
    sae_width: int | None = None
    l0s: set[float] = field(default_factory=set)
    weights: WeightsAgreement = field(
        default_factory=lambda: WeightsAgreement(
            "the sentence files",
            "build from the files of one `extract features` run: put each model's (or "
            "checkpoint's) files in their own --input folder",
        )
    )

    def plan(self, sentence: SentenceFile) -> _FilePlan:
        """Validate ``sentence`` from its headers and small arrays; say what to read from it."""
        import numpy as np

        request = self.request
        with sentence.opened():
            # first: other weights explain any other difference (a hidden size, ...)
            self.weights.add(str(sentence.path), sentence_provenance(sentence))
            final_info = sentence.require("is_final_token", "marks the samples")
            finals = [int(i) for i in np.flatnonzero(sentence["is_final_token"])]
            n_frag = final_info.shape[0] if final_info.shape else 0
            file_layers = self._layer_numbers(sentence)
            if self.want_layers is None:
                self.want_layers = file_layers if request.hidden_states else []
            plan = _FilePlan(sentence, finals, [])
            if request.hidden_states and self.want_layers:
                plan.layer_source = self._hidden_sources(sentence, file_layers, n_frag)
            if request.embeddings:
                shape = sentence.require("embeddings", "holds the embedding output").shape
                self.embed_dim = self._agreed_size(sentence, "embedding", shape[-1], self.embed_dim)
            if request.labels:
                sentence.require("concept_strength_label", "holds the sentence's label")
                plan.label = int(sentence.scalar("concept_strength_label"))
            if request.group_field is not None:
                plan.group = _group_value(sentence, request.group_field)
            if request.target is not None:
                plan.target_pos, plan.average_l0, self.sae_width = _plan_target(
                    sentence, file_layers, request.target
                )
                if plan.average_l0 is not None:
                    self.l0s.add(plan.average_l0)
        return plan

    def _layer_numbers(self, sentence: SentenceFile) -> list[int]:
        """The file's layer numbers; its numbering must be the first file's."""
        file_layers, file_numbering = file_layer_numbers(sentence)
        if self.numbering is None:
            self.numbering = file_numbering
        elif file_numbering != self.numbering:
            raise InputError(
                f"{sentence.path} {'lacks' if self.numbering == TRACEKIT_NUMBERING else 'has'} "
                f"a 'layers' array, unlike {self.first}: the files number layers "
                "two ways",
                "build from files written by one tool (tracekit's, or the seed's)",
            )
        return file_layers

    def _hidden_sources(
        self, sentence: SentenceFile, file_layers: list[int], n_frag: int
    ) -> list[tuple[str, int | None]]:
        """Where each wanted layer's rows are in ``sentence``, checked against its fragments."""
        assert self.want_layers is not None
        if file_layers:
            sentence.require("hidden_states", "holds the hidden states of 'layers'")
        sources = _layer_sources(sentence, file_layers, self.want_layers)
        for source, _ in sources:
            shape = sentence.info(source).shape
            if shape[-2] != n_frag:
                raise InputError(
                    f"{sentence.path}: '{source}' has {shape[-2]} fragments but "
                    f"'is_final_token' has {n_frag}"
                )
            self.hidden_dim = self._agreed_size(sentence, "hidden", shape[-1], self.hidden_dim)
        return sources

    def _agreed_size(self, sentence: SentenceFile, what: str, size: int, agreed: int | None) -> int:
        """``size``, which must equal the ``agreed`` one of the first file (None: none yet)."""
        if agreed is not None and size != agreed:
            raise InputError(
                f"{sentence.path}: {what} size {size} differs from {agreed} in {self.first}",
                "all sentence files must come from one model",
            )
        return size

    def allocate(self, plans: list[_FilePlan]) -> FinalTokenData:
        """The empty output for ``plans``: one row per final token, float32 arrays."""
        import numpy as np

        request = self.request
        n = sum(len(p.finals) for p in plans)
        selected = tuple(self.want_layers or [])
        data = FinalTokenData(
            sentence_indices=np.empty(n, dtype=np.int64),
            layers=selected,
            numbering=self.numbering or TRACEKIT_NUMBERING,
            n_files=len(plans),
            files_without_final_token=[p.sentence.path for p in plans if not p.finals],
        )
        data.provenance, data.provenance_partial = self.weights.agreed(), self.weights.partial()
        if request.embeddings:
            data.embeddings = np.empty((n, self.embed_dim or 0), dtype=np.float32)
        if request.hidden_states and selected:
            data.hidden_states = np.empty((n, len(selected), self.hidden_dim or 0), np.float32)
        if request.labels:
            data.labels = np.empty(n, dtype=np.int64)
        if request.target is not None:
            data.target_activations = np.empty(n, dtype=np.float32)
            data.sae_width = self.sae_width
            data.average_l0 = self._average_l0(request.target[0])
        if request.group_field is not None:
            data.groups = np.array([p.group for p in plans for _ in p.finals])
        return data

    def _average_l0(self, layer: int) -> float | None:
        """The one average L0 the files record for the target layer (None: none recorded)."""
        if len(self.l0s) > 1:
            raise InputError(
                f"average_l0 mismatch: the files record different average L0s for layer "
                f"{layer} ({', '.join(f'{v:g}' for v in sorted(self.l0s))})",
                "the files were written with different SAEs; rebuild them with one SAE",
            )
        return next(iter(self.l0s)) if self.l0s else None


def _group_value(sentence: SentenceFile, group_field: str) -> Any:
    """The value ``sentence`` is grouped by for a split (``"sentence"``: its own number)."""
    if group_field == "sentence":
        return sentence.index
    sentence.require(group_field, f"--group-by {group_field} needs")
    return sentence.scalar(group_field)


def get_final_token_data(
    sentences: Sequence[SentenceFile],
    *,
    layers: Sequence[int] | None = None,
    embeddings: bool = True,
    hidden_states: bool = True,
    labels: bool = True,
    target: tuple[int, int] | None = None,
    group_field: str | None = None,
    on_file: Callable[[int], None] | None = None,
) -> FinalTokenData:
    """The final-token rows (``is_final_token``) of ``sentences``, one sample per final token.

    ``layers`` selects hidden-state layers (tracekit numbers; default: every layer of the first
    file); ``target=(layer, feature)`` also gathers that SAE feature's activation and the
    layer's average L0; ``group_field`` gathers a per-sentence scalar (or ``"sentence"``).
    Files recording another ``model``, ``quantization`` or ``weights_sha256`` than the first
    are refused (``provenance`` holds what all record). Everything is validated from headers
    and small arrays before any large read; outputs are float32 and
    preallocated, so peak memory is about the size of the result. ``on_file(i)`` is called
    after each file of the filling pass.
    """
    if not sentences:
        raise InputError("no sentence files given", "load them with load_all_sentences(DIR)")
    request = _Request(
        layers=list(layers) if layers is not None else None,
        embeddings=embeddings,
        hidden_states=hidden_states,
        labels=labels,
        target=target,
        group_field=group_field,
    )
    survey = _Survey(request, first=sentences[0].path, want_layers=request.layers)
    plans = [survey.plan(sentence) for sentence in sentences]
    data = survey.allocate(plans)
    _fill(data, plans, None if target is None else target[1], on_file)
    return data


def _fill(
    data: FinalTokenData,
    plans: list[_FilePlan],
    feature: int | None,
    on_file: Callable[[int], None] | None,
) -> None:
    """The second pass: read each plan's final-token rows into ``data``'s arrays."""
    row = 0
    for i, plan in enumerate(plans):
        with plan.sentence.opened():
            for frag in plan.finals:
                data.sentence_indices[row] = plan.sentence.index
                if data.embeddings is not None:
                    data.embeddings[row] = plan.sentence.read_rows("embeddings", (frag,))
                if data.hidden_states is not None:
                    for j, (source, pos) in enumerate(plan.layer_source):
                        index = (frag,) if pos is None else (pos, frag)
                        data.hidden_states[row, j] = plan.sentence.read_rows(source, index)
                if data.labels is not None:
                    data.labels[row] = plan.label
                if data.target_activations is not None and feature is not None:
                    assert plan.target_pos is not None
                    data.target_activations[row] = _feature_value(
                        plan.sentence, plan.target_pos, frag, feature
                    )
                row += 1
        if on_file is not None:
            on_file(i)


def _plan_target(
    sentence: SentenceFile, file_layers: list[int], target: tuple[int, int]
) -> tuple[int, float | None, int]:
    """(layer position, average L0, SAE width) for ``target``, validated against the file."""
    layer, feature = target
    layout, n_sae_layers, width = _sae_width(sentence)
    if layout is None or width is None:
        raise InputError(
            f"{sentence.path} has no SAE activations ('activations' or sparse 'act_*' arrays)",
            "the *-to-feature strategies need files written with an SAE; "
            "use --strategy hidden-to-concept, or re-run extract features with --sae",
        )
    if layer not in file_layers:
        raise InputError(
            f"Layer {layer} not found in data: {sentence.path} has layers {_spec(file_layers)}",
            "pick --target-layer from that list",
        )
    pos = file_layers.index(layer)
    if n_sae_layers != len(file_layers):
        raise InputError(
            f"{sentence.path}: SAE activations cover {n_sae_layers} layers but 'layers' "
            f"lists {len(file_layers)}"
        )
    if not 0 <= feature < width:
        raise InputError(
            f"--target-feature {feature} is out of range: Feature index must be 0-{width - 1} "
            f"(the SAE at layer {layer} in {sentence.path} has {width} features)",
            "take the feature id from the same SAE that wrote the files",
        )
    average_l0 = None
    if "average_l0s" in sentence:
        values = sentence["average_l0s"].reshape(-1)
        if values.shape[0] == len(file_layers) and math.isfinite(float(values[pos])):
            average_l0 = float(values[pos])  # NaN is how writers say "not recorded"
    return pos, average_l0, width


def _feature_value(sentence: SentenceFile, layer_pos: int, frag: int, feature: int) -> float:
    """One SAE feature's activation at (layer, fragment), dense or sparse, reading only it."""
    if "activations" in sentence:
        shape = sentence.info("activations").shape
        flat = (layer_pos * shape[1] + frag) * shape[2] + feature
        return float(sentence.read_flat("activations", flat, flat + 1)[0])
    n_frag = int(sentence["act_shape"].reshape(-1)[1])
    row = layer_pos * n_frag + frag
    start, stop = (int(x) for x in sentence.read_flat("act_indptr", row, row + 2))
    indices = sentence.read_flat("act_indices", start, stop)
    hits = (indices == feature).nonzero()[0]
    if hits.size == 0:
        return 0.0  # sparse: an absent feature is inactive
    position = start + int(hits[0])
    return float(sentence.read_flat("act_values", position, position + 1)[0])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
SENTENCE_FILE = re.compile(r"^sentence_(\d{6})\.npz$")
MANIFEST_NAME = "features.json"


def sentence_file(output: Path, index: int) -> Path:
    """Path of the file for CSV row ``index`` (0-based)."""
    return output / f"sentence_{index:06d}.npz"


def existing_sentence_files(output: Path) -> list[Path]:
    """The ``sentence_NNNNNN.npz`` files in ``output`` (none when it does not exist)."""
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir() if SENTENCE_FILE.match(p.name))


@dataclass(frozen=True)
class SaeMeta:
    """The per-file SAE metadata shared by every sentence of a run."""

    width: int
    average_l0s: list[float] | None  # None when no chosen SAE states its average L0
    release_layers: list[int]
    formats: str
    storage: str


def write_sentence_file(
    path: Path,
    *,
    embeddings: np.ndarray,
    hidden_states: np.ndarray,
    layers: list[int],
    label: int,
    sentence: str,
    tokens: list[str],
    model: str,
    weights: Mapping[str, str | None] | None = None,
    sae: SaeMeta | None = None,
    activations: np.ndarray | None = None,
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Write one sentence file atomically in the layout above; ``weights`` are the model's
    ``quantization`` and ``weights_sha256`` (:mod:`tracekit.models.weights`), each stored as a
    string like ``model`` (``""``: none)."""
    import numpy as np

    n_fragments = embeddings.shape[0]
    is_final = np.zeros(n_fragments, dtype=bool)
    is_final[-1] = True
    arrays: dict[str, Any] = {
        "embeddings": embeddings,
        "hidden_states": hidden_states,
        "layers": np.asarray(layers, dtype=np.int64),
        "concept_strength_label": np.int64(label),
        "is_final_token": is_final,
        "sentence": np.str_(sentence),
        "tokens": np.asarray(tokens, dtype=str),
        "model": np.str_(model),
        **{name: np.str_((weights or {}).get(name) or "") for name in WEIGHTS_FIELDS},
    }
    if sae is not None:
        if sae.average_l0s is not None:
            arrays["average_l0s"] = np.asarray(sae.average_l0s, dtype=np.float64)
        arrays["sae_width"] = np.int64(sae.width)
        arrays["sae_storage"] = np.str_(sae.storage)
        arrays["sae_format"] = np.str_(sae.formats)
        arrays["sae_layers"] = np.asarray(sae.release_layers, dtype=np.int64)
        if sparse is not None:
            values, indices, indptr = sparse
            arrays["act_values"] = values
            arrays["act_indices"] = indices
            arrays["act_indptr"] = indptr
            arrays["act_shape"] = np.asarray([len(layers), n_fragments, sae.width], np.int64)
        else:
            arrays["activations"] = activations
    save_npz(path, **arrays)
