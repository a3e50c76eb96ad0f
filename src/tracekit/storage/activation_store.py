"""The LMDB activation store: on-disk format, writer (batched, growing, resumable) and reader.

A store is one LMDB environment (a directory holding ``data.mdb`` and ``lock.mdb``) with
three named databases:

- ``activations``: key -> one value per entry holding every logged layer as a raw array:
  ``b"TKA1"``, a little-endian ``uint32`` header length, a JSON header
  ``{"arrays": [[name, dtype, shape, offset, nbytes], ...], "crc32": n}``, then the array bytes
  (each array starts at a 16-byte aligned offset). No pickle anywhere: reading a store never
  runs code from it.
- ``meta``: key -> UTF-8 JSON object (prompt, generation, model, input_length, timestamp, ...).
  Kept apart so ``reconstruct`` and ``stats`` read metadata without touching activations.
- ``info``: ``format`` and one ``provenance/<id>`` JSON record per distinct run setup (model,
  revision, tokenizer/template hashes, generation parameters, layers, ...). A writer refuses a
  setup the store has not seen unless told to mix.

Keys are the SHA-256 hex digest of the formatted prompt (UTF-8), as the original activation
logger wrote them, so existing tools find entries by prompt. Each :meth:`ActivationStoreWriter.
write_batch` is one write transaction: a process killed at any point leaves every batch either
fully written or absent, and a restart skips keys already present. ``map_size`` starts small and
doubles on ``MapFullError`` (the failed transaction is aborted and retried).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from tracekit.config.choices import StoreDtype
from tracekit.errors import StoreError
from tracekit.models.weights import weights_unrecorded
from tracekit.storage.store_provenance import (
    check_entry_provenance,
    describe_mismatch,
    matching_provenance,
    provenance_id,
    provenance_mismatch,
    refuse_other_setup,
)

if TYPE_CHECKING:
    import lmdb

logger = logging.getLogger(__name__)

STORE_FORMAT = "tracekit-activation-store/1"
MAGIC = b"TKA1"
_HEADER_LEN = struct.Struct("<I")
_ALIGN = 16
DB_ACTIVATIONS = b"activations"
DB_META = b"meta"
DB_INFO = b"info"
_PROVENANCE_PREFIX = b"provenance/"
INITIAL_MAP_SIZE = 64 << 20
MAX_MAP_SIZE = 1 << 44  # 16 TiB: a guard against doubling forever on a broken filesystem
DTYPES = tuple(dtype.value for dtype in StoreDtype)
"""The dtypes activations are stored in, as plain strings."""


def prompt_key(prompt: str) -> str:
    """The store key of a formatted prompt: SHA-256 hex digest of its UTF-8 bytes."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


# --- value format ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """Where one array sits inside an activations value."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _as_bytes_and_dtype(value: Any) -> tuple[memoryview | bytes, str, tuple[int, ...]]:
    """Raw bytes, dtype name and shape of a numpy array or torch tensor (bf16 included)."""
    import numpy as np

    if type(value).__module__.startswith("torch"):
        tensor = value.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(int(s) for s in tensor.shape)
        if dtype == "bfloat16":  # numpy has no bfloat16: ship the raw 16-bit patterns
            import torch

            return tensor.view(torch.int16).numpy().tobytes(), dtype, shape
        value = tensor.numpy()
    arr = np.ascontiguousarray(value)
    if arr.dtype.hasobject:
        raise TypeError("object arrays cannot be stored (they would need pickle)")
    shape = tuple(int(s) for s in arr.shape)
    # memoryview cannot cast a view with a zero in its shape (an empty response, say)
    data = arr.data.cast("B") if arr.size else b""
    return data, arr.dtype.name, shape


