"""Rewrite an activation store's provenance records in place (real LMDB), as an older tracekit
or a damaged store would have left them."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

Records = dict[str, dict[str, Any]]


def edit_provenance_records(path: Path, edit: Callable[[Records], Records]) -> None:
    """Replace the records of the store at ``path`` (``{id: record}``) by ``edit(records)``."""
    env = lmdb.open(str(path), max_dbs=4, subdir=True)
    info = env.open_db(b"info")
    with env.begin(write=True, db=info) as txn:
        old = {
            bytes(k).decode()[len("provenance/") :]: json.loads(bytes(v))
            for k, v in txn.cursor()
            if bytes(k).startswith(b"provenance/")
        }
        for pid in old:
            txn.delete(f"provenance/{pid}".encode())
        for pid, record in edit(old).items():
            txn.put(f"provenance/{pid}".encode(), json.dumps(record).encode())
    env.close()
