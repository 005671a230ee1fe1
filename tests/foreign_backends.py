"""A correct backend whose arrays are a type the suite has never seen.

Engines hand back torch tensors, CuPy or OpenVINO arrays, DLPack capsules: the suite may
not assume NumPy's methods on them (``.copy``, ``.astype``, ``np.asarray``). ``Opaque``
offers only what the protocol promises of a native array (``shape`` and basic slicing
along the first axis); everything else goes through the backend's ``asarray`` and
``to_numpy``. ``ForeignArrayBackend`` is ``CorrectBackend`` behind that wall, so any
failure it gets is the suite treating a backend's array as its own.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from broken_backends import CorrectBackend, CorrectCache
from pytest_longctx import CacheSpec


class Opaque:
    """An array the suite cannot read but through ``to_numpy``: no __array__, no copy, no dtype."""

    __slots__ = ("_data",)
    __array_ufunc__ = None  # NumPy may not treat it as an operand either

    def __init__(self, data: np.ndarray) -> None:
        self._data = data

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._data.shape

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: Any) -> "Opaque":
        if not isinstance(index, slice):
            raise TypeError(f"Opaque arrays take basic slices along axis 0 only, not {index!r}")
        return Opaque(self._data[index])

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Opaque arrays convert only through the backend's to_numpy")


def _unwrap(x: Any) -> np.ndarray:
    if not isinstance(x, Opaque):
        raise TypeError(f"expected the backend's own array type, got {type(x).__name__}")
    return x._data


class ForeignArrayCache:
    """CorrectCache taking and returning only Opaque arrays."""

    def __init__(self, spec: CacheSpec) -> None:
        self.inner = CorrectCache(spec)
        self.spec = spec

    def length(self, layer: int) -> int:
        return self.inner.length(layer)

    def append(self, layer: int, k: Any, v: Any) -> None:
        self.inner.append(layer, _unwrap(k), _unwrap(v))

    def attend(self, layer: int, q: Any) -> Opaque:
        return Opaque(self.inner.attend(layer, _unwrap(q)))

    def read(self, layer: int, start: int, stop: int) -> Tuple[Opaque, Opaque]:
        k, v = self.inner.read(layer, start, stop)
        return Opaque(k), Opaque(v)

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def close(self) -> None:
        self.inner.close()


class ForeignArrayBackend(CorrectBackend):
    """The correct float32 backend, seen through arrays that are not NumPy's."""

    name = "foreign-arrays"
    Cache = ForeignArrayCache

    def asarray(self, array: np.ndarray) -> Opaque:
        return Opaque(np.array(array, copy=True))

    def to_numpy(self, native: Any) -> np.ndarray:
        return np.array(_unwrap(native), copy=True)