def encode_arrays(arrays: Mapping[str, Any]) -> bytes:
    """Pack named arrays (numpy or torch) into one activations value."""
    parts: list[tuple[str, str, tuple[int, ...], memoryview | bytes]] = []
    for name, value in arrays.items():
        data, dtype, shape = _as_bytes_and_dtype(value)
        parts.append((name, dtype, shape, data))
    # Offsets are relative to the payload start; the payload is aligned after the header.
    # The payload is never assembled on its own: CRC runs over the pieces and one join copies.
    specs: list[list[Any]] = []
    payload: list[memoryview | bytes] = []
    crc = offset = 0
    for name, dtype, shape, data in parts:
        pad = -offset % _ALIGN
        if pad:
            payload.append(bytes(pad))
            crc = zlib.crc32(payload[-1], crc)
            offset += pad
        specs.append([name, dtype, list(shape), offset, len(data)])
        payload.append(data)
        crc = zlib.crc32(data, crc)
        offset += len(data)
    header = json.dumps({"arrays": specs, "crc32": crc}, separators=(",", ":")).encode("utf-8")
    start = len(MAGIC) + _HEADER_LEN.size + len(header)
    pad = -start % _ALIGN
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header) + pad), header, b" " * pad, *payload])


def read_header(value: bytes | memoryview) -> tuple[list[ArraySpec], int, int]:
    """(array specs, payload start, crc32) of an activations value; ``ValueError`` if corrupt."""
    view = memoryview(value)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise ValueError("not a tracekit activations value (bad magic)")
    (length,) = _HEADER_LEN.unpack(view[4:8])
    start = 8 + length
    if start > len(view):
        raise ValueError("activations header runs past the end of the value")
    try:
        header = json.loads(bytes(view[8:start]))
        specs = [
            ArraySpec(str(n), str(d), tuple(int(s) for s in shape), int(o), int(b))
            for n, d, shape, o, b in header["arrays"]
        ]
        crc = int(header["crc32"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable activations header: {exc}") from None
    for spec in specs:
        if spec.dtype not in DTYPES and spec.dtype not in ("float64", "int64", "int32"):
            raise ValueError(f"array {spec.name!r} has unsupported dtype {spec.dtype!r}")
        if start + spec.offset + spec.nbytes > len(view):
            raise ValueError(f"array {spec.name!r} runs past the end of the value")
    return specs, start, crc


def _quick_status(value: bytes | memoryview) -> str:
    """``ok`` when a value starts like an activations value, else ``corrupt`` (no parsing)."""
    if len(value) < 8 or bytes(value[:4]) != MAGIC:
        return "corrupt"
    (length,) = _HEADER_LEN.unpack(bytes(value[4:8]))
    return "ok" if 8 + length <= len(value) else "corrupt"


def decode_arrays(
    value: bytes | memoryview, verify: bool = True, as_torch: bool = False
) -> dict[str, Any]:
    """Named arrays of an activations value, as views of ``value`` where possible.

    numpy arrays are read-only views (no copy) except bfloat16, which numpy lacks: those come
    back as float32 copies, or as zero-copy ``torch.bfloat16`` tensors with ``as_torch=True``.
    ``verify`` checks the payload CRC and raises ``ValueError`` on a mismatch.
    """
    import numpy as np

    view = memoryview(value)
    specs, start, crc = read_header(view)
    if verify:
        end = start + max((s.offset + s.nbytes for s in specs), default=0)
        if zlib.crc32(view[start:end]) != crc:
            raise ValueError("activations payload does not match its checksum")
    out: dict[str, Any] = {}
    if as_torch:
        import torch

        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
    for spec in specs:
        raw = view[start + spec.offset : start + spec.offset + spec.nbytes]
        if spec.dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=np.uint16).reshape(spec.shape)
            if as_torch:
                out[spec.name] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
            else:
                out[spec.name] = (bits.astype(np.uint32) << 16).view(np.float32)
            continue
        arr = np.frombuffer(raw, dtype=np.dtype(spec.dtype)).reshape(spec.shape)
        if as_torch:
            out[spec.name] = torch.from_numpy(arr)
        else:
            out[spec.name] = arr
    return out


# --- opening ----------------------------------------------------------------------------------
def _check_store_path(path: Path, for_writing: bool) -> None:
    if not path.exists():
        if for_writing:
            return
        raise StoreError(
            f"activation store not found: {path}", "check the --lmdb path (a directory)"
        )
    if not path.is_dir():
        raise StoreError(
            f"{path} is not an LMDB store (it is a file, not a store directory)",
            "point at the directory that holds data.mdb",
        )
    if not (path / "data.mdb").is_file():
        if for_writing and not any(path.iterdir()):
            return
        raise StoreError(
            f"{path} is not an LMDB store (no data.mdb inside)",
            "point at the directory that holds data.mdb, or give a new path to create one",
        )


def nothing_committed(path: Path) -> bool:
    """Whether ``path`` is an LMDB store into which nothing was ever committed: a writer killed
    between creating ``data.mdb`` and its first transaction leaves one. It is an empty store,
    not a foreign database."""
    if not (path / "data.mdb").is_file():
        return False
    env = _open_env(path, readonly=True)
    try:
        return int(env.stat()["entries"]) == 0
    finally:
        env.close()


def _open_env(path: Path, readonly: bool, map_size: int = INITIAL_MAP_SIZE) -> lmdb.Environment:
    import lmdb

    try:
        return lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=4,
            subdir=True,
            readonly=readonly,
            create=not readonly,
            readahead=False,
            meminit=False,
        )
    except lmdb.Error as exc:
        if "already open in this process" in str(exc):
            raise StoreError(
                f"store {path} is already open in this process (LMDB allows one handle)",
                "close the other reader, writer or ActivationLogger of this store first",
            ) from exc
        raise StoreError(
            f"{path} is not a readable LMDB store: {str(exc).splitlines()[0]}",
            "check the path; a store is the directory that holds data.mdb",
        ) from exc


