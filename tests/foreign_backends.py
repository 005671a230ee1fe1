"""A correct backend whose arrays are a type the suite has never seen.

Engines hand back torch tensors, CuPy or OpenVINO arrays, DLPack capsules: the suite may
not assume NumPy's methods on them (``.copy``, ``.astype``, ``np.asarray``). ``Opaque``
offers only what the protocol promises of a native array (``shape`` and basic slicing
along the first axis); everything else goes through the backend's ``asarray`` and
``to_numpy``. ``ForeignArrayBackend`` is ``CorrectBackend`` behind that wall, so any
failure it gets is the suite treating a backend's array as its own.
"""

from __future__ import annotations

import ctypes
from typing import Any, List, Tuple

import numpy as np

from broken_backends import CorrectBackend, CorrectCache
from pytest_longctx import CacheSpec, NotSupported, rope_frequencies


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


# ----------------------------------------------------------------------------- allocators


_LIBC = ctypes.CDLL(None)
_LIBC.malloc.restype, _LIBC.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
_LIBC.free.argtypes = [ctypes.c_void_p]


def _native_floats(count: int) -> Tuple[int, np.ndarray]:
    """``count`` float32 from the C heap, zeroed (touched, as torch.zeros is): tracemalloc
    never sees them, only RSS does."""
    pointer = _LIBC.malloc(count * 4)
    if not pointer:
        raise MemoryError(f"malloc of {count * 4} bytes failed")
    array = np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer))
    array[...] = 0
    return pointer, array


