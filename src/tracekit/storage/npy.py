"""The header of a ``.npy`` array: its shape, order and dtype, read without the data.

Every reader of a ``.npy`` format (sentence NPZ members, generation caches, activation slots)
checks the header first, so that a wrong file fails with a clear message before any large
read and nothing is unpickled.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, Fortran order, dtype) of the ``.npy`` array at ``handle``'s position.

    Leaves ``handle`` at the array's first data byte. Raises ``ValueError`` or ``EOFError``
    when the bytes are not a ``.npy`` header.
    """
    import numpy as np

    version = np.lib.format.read_magic(handle)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(handle)
    return tuple(shape), bool(fortran), dtype