def _open_dbs(env: lmdb.Environment, path: Path, create: bool) -> tuple[Any, Any, Any]:
    import lmdb

    try:
        if create:
            with env.begin() as txn:
                names = {bytes(k) for k in txn.cursor().iternext(values=False)}
            if names - {DB_ACTIVATIONS, DB_META, DB_INFO}:
                raise lmdb.IncompatibleError("foreign keys in the main database")
            with env.begin(write=True) as txn:
                dbs = tuple(
                    env.open_db(name, txn=txn) for name in (DB_ACTIVATIONS, DB_META, DB_INFO)
                )
                fmt = txn.get(b"format", db=dbs[2])
                if fmt is None and txn.stat(dbs[1])["entries"] == 0:
                    txn.put(b"format", STORE_FORMAT.encode(), db=dbs[2])
                    fmt = STORE_FORMAT.encode()
        else:
            # no txn argument: py-lmdb opens and commits its own, so the handles outlive it
            dbs = tuple(
                env.open_db(name, create=False) for name in (DB_ACTIVATIONS, DB_META, DB_INFO)
            )
            with env.begin() as txn:
                fmt = txn.get(b"format", db=dbs[2])
    except (lmdb.NotFoundError, lmdb.IncompatibleError, lmdb.InvalidError) as exc:
        raise StoreError(
            f"{path} is an LMDB database but not a tracekit activation store "
            "(no activations/meta/info databases)",
            "tracekit reads its own stores and the seed's (prompt-hash keys in the main "
            "database, JSON or pickled values); re-log others with 'tracekit log'",
        ) from exc
    if fmt is None or bytes(fmt).decode("utf-8", "replace") != STORE_FORMAT:
        shown = None if fmt is None else bytes(fmt).decode("utf-8", "replace")
        raise StoreError(
            f"{path} has store format {shown!r}, expected {STORE_FORMAT!r}",
            "use a tracekit version that wrote this store, or re-log",
        )
    return dbs  # type: ignore[return-value]


def _read_provenance(txn: Any, info_db: Any) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    with txn.cursor(db=info_db) as cursor:
        if not cursor.set_range(_PROVENANCE_PREFIX):
            return records
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(_PROVENANCE_PREFIX):
                break
            with contextlib.suppress(ValueError):
                records[key[len(_PROVENANCE_PREFIX) :].decode()] = json.loads(bytes(value))
    return records


def check_store_provenance(path: Path, provenance: Mapping[str, Any]) -> None:
    """Refuse (:class:`StoreError`) logging under ``provenance`` into the existing store at
    ``path`` when it matches none of the store's records; read-only, so a run checks this
    before its model runs. A missing or empty store passes."""
    if not (path / "data.mdb").is_file() or nothing_committed(path):
        return
    with ActivationStore(path) as store:
        known = store.provenance
    if known and matching_provenance(known, provenance) is None:
        refuse_other_setup(path, known, provenance)