def leave_freed_heap(chunk_bytes: int, chunks: int) -> None:
    """Leave ``chunks`` x ``chunk_bytes`` of freed but resident memory in the C heap, as
    earlier cases of a run do: freed blocks raise glibc's mmap threshold, a live block above
    them keeps them from being trimmed, so the next allocations of that size reuse them
    without a page fault."""
    first = _LIBC.malloc(chunk_bytes)
    _LIBC.free(first)  # freeing an mmapped block raises the threshold to its size
    blocks = [_native_floats(chunk_bytes // 4)[0] for _ in range(chunks)]
    _PINS.append(_LIBC.malloc(1 << 20))  # above every free chunk: placed on top of the blocks
    for pointer in blocks:
        _LIBC.free(pointer)


_PINS: List[int] = []


class NativeCache(CorrectCache):
    """CorrectCache whose K and V live in the C heap, one block each, allocated and zeroed
    at open (a preallocated torch cache on the CPU does the same)."""

    copies = 1  # how many caches' worth of blocks it keeps

    def __init__(self, spec: CacheSpec) -> None:
        if spec.kv_dtype != "float32":
            raise NotSupported(f"only float32, not {spec.kv_dtype}")
        self.spec, self.rope = spec, rope_frequencies(spec)
        shape = (spec.n_layers, spec.max_positions, spec.n_kv_heads, spec.head_dim)
        self.pointers: List[int] = []
        blocks = []
        for _ in range(2 * self.copies):
            pointer, array = _native_floats(int(np.prod(shape)))
            self.pointers.append(pointer)
            blocks.append(array.reshape(shape))
        self.k, self.v = blocks[0], blocks[1]
        self.lengths = [0] * spec.n_layers

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def close(self) -> None:
        self.k = self.v = None
        for pointer in self.pointers:
            _LIBC.free(pointer)
        self.pointers = []


class NativeAllocBackend(CorrectBackend):
    """A correct preallocated cache in memory tracemalloc cannot see, opened after earlier
    work left freed heap behind: its figure must be its size, whatever ran before."""

    name = "native-alloc"
    Cache: Any = NativeCache

    def open_cache(self, spec: CacheSpec) -> Any:
        return self.Cache(spec)

    def asarray(self, array: np.ndarray) -> np.ndarray:
        """Called for the input pool, before the memory probe starts: the heap is left dirty there."""
        leave_freed_heap(16 << 20, 12)  # 192 MiB freed, in blocks of K's size (2 layers x 16384 x 2 x 64)
        return np.asarray(array)


class NativeTwoCopies(NativeAllocBackend):
    """The same cache holding twice its KV (a second copy for a format conversion kept
    alive): it must fail the memory group in any run, not in some."""

    name = "native-two-copies"

    class Cache(NativeCache):
        copies = 2


# ----------------------------------------------------------------------------- float32 engines


class Float32Cache(CorrectCache):
    """RoPE the way engines compute it (transformers, vLLM, llama.cpp): inverse frequencies in
    float32 (transformers' ``1 / base ** (arange(0, d, 2) / d)`` for the default kind, the
    normative ones rounded to float32 and then off by up to 3 ulp, as float32 ``pow`` leaves
    them, for the scaled kinds), float32 position x frequency, float32 cos and sin."""

    def inv_freq32(self) -> np.ndarray:
        f, rope = self.rope, self.spec.rope
        if rope.kind in ("none", "default") and f.rotary_dim:
            exponents = np.arange(0, f.rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(f.rotary_dim)
            return (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
        off = np.random.default_rng(f.rotary_dim).integers(-3, 4, size=f.inv_freq.shape)
        exact = f.inv_freq.astype(np.float32)
        return (exact + off * np.spacing(exact)).astype(np.float32)

    def angles(self, start: int, n: int) -> np.ndarray:
        positions = np.arange(start, start + n, dtype=np.float32)
        return (positions[:, None, None] * self.inv_freq32()).astype(np.float32)


class Float32RopeBackend(CorrectBackend):
    """A correct engine whose RoPE is float32 throughout: it must pass every seed."""

    name = "float32-rope"
    Cache: Any = Float32Cache


# The cache defects of broken_backends, each also on the engines of this module (float32 RoPE,
# float16 activations): a defect must be caught on an engine that computes the way real ones
# do, not only on the float64-angle CorrectCache it was written against (a yardstick wide
# enough for those engines must still be narrow enough for every bug class).


def _on_engine(defect: type, engine: type, prefix: str, kv_dtypes: Tuple[str, ...] = ()) -> type:
    """``defect`` with its one override applied to ``engine`` instead of ``CorrectCache``;
    same diagnosis as the original's."""
    cache = type("Cache", (defect.Cache, engine), {"__doc__": f"{defect.__name__}'s override on {engine.__name__}."})
    body = {"Cache": cache, "__doc__": f"{defect.__name__} on {engine.__name__}.", "__module__": __name__}
    if kv_dtypes:
        body["kv_dtypes"] = kv_dtypes
    return type(f"{prefix}{defect.__name__}", (defect,), body)


def _defects() -> None:
    import broken_backends

    for name in broken_backends.CACHE_DEFECTS:
        defect = getattr(broken_backends, name)
        globals()[f"Float32{name}"] = _on_engine(defect, Float32Cache, "Float32")
        globals()[f"Half{name}"] = _on_engine(defect, HalfPrecisionCache, "Half", ("float16",))



# ----------------------------------------------------------------------------- half-precision engines


def _half(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).astype(np.float32)


class HalfPrecisionCache(Float32Cache):
    """A model exported in float16, as ONNX Runtime and TensorRT run one: beside a float16
    cache, the activations are float16 too. Q and K arrive in float16, cos and sin are
    float16 tables, the rotated Q is float16 when it meets the keys, and the output is
    rounded to float16; scores and sums stay float32 (GroupQueryAttention's CPU kernel)."""

    storage = {"float32": np.float32, "float16": np.float16}

    def _io(self, x: np.ndarray) -> np.ndarray:
        return _half(x) if self.spec.kv_dtype == "float16" else np.asarray(x, dtype=np.float32)

    def cos_sin(self, start: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
        cos, sin = super().cos_sin(start, n)
        return (_half(cos), _half(sin)) if self.spec.kv_dtype == "float16" else (cos, sin)

    def rotate(self, x: np.ndarray, start: int) -> np.ndarray:
        return self._io(super().rotate(self._io(x), start))

    def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
        return self._io(super().attend(layer, q))


class HalfPrecisionBackend(CorrectBackend):
    """A correct engine with float16 activations beside a float16 cache: it must pass every seed."""

    name = "half-precision"
    Cache: Any = HalfPrecisionCache
    kv_dtypes = ("float32", "float16")


# The cache defects of broken_backends on each engine above: Float32<Defect>, Half<Defect>.
_defects()
