"""Every on-disk format tracekit reads or writes, and the atomic-write primitives under them."""

from tracekit.storage.atomic import (
    atomic_open,
    check_writable,
    save_npy,
    save_npz,
    write_bytes,
    write_json,
    write_text,
)

__all__ = [
    "atomic_open",
    "check_writable",
    "save_npy",
    "save_npz",
    "write_bytes",
    "write_json",
    "write_text",
]
