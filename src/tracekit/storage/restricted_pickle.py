"""A pickle reader that cannot run code: plain containers, strings, numbers, numpy arrays.

Old files from the seeds' scripts hold pickles (an LMDB store's values, a generation cache's
object arrays). :class:`RestrictedUnpickler` builds ``dict``/``list``/``tuple``/``set``, ``str``/
``bytes``, numbers and numpy arrays and scalars, and refuses every other global by its name
(:class:`UnsafePickleError`) before anything is called, so reading such a file cannot run code
from it. The callers offer ``--allow-pickle`` for files that hold other objects: that uses
:mod:`pickle` itself, which runs any code the file holds.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import IO, Any


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for ``bytes``: latin-1 text only."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_encode,
}
_NUMPY_GLOBALS = {
    ("multiarray", "_reconstruct"),  # ndarray.__reduce__ (pickle protocols 0-4)
    ("multiarray", "scalar"),  # numpy scalars (np.float32(1.0))
    ("numeric", "_frombuffer"),  # ndarray.__reduce_ex__ under protocol 5
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a class the restricted unpickler does not build."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, ``str``/``bytes``, numbers and numpy arrays and scalars;
    any other class (``os.system``, ``torch._utils._rebuild_tensor_v2``, ...) is refused with
    its name before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np

        if module == "__builtin__":  # Python 2 names in protocols 0-2
            module = "builtins"
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        package, _, submodule = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and (submodule, name) in _NUMPY_GLOBALS:
            core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
            return getattr(getattr(core, submodule), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module.startswith("numpy") and name.endswith("DType") and name[:1].isupper():
            return getattr(np.dtypes, name)  # numpy >= 1.25 pickles dtypes by class
        raise UnsafePickleError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("a persistent id")


def restricted_loads(data: bytes) -> Any:
    """:func:`pickle.loads` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def restricted_load(handle: IO[bytes]) -> Any:
    """:func:`pickle.load` from an open binary file through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(handle).load()
