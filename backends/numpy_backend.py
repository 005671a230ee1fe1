"""The built-in CPU backend: a preallocated NumPy KV cache with BLAS attention.

Each layer stores K (rotated) and V as (n_kv_heads, max_positions, head_dim)
in the storage type, so a key block of one KV head is a contiguous matrix for
sgemm. Blocks in float16, bfloat16, q8_0 or q4_0 are decoded into float32 scratch
block by block; NumPy has no half-precision BLAS. Work is split over threads
by position blocks (append) and KV heads (attend); NumPy and BLAS release the
GIL.

When the native kernels (_native.c, built on first use) are available, they
encode and decode float16, bfloat16, q8_0 and q4_0 and rotate K as they store it, straight
into the storage layout (otherwise the NumPy kernels of _kernels do, giving the
same stored bytes), and attention with few query rows (decode) reads K and V
as stored through their products instead of decoding blocks for BLAS.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from pytest_longctx.errors import NotSupported, SpecError
from pytest_longctx.protocol import BackendInfo
from pytest_longctx.spec import CacheSpec

from . import _checks as C
from . import _kernels as K
from . import _native as N
from ._host import available_cores, cpu_name_and_vendor

KV_DTYPES = ("float32", "float16", "bfloat16", "q8_0", "q4_0")
PREPARE = ("open", "write")
# Keys per attention block, unless the block option says: decoded into float32 scratch for
# BLAS, or read as stored by the native products (no scratch; fewer steps in Python).
DEFAULT_BLOCK = 1024
# The native products' block: about NATIVE_SCORES scores per KV head (block x query rows),
# so that a decode query (2-4 rows) scores 8-16K keys per step and the softmax merge in
# NumPy runs a few times per layer, not dozens (decode at 16K on 2 cores: 20.2 GB/s with
# 4096-key blocks, 22.9 GB/s with 16384, best of 5, one run).
NATIVE_SCORES = 32768
NATIVE_BLOCK_RANGE = (1024, 16384)
# Positions encoded per step of an append: bounds the float32 temporaries (a few MiB)
# and is the unit of work handed to the threads.
APPEND_STEP = 256
# The quantized stores' native kernels work with no large temporaries, and handing a task to
# a pool thread costs ~50 us; their appends go in one step per thread of at least this many
# positions, K and V in separate tasks (float stores go through the native team, N.fill).
NATIVE_APPEND_STEP = 1024
# Values (positions x KV heads x head_dim) from which an append is split over the cores:
# below, waking a thread (~50 us) costs more than writing it.
NATIVE_PARALLEL_VALUES = 1 << 15
# Values up to which one NumPy cast beats the kernels' dozen passes (per-call overhead).
CAST_BELOW = 16384
# Values up to which one NumPy call decodes faster than a native call is set up (~8 us).
NATIVE_DECODE_ABOVE = 4096
# Query rows (of one KV head) up to which attention reads K and V as stored, through the
# native products, rather than decoding blocks for BLAS's matrix products.
NATIVE_ROWS = 32


Rope = Tuple[np.ndarray, np.ndarray, str]  # cos and sin rows of the positions, style


class _Store:
    """One tensor (K or V) of every layer in a storage type; decodes to float32."""

    nbytes: int
    native: Optional[str] = None  # the kind the native kernels store, when they do

    def write(self, layer: int, start: int, x: np.ndarray, rope: Optional[Rope] = None) -> None:
        """Store float32 x (n, n_kv, d), contiguous, at positions start .. start+n-1,
        rotated first by rope (K.rotate's cos, sin and style) when given. Float stores with
        the native kernels are written by NumpyCache.append through N.fill, not here."""
        if rope is not None:
            x = K.rotate(np, x, rope[0], rope[1], rope[2], np.empty_like(x))
        self.put(layer, start, x)

    def put(self, layer: int, start: int, x: np.ndarray) -> None:
        """write, x already rotated."""
        raise NotImplementedError

    def slots(self, layer: int, start: int, n: int) -> np.ndarray:
        """The storage of positions start .. start+n-1 as (n, n_kv, d), for the native kernels."""
        return self.data[layer, :, start : start + n].transpose(1, 0, 2)

    def read(
        self, layer: int, heads: slice, start: int, stop: int, out: np.ndarray, exponent: int = 0
    ) -> np.ndarray:
        """float32 (h, stop-start, d) of those KV heads, times 2**-exponent; into out or a
        view of storage. exponent is 0 or what cheap_exponent gave."""
        raise NotImplementedError

    def cheap_exponent(self, layer: int) -> int:
        """An exponent that saves read a pass on this layer (see attend_grouped), else 0."""
        return 0

    def stored(self, layer: int, heads: slice, start: int, stop: int) -> np.ndarray:
        """The storage of those KV heads and positions, (h, stop-start, d), for the native products."""
        return self.data[layer, heads, start:stop]

    def arrays(self) -> List[np.ndarray]:
        """Every array of the storage (what preparation zeroes)."""
        return [self.data]


def _storage(shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
    """Allocated whole at open (tracemalloc counts it); NumpyCache prepares its pages."""
    return np.empty(shape, dtype=dtype)


def _prepare(arrays: List[np.ndarray], run: Callable[[Callable[[int], None], range], None], parts: int) -> None:
    """Zero every page of ``arrays`` (at open, or a layer's at its first append), in ``parts``
    slices along the first axis.

    A first write to fresh memory pays a page fault per page (measured here: 0.5 GB/s,
    against about 20 GB/s into the same memory once touched), so a cache left untouched
    bills its first prefill for the allocation. Engines clear their KV buffers at start-up;
    this does the same, so the steady fill writes into prepared memory.
    """
    pieces = [part for array in arrays for part in np.array_split(array, parts) if part.size]
    run(lambda i: pieces[i].fill(0), range(len(pieces)))


class _Float32Store(_Store):
    def __init__(self, shape: Tuple[int, ...], native: bool) -> None:
        self.data = _storage(shape, np.float32)
        self.nbytes = self.data.nbytes
        self.native = "float32" if native else None  # rope fused into the copy; attention products

    def put(self, layer: int, start: int, x: np.ndarray) -> None:
        self.data[layer, :, start : start + x.shape[0]] = x.transpose(1, 0, 2)

    def read(
        self, layer: int, heads: slice, start: int, stop: int, out: np.ndarray, exponent: int = 0
    ) -> np.ndarray:
        return self.data[layer, heads, start:stop]


class _Float16Store(_Store):
    """IEEE half bits: native F16C conversions, else the kernels' fast exact passes.

    Without the native kernels: NumPy's own cast costs ~3 ns a value but one
    call, so it encodes small appends (decode-style, a position at a time). The
    fast decode is exact for finite values only, so a layer that holds inf or
    NaN uses the cast too.
    """

    def __init__(self, shape: Tuple[int, ...], native: bool) -> None:
        self.data = _storage(shape, np.uint16)
        self.nbytes = self.data.nbytes
        self.nonfinite = [False] * shape[0]
        self.native = "float16" if native else None

    def put(self, layer: int, start: int, x: np.ndarray) -> None:
        out = self.slots(layer, start, x.shape[0])
        if x.size == 0:
            return
        if x.size > CAST_BELOW:
            nonfinite = K.float16_encode(np, x, out)
        else:
            with np.errstate(over="ignore"):
                out.view(np.float16)[...] = x
            nonfinite = not np.abs(x).max() < 65520.0  # rounds to inf; NaN compares False
        if nonfinite:
            self.nonfinite[layer] = True

    def read(
        self, layer: int, heads: slice, start: int, stop: int, out: np.ndarray, exponent: int = 0
    ) -> np.ndarray:
        bits = self.data[layer, heads, start:stop]
        if self.native and bits.size > NATIVE_DECODE_ABOVE:
            return N.decode("float16", bits, out)
        if self.native or self.nonfinite[layer]:  # the cast is exact for every value
            out[...] = bits.view(np.float16)
            return out
        return K.float16_decode(np, bits.view(np.int16), out, scaled=exponent == K.HALF_EXPONENT)

    def cheap_exponent(self, layer: int) -> int:
        return 0 if self.native or self.nonfinite[layer] else K.HALF_EXPONENT


class _BFloat16Store(_Store):
    def __init__(self, shape: Tuple[int, ...], native: bool) -> None:
        self.data = _storage(shape, np.uint16)
        self.nbytes = self.data.nbytes
        self.native = "bfloat16" if native else None

    def put(self, layer: int, start: int, x: np.ndarray) -> None:
        K.bfloat16_encode(np, x, self.slots(layer, start, x.shape[0]))

    def read(
        self, layer: int, heads: slice, start: int, stop: int, out: np.ndarray, exponent: int = 0
    ) -> np.ndarray:
        bits = self.data[layer, heads, start:stop]
        if self.native and bits.size > NATIVE_DECODE_ABOVE:
            return N.decode("bfloat16", bits, out)
        return K.bfloat16_decode(np, bits, out)


class _QuantStore(_Store):
    """ggml's block formats: values and a float16 scale per 32 along head_dim, in two arrays.

    The native kernels quantize and dequantize in one pass with the NumPy kernels' bits;
    K is rotated before (in float32, no fused path), and attention with few query rows
    reads values and scales as stored, through the native products.
    """

    kind: str
    values: Any  # the dtype of the values array
    per_element: int  # values a stored element holds
    kernels: Tuple[Callable[..., Any], Callable[..., Any]]  # _kernels' encode and decode

    def __init__(self, shape: Tuple[int, ...], native: bool) -> None:
        self.q = _storage(shape[:-1] + (shape[-1] // self.per_element,), self.values)
        self.d = _storage(shape[:-1] + (shape[-1] // K.Q8_BLOCK,), np.float16)
        self.nbytes = self.q.nbytes + self.d.nbytes
        self.native_quant = native
        self.native = self.kind if native else None

    def arrays(self) -> List[np.ndarray]:
        return [self.q, self.d]

    def stored(self, layer: int, heads: slice, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.q[layer, heads, start:stop], self.d[layer, heads, start:stop].view(np.uint16)

    def write(self, layer: int, start: int, x: np.ndarray, rope: Optional[Rope] = None) -> None:
        if rope is not None and self.native_quant:  # rotated by the native float32 kernel, in one pass
            x = N.rope_encode("float32", x, rope[0], rope[1], rope[2], np.empty_like(x))
            rope = None
        super().write(layer, start, x, rope)

    def put(self, layer: int, start: int, x: np.ndarray) -> None:
        stop = start + x.shape[0]
        q = self.q[layer, :, start:stop].transpose(1, 0, 2)
        d = self.d[layer, :, start:stop].transpose(1, 0, 2)
        if self.native_quant:
            N.quant_encode(self.kind, x, q, d.view(np.uint16))
        else:
            self.kernels[0](np, x, q, d)

    def read(
        self, layer: int, heads: slice, start: int, stop: int, out: np.ndarray, exponent: int = 0
    ) -> np.ndarray:
        q, d = self.q[layer, heads, start:stop], self.d[layer, heads, start:stop]
        if self.native_quant:
            return N.quant_decode(self.kind, q, d.view(np.uint16), out)
        return self.kernels[1](np, q, d, out)


class _Q8Store(_QuantStore):
    """q8_0: an int8 per value, 34 bytes per 32 values."""

    kind, values, per_element = "q8_0", np.int8, 1
    kernels = (K.q8_0_encode, K.q8_0_decode)


class _Q4Store(_QuantStore):
    """q4_0: two 4-bit values a byte (value j of a block in the low nibble of byte j, value
    j + 16 in its high nibble), 18 bytes per 32 values."""

    kind, values, per_element = "q4_0", np.uint8, 2
    kernels = (K.q4_0_encode, K.q4_0_decode)


_STORES = {
    "float32": _Float32Store,
    "float16": _Float16Store,
    "bfloat16": _BFloat16Store,
    "q8_0": _Q8Store,
    "q4_0": _Q4Store,
}


class NumpyCache:
    """A KV cache of one spec, preallocated for max_positions at open."""

    def __init__(self, spec: CacheSpec, block: Optional[int], pool: Optional[ThreadPoolExecutor], threads: int,
                 native: bool, prepare: str = "write") -> None:
        self.spec = spec
        self._block = block or DEFAULT_BLOCK
        self._native_block = block
        self._pool = pool
        self._threads = threads
        shape = (spec.n_layers, spec.n_kv_heads, spec.max_positions, spec.head_dim)
        store = _STORES[spec.kv_dtype]
        self._k: Optional[_Store] = store(shape, native)
        self._v: Optional[_Store] = store(shape, native)
        # Layers whose storage is still to be zeroed before their first write (prepare="write").
        self._unprepared = set(range(spec.n_layers)) if prepare == "write" else set()
        if prepare == "open":
            _prepare(self._k.arrays() + self._v.arrays(), self._run, max(1, threads))
        self._rope = K.RopeTable(np, spec)
        self._lengths = [0] * spec.n_layers
        # KV heads per attention task, and one pair of scratch blocks per task.
        parts = max(1, min(threads, spec.n_kv_heads))
        bounds = np.linspace(0, spec.n_kv_heads, parts + 1).astype(int)
        self._head_groups = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self._scratch = [
            (
                np.empty((g.stop - g.start, self._block, spec.head_dim), np.float32),
                np.empty((g.stop - g.start, self._block, spec.head_dim), np.float32),
            )
            for g in self._head_groups
        ]

    # --- checks ---

    def _stores(self) -> Tuple[_Store, _Store]:
        if self._k is None or self._v is None:
            raise ValueError("the cache is closed")
        return self._k, self._v

    def _as_input(self, name: str, x: Any, heads: int) -> np.ndarray:
        array = np.ascontiguousarray(x, dtype=np.float32)
        C.rows(self.spec, name, array, heads)
        return array

    # --- protocol ---

    def length(self, layer: int) -> int:
        C.layer(self.spec, layer)
        return self._lengths[layer]

    def append(self, layer: int, k: Any, v: Any) -> None:
        k_store, v_store = self._stores()
        spec = self.spec
        k, v, start = C.append_inputs(spec, self._lengths, layer, k, v, self._as_input)
        n = k.shape[0]
        if layer in self._unprepared:
            _prepare([a[layer] for a in k_store.arrays() + v_store.arrays()], self._run, max(1, self._threads))
            self._unprepared.discard(layer)

        cos, sin = self._rope.rows(start, start + n)
        if k_store.native in N.FORMATS:
            # One native call: K rotated and V, the positions split over the native team, whose
            # workers stay awake from one layer's append to the next (a hand-over to a pool
            # thread costs a wake-up per layer). An append too small to repay it runs on one core.
            threads = self._threads if n * spec.n_kv_heads * spec.head_dim >= NATIVE_PARALLEL_VALUES else 1
            N.fill(k_store.native, k, v, cos, sin, spec.rope.style, k_store.slots(layer, start, n),
                   v_store.slots(layer, start, n), threads)
        elif k_store.native:
            # Quantized: K (rotated) and V are written by separate pool tasks (the block
            # quantizer is bound by arithmetic, 0.5-1 ms a layer, so a wake-up per task is cheap);
            # a chunk past NATIVE_APPEND_STEP per thread is split further. An append too small
            # to repay a hand-over to a thread runs here.
            size = max(NATIVE_APPEND_STEP, -(-n // self._threads))
            steps = [(store, a) for a in range(0, n, size) for store in (k_store, v_store)]
            if n * spec.n_kv_heads * spec.head_dim < NATIVE_PARALLEL_VALUES:
                steps = [(None, a) for a in range(0, n, size)]

            def task(i: int) -> None:
                store, a = steps[i]
                b = min(a + size, n)
                if store is not v_store:
                    k_store.write(layer, start + a, k[a:b], rope=(cos[a:b], sin[a:b], spec.rope.style))
                if store is not k_store:
                    v_store.write(layer, start + a, v[a:b])

            self._run(task, range(len(steps)))
        else:

            def step(a: int) -> None:
                b = min(a + APPEND_STEP, n)
                k_store.write(layer, start + a, k[a:b], rope=(cos[a:b], sin[a:b], spec.rope.style))
                v_store.write(layer, start + a, v[a:b])

            self._run(step, range(0, n, APPEND_STEP))
        self._lengths[layer] = start + n

    def attend(self, layer: int, q: Any) -> np.ndarray:
        k_store, v_store = self._stores()
        C.layer(self.spec, layer)
        spec = self.spec
        q = self._as_input("q", q, spec.n_heads)
        length, n_q = self._lengths[layer], q.shape[0]
        C.queries(n_q, length)
        cos, sin = self._rope.rows(length - n_q, length)
        rotated = K.rotate(np, q, cos, sin, spec.rope.style, np.empty_like(q))
        grouped = K.group_queries(np, rotated, spec.n_kv_heads, spec.scale)
        out = np.empty_like(grouped)
        # Decoders may hand K and V over scaled by 2**-exponent; both must agree.
        exponent = k_store.cheap_exponent(layer)
        if v_store.cheap_exponent(layer) != exponent:
            exponent = 0

        # Few query rows: the native products read K and V as stored, once (exponent is 0).
        native = k_store.native if grouped.shape[1] <= NATIVE_ROWS else None
        products: Optional[K.Products] = None
        if native in N.QUANT:
            products = (
                lambda q, k: N.quant_dot(native, q, k[0], k[1], np.empty(q.shape[:2] + k[0].shape[1:2], np.float32)),
                lambda p, v, acc: N.quant_accumulate(native, p, v[0], v[1], acc),
            )
        elif native:
            products = (
                lambda q, k: N.dot(native, q, k, np.empty(q.shape[:2] + k.shape[1:2], np.float32)),
                lambda p, v, acc: N.accumulate(native, p, v, acc),
            )

        def task(i: int) -> None:
            heads = self._head_groups[i]
            k_out, v_out = self._scratch[i]

            def load(start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
                if native:
                    return k_store.stored(layer, heads, start, stop), v_store.stored(layer, heads, start, stop)
                n = stop - start
                return (
                    k_store.read(layer, heads, start, stop, k_out[:, :n], exponent),
                    v_store.read(layer, heads, start, stop, v_out[:, :n], exponent),
                )

            block = self._block
            if native:
                low, high = NATIVE_BLOCK_RANGE
                block = self._native_block or max(low, min(high, NATIVE_SCORES // grouped.shape[1]))
            out[heads] = K.attend_grouped(np, grouped[heads], length, load, spec, block, exponent, products=products)

        self._run(task, range(len(self._head_groups)))
        return K.ungroup_queries(np, out, n_q)

    def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        k_store, v_store = self._stores()
        C.layer(self.spec, layer)
        length = self._lengths[layer]
        C.read_range(start, stop, length)
        return self._read_out(k_store, layer, start, stop), self._read_out(v_store, layer, start, stop)

    def _read_out(self, store: _Store, layer: int, start: int, stop: int) -> np.ndarray:
        """A fresh (stop-start, n_kv, d) float32 array, decoded into in one pass."""
        out = np.empty((stop - start, self.spec.n_kv_heads, self.spec.head_dim), np.float32)
        view = out.transpose(1, 0, 2)
        got = store.read(layer, slice(0, self.spec.n_kv_heads), start, stop, view)
        if got is not view:  # a view of the storage
            view[...] = got
        return out

    def nbytes(self) -> int:
        if self._k is None or self._v is None:
            return 0
        return self._k.nbytes + self._v.nbytes

    def close(self) -> None:
        self._k = self._v = None
        self._scratch = []

    def _run(self, fn: Callable[[int], None], items: range) -> None:
        """fn over items: the first here, the others on the pool (this thread would only wait)."""
        if self._pool is None or len(items) < 2:
            for item in items:
                fn(item)
            return
        futures = [self._pool.submit(fn, item) for item in items[1:]]
        try:
            fn(items[0])
        finally:
            for future in futures:
                future.result()



def _blas_version() -> Optional[str]:
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy or a build without the dict form
        return None


class NumpyBackend:
    """The "numpy" backend. Options: block (keys per attention block; by default
    DEFAULT_BLOCK, or NATIVE_SCORES per query row for the native products), threads, native (false:
    the NumPy kernels even where the native ones are available), prepare (when the
    storage's pages are zeroed: "write", the default, a layer's on its first append;
    "open", all of them at open, as an engine that clears its KV buffers at start-up).
    The default is "write" because the suite opens many full-size caches and writes one
    layer of most (the equivalence and limits groups): zeroing every layer at open cost
    them 22 s of user and 16 s of system CPU more at 16384 positions on this 2-core host
    (137+42 s against 115+26 s, one run each under load); a fill pays first-touch either
    way for what it writes."""

    device_aliases = {"cpu": {}}

    name = "numpy"

    def __init__(self, *, block: Optional[int] = None, threads: Optional[int] = None, native: bool = True,
                 prepare: str = "write") -> None:
        if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
            raise SpecError(f"numpy backend option block={block!r}, but should be a positive integer")
        if threads is None:
            threads = available_cores()
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise SpecError(f"numpy backend option threads={threads!r}, but should be a positive integer")
        if not isinstance(native, bool):
            raise SpecError(f"numpy backend option native={native!r}, but should be true or false")
        if prepare not in PREPARE:
            raise SpecError(f"numpy backend option prepare={prepare!r}, but should be one of {', '.join(PREPARE)}")
        self.block = block
        self.threads = threads
        self.native = native
        self.prepare = prepare
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="longctx-numpy") if threads > 1 else None

    def info(self) -> BackendInfo:
        name, vendor = cpu_name_and_vendor()
        versions = {"numpy": np.__version__, "kernels": self._kernels()}
        blas = _blas_version()
        if blas:
            versions["blas"] = blas
        return BackendInfo(
            name=self.name,
            device_kind="cpu",
            device_name=name,
            vendor=vendor,
            versions=versions,
            kv_dtypes=KV_DTYPES,
            max_positions=None,
        )

    def open_cache(self, spec: CacheSpec) -> NumpyCache:
        if spec.kv_dtype not in KV_DTYPES:
            raise NotSupported(f"the numpy backend stores {', '.join(KV_DTYPES)}, not {spec.kv_dtype}")
        return NumpyCache(spec, self.block, self._pool, self.threads, self.native and N.available(), self.prepare)

    def _kernels(self) -> str:
        """"native" or "numpy (<reason>)": what encodes and decodes the storage."""
        return N.describe() if self.native else "numpy (native=False)"

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def to_numpy(self, native: Any) -> np.ndarray:
        return np.asarray(native)

    def synchronize(self) -> None:
        return None

    def memory_in_use(self) -> Optional[int]:
        return None