# --- writer -----------------------------------------------------------------------------------
@dataclass
class PendingEntry:
    """One entry to write: its key, its metadata and its named arrays (may be empty)."""

    key: str
    metadata: dict[str, Any]
    arrays: Mapping[str, Any] = field(default_factory=dict)


class StoreHandle:
    """An open LMDB environment at ``path``: ``close`` it when done, or use it in ``with``."""

    path: Path
    env: lmdb.Environment

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActivationStoreWriter(StoreHandle):
    """Writes batches of entries into a store; one LMDB transaction per batch.

    Opening checks ``provenance`` against the store's records: a new setup is refused unless
    ``allow_mixed`` (then it is recorded next to the old ones). Entries carry the id of the
    provenance they were written under (``metadata["provenance_id"]``). Resuming under a
    record that names no weights (an older tracekit's) logs a warning, unless
    ``weights_notice`` is False (a caller that opened the store before and said so already).
    """

    def __init__(
        self,
        path: str | Path,
        provenance: Mapping[str, Any],
        allow_mixed: bool = False,
        initial_map_size: int = INITIAL_MAP_SIZE,
        weights_notice: bool = True,
    ) -> None:
        self.path = Path(path)
        _check_store_path(self.path, for_writing=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = _open_env(self.path, readonly=False, map_size=initial_map_size)
        try:
            self._dbs = _open_dbs(self.env, self.path, create=True)
            self.provenance = dict(provenance)
            self.provenance_id = provenance_id(self.provenance)
            self._register_provenance(allow_mixed, weights_notice)
        except BaseException:
            self.env.close()
            raise

    def _put_provenance(self, pid: str, record: Mapping[str, Any]) -> None:
        key = _PROVENANCE_PREFIX + pid.encode()
        value = json.dumps(record, sort_keys=True).encode("utf-8")
        self._write(lambda txn: txn.put(key, value, db=self._dbs[2]))

    def _put_entries(self, encoded: Sequence[tuple[bytes, bytes, bytes | None]]) -> None:
        """Write (key, metadata, activations or None) values in one transaction."""
        act_db, meta_db, _ = self._dbs

        def put_all(txn: Any) -> None:
            for key, meta, acts in encoded:
                if acts is not None:
                    txn.put(key, acts, db=act_db)
                txn.put(key, meta, db=meta_db)

        self._write(put_all)

    def _register_provenance(self, allow_mixed: bool, weights_notice: bool) -> None:
        with self.env.begin() as txn:
            known = _read_provenance(txn, self._dbs[2])
        match = matching_provenance(known, self.provenance)
        if match is not None:
            # the setup's record, or an equal one whose id was computed another way (an older
            # tracekit's): the new entries share it
            self.provenance_id = match
            if (
                weights_notice
                and weights_unrecorded(known[match])
                and not weights_unrecorded(self.provenance)
            ):
                logger.warning(
                    "store %s does not record which weights of %s it was written with (an "
                    "older tracekit, or an unknown hash): logging into it without that check",
                    self.path,
                    known[match].get("model"),
                )
            return
        if known and not allow_mixed:
            refuse_other_setup(self.path, known, self.provenance)
        self._put_provenance(self.provenance_id, self.provenance)

    def existing_keys(self) -> set[str]:
        """Keys already in the store (entries with metadata)."""
        with self.env.begin() as txn, txn.cursor(db=self._dbs[1]) as cursor:
            return {bytes(k).decode("utf-8", "replace") for k in cursor.iternext(values=False)}

    def write_batch(self, entries: Sequence[PendingEntry]) -> int:
        """Write ``entries`` in one transaction (growing the map as needed); returns bytes."""
        encoded = []
        for entry in entries:
            metadata = {**entry.metadata, "provenance_id": self.provenance_id}
            meta = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
            acts = encode_arrays(entry.arrays) if entry.arrays else None
            encoded.append((entry.key.encode("utf-8"), meta, acts))
        self._put_entries(encoded)
        return sum(len(m) + (len(a) if a else 0) for _, m, a in encoded)

    def merge_from(self, source: str | Path, allow_mixed: bool = False, batch: int = 256) -> int:
        """Copy every entry of the store at ``source`` that this store lacks; returns entries.

        Values are copied byte for byte (activations and metadata), in transactions of
        ``batch`` entries, with the source's provenance records; a source written by a setup
        this store has not seen is refused unless ``allow_mixed``. Used by data-parallel
        ``log``, where each process writes its own store and the main process merges them.
        """
        with ActivationStore(source) as src:
            records = src.provenance
            check_entry_provenance(src.path, records, src.iter_metadata())
            with self.env.begin() as txn:
                known = _read_provenance(txn, self._dbs[2])
            for pid, record in records.items():
                if pid in known:
                    continue
                if known and not allow_mixed and matching_provenance(known, record) is None:
                    old = next(iter(known.values()))
                    mismatch = provenance_mismatch(old, record) or describe_mismatch(old, record)
                    raise StoreError(
                        f"store {source} was written by another setup than {self.path}: {mismatch}",
                        "merge into a new store, or pass --allow-mixed",
                    )
                self._put_provenance(pid, record)  # the source's entries keep pointing at it
            have = self.existing_keys()
            copied = 0
            pending: list[tuple[bytes, bytes, bytes | None]] = []

            with src._begin(buffers=False) as txn, txn.cursor(db=src._meta_db) as cursor:
                for key, meta in cursor:
                    key_bytes = bytes(key)
                    if key_bytes.decode("utf-8", "replace") in have:
                        continue
                    acts = txn.get(key_bytes, db=src._act_db)
                    pending.append((key_bytes, bytes(meta), None if acts is None else bytes(acts)))
                    copied += 1
                    if len(pending) >= batch:
                        self._put_entries(pending)
                        pending.clear()
            if pending:
                self._put_entries(pending)
        return copied

    def _write(self, body: Any) -> None:
        import lmdb

        while True:
            try:
                with self.env.begin(write=True) as txn:
                    body(txn)
                return
            except lmdb.MapFullError:
                size = int(self.env.info()["map_size"])
                if size * 2 > MAX_MAP_SIZE:
                    raise StoreError(
                        f"store {self.path} cannot grow past {size >> 20} MiB",
                        "check free disk space",
                    ) from None
                logger.info(
                    "store %s full at %d MiB: growing to %d MiB", self.path, size >> 20, size >> 19
                )
                self.env.set_mapsize(size * 2)
            except lmdb.Error as exc:  # a full disk reaches LMDB as an I/O error
                raise StoreError(
                    f"cannot write to store {self.path}: {exc} (a full disk shows as an "
                    "input/output error)",
                    "free disk space and run the same command again; committed entries are kept",
                ) from None


# --- reader -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreEntry:
    """One entry read from a store: key, metadata and named arrays (``None`` when absent)."""

    key: str
    metadata: dict[str, Any]
    arrays: dict[str, Any] | None


@dataclass(frozen=True)
class StoreStats:
    """What ``tracekit log stats`` shows about a store."""

    path: str
    entries: int
    with_activations: int
    arrays: dict[str, dict[str, Any]]
    activation_bytes: int
    metadata_bytes: int
    file_bytes: int
    map_size: int
    provenance: dict[str, dict[str, Any]]
    format: str = STORE_FORMAT
    """The store's format: tracekit's, or the seed's (:mod:`tracekit.storage.seed_store`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_store(
        cls,
        store: StoreHandle,
        counts: tuple[int, int, int, int],
        arrays: dict[str, dict[str, Any]],
        **extra: Any,
    ) -> StoreStats:
        """The stats of ``store`` from ``counts`` (entries, with activations, activation bytes,
        metadata bytes) and ``arrays`` (see :func:`count_array`), with its file and map sizes."""
        entries, with_acts, act_bytes, meta_bytes = counts
        file_bytes, map_size = file_and_map_size(store.path, store.env)
        return cls(
            str(store.path),
            entries,
            with_acts,
            sort_arrays(arrays),
            act_bytes,
            meta_bytes,
            file_bytes,
            map_size,
            **extra,
        )


class ActivationStore(StoreHandle):
    """A read-only view of a store. Open with :func:`open_store`; close (or ``with``) when done.

    ``get``/``get_by_prompt``/iteration return copies that outlive any transaction.
    :meth:`view` yields zero-copy numpy views into LMDB's memory map: they are valid only
    inside its ``with`` block (the read transaction); copy what you keep (``arr.copy()``).
    """

    needs_prompt = True
    """Every entry's metadata holds the prompt its key hashes (``reconstruct`` checks it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_store_path(self.path, for_writing=False)
        self.env = _open_env(self.path, readonly=True)
        try:
            self._act_db, self._meta_db, self._info_db = _open_dbs(
                self.env, self.path, create=False
            )
        except BaseException:
            self.env.close()
            raise

    # --- lifecycle -----------------------------------------------------------------------
    def _begin(self, buffers: bool = False) -> Any:
        """A read transaction; adopts a map a writer in another process grew meanwhile."""
        import lmdb

        begin: Any = self.env.begin  # typed per literal ``buffers`` value; one call site here
        try:
            return begin(buffers=buffers)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # 0: take the size the data file has now
            return begin(buffers=buffers)

    # --- metadata ------------------------------------------------------------------------
    @property
    def provenance(self) -> dict[str, dict[str, Any]]:
        """Provenance records by id (one per run setup that wrote into the store)."""
        with self._begin() as txn:
            return _read_provenance(txn, self._info_db)

    def __len__(self) -> int:
        with self._begin() as txn:
            return int(txn.stat(self._meta_db)["entries"])

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._begin(buffers=True) as txn:
            return txn.get(key.encode(), db=self._meta_db) is not None

    def keys(self) -> Iterator[str]:
        """Every entry key, in key order."""
        with self._begin() as txn, txn.cursor(db=self._meta_db) as cursor:
            for key in cursor.iternext(values=False):
                yield bytes(key).decode("utf-8", "replace")

    def metadata(self, key: str) -> dict[str, Any] | None:
        """The metadata of ``key``, or ``None`` when absent; ``ValueError`` when corrupt."""
        with self._begin(buffers=True) as txn:
            raw = txn.get(key.encode(), db=self._meta_db)
            return None if raw is None else _decode_meta(raw)

    def iter_raw_metadata(self) -> Iterator[tuple[str, bytes, str]]:
        """(key, metadata bytes, activations status) for every entry, in key order.

        The status is ``ok``, ``missing`` or ``corrupt`` (bad magic, or a header length past
        the value's end); only the first bytes are read, never the arrays or the header JSON
        (:meth:`get` checks those). For tools that count bad entries instead of stopping.
        """
        with (
            self._begin(buffers=True) as txn,
            txn.cursor(db=self._meta_db) as cursor,
            txn.cursor(db=self._act_db) as acts,
        ):
            for key, value in cursor:
                act = acts.get(bytes(key))
                status = "missing" if act is None else _quick_status(act)
                yield bytes(key).decode("utf-8", "replace"), bytes(value), status

    def iter_metadata(self) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        """(key, metadata or None when unreadable, activations status) for every entry, in
        key order; see :meth:`iter_raw_metadata`."""
        for key, raw, status in self.iter_raw_metadata():
            try:
                meta: dict[str, Any] | None = _decode_meta(raw)
            except ValueError:
                meta = None
            yield key, meta, status

    # --- entries -------------------------------------------------------------------------
    def get(self, key: str, verify: bool = True) -> StoreEntry | None:
        """The entry at ``key`` with copied arrays, or ``None``; ``StoreError`` when corrupt."""
        with self._begin(buffers=True) as txn:
            raw_meta = txn.get(key.encode(), db=self._meta_db)
            if raw_meta is None:
                return None
            raw_acts = txn.get(key.encode(), db=self._act_db)
            try:
                meta = _decode_meta(raw_meta)
                arrays = None
                if raw_acts is not None:
                    views = decode_arrays(raw_acts, verify=verify)
                    arrays = {name: _copy(arr) for name, arr in views.items()}
            except ValueError as exc:
                raise StoreError(f"entry {key} in {self.path} is corrupt: {exc}") from None
        return StoreEntry(key=key, metadata=meta, arrays=arrays)

    def get_by_prompt(self, prompt: str) -> StoreEntry | None:
        """The entry logged for the formatted ``prompt`` (looked up by its SHA-256 key)."""
        return self.get(prompt_key(prompt))

    @contextlib.contextmanager
    def view(self, key: str, as_torch: bool = False) -> Iterator[dict[str, Any] | None]:
        """Zero-copy arrays of ``key`` (``None`` when absent), valid only inside the block.

        The arrays point into LMDB's memory map through a read transaction that ends with the
        block; using them afterwards reads freed memory. bfloat16 arrays are float32 copies
        unless ``as_torch`` (then zero-copy ``torch.bfloat16`` tensors).
        """
        with self._begin(buffers=True) as txn:
            raw = txn.get(key.encode(), db=self._act_db)
            try:
                yield None if raw is None else decode_arrays(raw, verify=False, as_torch=as_torch)
            except ValueError as exc:
                raise StoreError(f"entry {key} in {self.path} is corrupt: {exc}") from None

    def __iter__(self) -> Iterator[StoreEntry]:
        """Every entry (copies), in key order; corrupt entries raise :class:`StoreError`."""
        for key in list(self.keys()):
            entry = self.get(key)
            if entry is not None:
                yield entry

    def stats(self) -> StoreStats:
        """Entries, layers/dtypes/shapes, bytes and provenance, from headers only."""
        arrays: dict[str, dict[str, Any]] = {}
        with_acts = act_bytes = meta_bytes = 0
        with self._begin(buffers=True) as txn:
            entries = int(txn.stat(self._meta_db)["entries"])
            with txn.cursor(db=self._meta_db) as cursor:
                for _, value in cursor:
                    meta_bytes += len(value)
            with txn.cursor(db=self._act_db) as cursor:
                for _, value in cursor:
                    act_bytes += len(value)
                    try:
                        specs, _, _ = read_header(value)
                    except ValueError:
                        continue
                    with_acts += 1
                    for spec in specs:
                        count_array(arrays, spec.name, spec.dtype, spec.shape)
        counts = (entries, with_acts, act_bytes, meta_bytes)
        return StoreStats.of_store(self, counts, arrays, provenance=self.provenance)


def count_array(
    arrays: dict[str, dict[str, Any]], name: str, dtype: str, shape: Sequence[int]
) -> None:
    """Count one entry's array ``name`` into ``arrays`` (``StoreStats.arrays``)."""
    info = arrays.setdefault(
        name, {"dtype": dtype, "width": tuple(shape[1:]), "entries": 0, "positions": 0}
    )
    info["entries"] += 1
    info["positions"] += shape[0] if shape else 1


def sort_arrays(arrays: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``arrays`` by layer number (``layer_2`` before ``layer_10``), other names last."""
    return {k: arrays[k] for k in sorted(arrays, key=_layer_sort_key)}


def file_and_map_size(path: Path, env: lmdb.Environment) -> tuple[int, int]:
    """Bytes of the store's ``data.mdb`` and its environment's map size."""
    data = path / "data.mdb"
    return (data.stat().st_size if data.exists() else 0), int(env.info()["map_size"])


def _layer_sort_key(name: str) -> tuple[int, str]:
    suffix = name.rsplit("_", 1)[-1]
    return (int(suffix), name) if suffix.isdigit() else (1 << 30, name)


def _decode_meta(raw: bytes | memoryview) -> dict[str, Any]:
    meta = json.loads(bytes(raw))
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def _copy(arr: Any) -> Any:
    return arr.clone() if hasattr(arr, "clone") else arr.copy()


def open_store(path: str | Path) -> ActivationStore:
    """Open an activation store for reading (``StoreError`` if ``path`` is not one)."""
    return ActivationStore(path)


__all__ = [
    "MAGIC",
    "STORE_FORMAT",
    "ActivationStore",
    "ActivationStoreWriter",
    "ArraySpec",
    "PendingEntry",
    "StoreEntry",
    "StoreStats",
    "decode_arrays",
    "encode_arrays",
    "open_store",
    "prompt_key",
    "provenance_id",
    "read_header",
]
