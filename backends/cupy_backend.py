"""The built-in GPU backend: a KV cache in device memory, RoPE and attention on the device (CuPy).

Each layer stores K (rotated) and V as (n_kv_heads, max_positions, head_dim)
in float32, float16 or q8_0, allocated whole at open. RoPE rows (cos, sin) are
computed on the device from integer positions with float64 angles (θ·pos in
float64, then cos and sin in float64, rounded to float32), as the CPU backend
does. An append is one kernel that rotates K and writes K and V in the storage
layout, with the CPU kernels' rounding (the same stored bytes); decode-size
attention (up to MAX_KERNEL_ROWS query rows per KV head) is flash-decoding in
one launch: the keys are split over blocks, each block reads its split of K
and V once, and the last block to finish merges the splits by log-sum-exp. Larger chunks use the
blockwise attention of ``_kernels`` on CuPy arrays (cuBLAS products), the
same code the CPU backend runs on NumPy arrays.

The kernels are in ``_cupy_kernels.cu``, compiled by CuPy per storage kind and
head_dim on first use and cached on disk by CuPy.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Dict, Optional, Tuple

import numpy as np

from pytest_longctx.errors import BackendUnavailable, NotSupported, SpecError
from pytest_longctx.protocol import BackendInfo, DeviceBandwidth
from pytest_longctx.spec import CacheSpec

from . import _checks as C
from . import _kernels as K

KV_DTYPES = ("float32", "float16", "q8_0")
_KIND = {"float32": 0, "float16": 1, "q8_0": 2}
ATTENTION_MODES = ("auto", "kernel", "blas")
# Query rows (queries x group) per KV head up to which attention runs the flash-decoding
# kernel; larger chunks are matrix products. Rows per kernel block (compiled variants).
MAX_KERNEL_ROWS = 32
KERNEL_ROWS = (1, 2, 4, 8)
# Keys per block of the matrix-product path, decoded to float32 for cuBLAS.
DEFAULT_BLOCK = 8192
# Splits per KV head aim at this many blocks per multiprocessor, of at least MIN_SPLIT keys.
BLOCKS_PER_SM = 4
MIN_SPLIT = 256
MAX_SPLITS = 128  # as _cupy_kernels.cu
STORE_ROWS_PER_BLOCK = 8
WARPS = 4


def _import_cupy() -> Any:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load at import
        raise BackendUnavailable(
            f"CuPy is not importable ({type(exc).__name__}: {exc}); install it with "
            "pip install 'pytest-longctx[gpu]' (cupy-cuda12x) or cupy-cuda13x"
        ) from None
    return cupy


def _option_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SpecError(f"cupy backend option {name}={value!r}, but should be an integer >= {low}")
    return value


class _Kernels:
    """The compiled kernels of one storage kind and head_dim (CuPy caches the binaries)."""

    def __init__(self, cp: Any, kind: int, head_dim: int) -> None:
        self._cp = cp
        self._source = resources.files(__package__).joinpath("_cupy_kernels.cu").read_text()
        self._kind = kind
        self._head_dim = head_dim
        self._modules: Dict[int, Any] = {}
        self._functions: Dict[Tuple[str, int], Any] = {}

    def module(self, rows: int = 1) -> Any:
        if rows not in self._modules:
            options = (f"-DKIND={self._kind}", f"-DHEAD_DIM={self._head_dim}", f"-DROWS={rows}", "-std=c++14")
            self._modules[rows] = self._cp.RawModule(code=self._source, options=options)
        return self._modules[rows]

    def function(self, name: str, rows: int = 1) -> Any:
        key = (name, rows)
        if key not in self._functions:
            self._functions[key] = self.module(rows).get_function(name)
        return self._functions[key]

    def launch(self, name: str, grid: Tuple[int, ...], block: Tuple[int, ...], args: Tuple[Any, ...],
               rows: int = 1) -> None:
        """Launch kernel ``name``; a launch that fails says which kernel and why, in one line."""
        function = self.function(name, rows)
        try:
            function(grid, block, args)
        except self._cp.cuda.driver.CUDADriverError as exc:
            raise RuntimeError(f"CUDA kernel {name} (grid {grid}, block {block}) failed: {exc}") from None


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _splits(span: int, wanted: int) -> Tuple[int, int]:
    """Splits of ``span`` keys and keys per split (a multiple of 32): about ``wanted`` splits,
    none shorter than MIN_SPLIT keys."""
    splits = max(1, min(wanted, MAX_SPLITS, -(-span // MIN_SPLIT)))
    split_len = -(-(-(-span // splits)) // 32) * 32
    return -(-span // split_len), split_len


class CupyCache:
    """A KV cache of one spec in device memory, preallocated for max_positions at open."""

    def __init__(self, backend: "CupyBackend", spec: CacheSpec) -> None:
        cp = backend.cp
        self.spec = spec
        self._backend = backend
        self._cp = cp
        self._kernels = backend.kernels(spec.kv_dtype, spec.head_dim)
        shape = (spec.n_layers, spec.n_kv_heads, spec.max_positions, spec.head_dim)
        scales = shape[:-1] + (spec.head_dim // K.Q8_BLOCK,)
        try:
            if spec.kv_dtype == "q8_0":
                self._k: Optional[Any] = cp.empty(shape, cp.int8)
                self._v: Optional[Any] = cp.empty(shape, cp.int8)
                self._k_scale = cp.empty(scales, cp.float16)
                self._v_scale = cp.empty(scales, cp.float16)
            else:
                dtype = cp.float32 if spec.kv_dtype == "float32" else cp.float16
                self._k, self._v = cp.empty(shape, dtype), cp.empty(shape, dtype)
                self._k_scale = self._v_scale = cp.empty((1,), cp.float16)  # unused by the kernels
        except cp.cuda.memory.OutOfMemoryError as exc:
            self._k = self._v = None
            backend.release_pool()
            raise NotSupported(f"device out of memory allocating the cache: {exc}") from None
        self._rope = K.RopeTable(cp, spec)
        self._lengths = [0] * spec.n_layers
        self._attention = backend.attention
        self._sms = backend.multiprocessors
        # Per-layer views made once: indexing a CuPy array costs microseconds per call.
        self._layers = [self._layer_views(layer) for layer in range(spec.n_layers)]
        self._partials: Optional[Tuple[Any, Any, Any, Any]] = None  # attend_split's scratch, at first use
        # attend_split's arguments that do not change between calls.
        self._fixed = (
            np.int32(spec.max_positions), np.int32(spec.rotary_dim // 2), np.int32(spec.rope.style == "gptj"),
            np.int32(spec.n_heads), np.int32(spec.group_size), np.int32(spec.sliding_window or 0), np.float32(spec.scale), np.float32(spec.softcap or 0.0),
        )

    def _layer_views(self, layer: int) -> Tuple[Any, Any, Any, Any]:
        """K, V and (q8_0) their scales of one layer; the dummy scales of other kinds."""
        assert self._k is not None and self._v is not None
        if self.spec.kv_dtype == "q8_0":
            return self._k[layer], self._v[layer], self._k_scale[layer], self._v_scale[layer]
        return self._k[layer], self._v[layer], self._k_scale, self._v_scale

    # --- checks ---

    def _storage(self) -> Tuple[Any, Any]:
        if self._k is None or self._v is None:
            raise ValueError("the cache is closed")
        return self._k, self._v

    def _as_input(self, name: str, x: Any, heads: int) -> Any:
        cp = self._cp
        if type(x) is cp.ndarray and x.dtype == cp.float32 and x.flags.c_contiguous:
            array = x  # the usual case, kept cheap: a decode step is a few microseconds of work
        else:
            array = cp.ascontiguousarray(cp.asarray(x, dtype=cp.float32))
        C.rows(self.spec, name, array, heads)
        return array

    # --- protocol ---

    def length(self, layer: int) -> int:
        C.layer(self.spec, layer)
        return self._lengths[layer]

    def append(self, layer: int, k: Any, v: Any) -> None:
        k_store, v_store = self._storage()
        spec = self.spec
        k, v, start = C.append_inputs(spec, self._lengths, layer, k, v, self._as_input)
        n = k.shape[0]
        if n == 0:
            return
        cos, sin, rope_row = self._rope.locate(start, start + n)
        k_layer, v_layer, k_scale, v_scale = self._layers[layer]
        rows = n * spec.n_kv_heads
        blocks = min(-(-rows // STORE_ROWS_PER_BLOCK), 65535)
        scales = (k_scale, v_scale) if spec.kv_dtype == "q8_0" else ()
        self._kernels.launch(
            "store_q8" if spec.kv_dtype == "q8_0" else "store_kv", (blocks, 2), (32, STORE_ROWS_PER_BLOCK),
            (k, v, cos, sin, k_layer, v_layer, *scales, _i32(n), _i32(spec.n_kv_heads), _i32(cos.shape[1]),
             _i32(spec.max_positions), _i32(start), _i32(rope_row), _i32(spec.rope.style == "gptj")),
        )
        self._lengths[layer] = start + n

    def attend(self, layer: int, q: Any) -> Any:
        self._storage()
        C.layer(self.spec, layer)
        spec = self.spec
        q = self._as_input("q", q, spec.n_heads)
        length, n_q = self._lengths[layer], q.shape[0]
        C.queries(n_q, length)
        rows = n_q * spec.group_size
        use_kernel = self._attention == "kernel" or (self._attention == "auto" and rows <= MAX_KERNEL_ROWS)
        if use_kernel:
            return self._attend_kernel(layer, q, length)
        return self._attend_blas(layer, q, length)

    def _attend_kernel(self, layer: int, q: Any, length: int) -> Any:
        """Flash-decoding: splits of the visible keys per KV head, merged by log-sum-exp.

        A decode step is a few tens of microseconds of device work, so the host side
        is kept lean: scratch and the kernel's fixed arguments are made once per cache.
        """
        cp, spec = self._cp, self.spec
        n_q, n_kv = q.shape[0], spec.n_kv_heads
        n_rows = n_q * spec.group_size
        block_rows = next((r for r in KERNEL_ROWS if r >= n_rows), KERNEL_ROWS[-1])
        tiles = -(-n_rows // block_rows)
        lo, hi = K.visible_keys(length, n_q, spec.sliding_window)
        splits, split_len = _splits(hi - lo, BLOCKS_PER_SM * self._sms // (n_kv * tiles))
        cos, sin, rope_row = self._rope.locate(length - n_q, length)
        part_acc, part_max, part_sum, done = self._scratch(splits, n_rows, tiles)
        out = cp.empty((n_q, spec.n_heads, spec.head_dim), cp.float32)
        k_layer, v_layer, k_scale, v_scale = self._layers[layer]
        fixed = self._fixed
        self._kernels.launch(
            "attend_split", (splits, n_kv, tiles), (32 * WARPS,),
            (k_layer, v_layer, k_scale, v_scale, q, cos, sin, part_acc, part_max, part_sum, done, out,
             fixed[0], fixed[1], np.int32(rope_row), *fixed[2:5], np.int32(n_rows), np.int32(length - n_q),
             np.int32(lo), np.int32(hi), np.int32(split_len), *fixed[5:]),
            rows=block_rows,
        )
        return out

    def _scratch(self, splits: int, n_rows: int, tiles: int) -> Tuple[Any, Any, Any, Any]:
        """Partial states and counters for a launch: kept for decode-size launches."""
        cp, spec = self._cp, self.spec
        n_kv = spec.n_kv_heads
        if n_rows > KERNEL_ROWS[-1] or self._partials is None:
            made = (
                cp.empty((n_kv * MAX_SPLITS * n_rows * spec.head_dim,), cp.float32),
                cp.empty((n_kv * MAX_SPLITS * n_rows,), cp.float32),
                cp.empty((n_kv * MAX_SPLITS * n_rows,), cp.float32),
                cp.zeros((n_kv * tiles,), cp.uint32),
            )
            if n_rows > KERNEL_ROWS[-1]:
                return made
            self._partials = (  # sized for the most rows a one-tile launch has
                cp.empty((n_kv * MAX_SPLITS * KERNEL_ROWS[-1] * spec.head_dim,), cp.float32),
                cp.empty((n_kv * MAX_SPLITS * KERNEL_ROWS[-1],), cp.float32),
                cp.empty((n_kv * MAX_SPLITS * KERNEL_ROWS[-1],), cp.float32),
                cp.zeros((n_kv,), cp.uint32),
            )
        return self._partials

    def _attend_blas(self, layer: int, q: Any, length: int) -> Any:
        """Chunks: the shared blockwise attention with cuBLAS products on float32 blocks."""
        cp, spec = self._cp, self.spec
        n_q = q.shape[0]
        cos, sin = self._rope.rows(length - n_q, length)
        rotated = K.rotate(cp, q, cos, sin, spec.rope.style, cp.empty_like(q))
        grouped = K.group_queries(cp, rotated, spec.n_kv_heads, spec.scale)
        heads = slice(0, spec.n_kv_heads)

        def load(start: int, stop: int) -> Tuple[Any, Any]:
            return self._decode(layer, heads, start, stop)

        out = K.attend_grouped(cp, grouped, length, load, spec, self._backend.block)
        return K.ungroup_queries(cp, out, n_q)

    def _decode(self, layer: int, heads: slice, start: int, stop: int) -> Tuple[Any, Any]:
        """float32 K and V of those KV heads and positions, (h, stop-start, d)."""
        cp = self._cp
        k_store, v_store = self._storage()
        if self.spec.kv_dtype == "q8_0":
            return tuple(  # type: ignore[return-value]
                K.q8_0_decode(cp, x[layer, heads, start:stop], d[layer, heads, start:stop],
                              cp.empty(x[layer, heads, start:stop].shape, cp.float32))
                for x, d in ((k_store, self._k_scale), (v_store, self._v_scale))
            )
        return (k_store[layer, heads, start:stop].astype(cp.float32, copy=False),
                v_store[layer, heads, start:stop].astype(cp.float32, copy=False))

    def read(self, layer: int, start: int, stop: int) -> Tuple[Any, Any]:
        self._storage()
        C.layer(self.spec, layer)
        length = self._lengths[layer]
        C.read_range(start, stop, length)
        k, v = self._decode(layer, slice(0, self.spec.n_kv_heads), start, stop)
        cp = self._cp
        return (cp.ascontiguousarray(k.transpose(1, 0, 2)), cp.ascontiguousarray(v.transpose(1, 0, 2)))

    def nbytes(self) -> int:
        if self._k is None or self._v is None:
            return 0
        total = self._k.nbytes + self._v.nbytes
        if self.spec.kv_dtype == "q8_0":
            total += self._k_scale.nbytes + self._v_scale.nbytes
        return total

    def close(self) -> None:
        self._k = self._v = self._k_scale = self._v_scale = self._partials = None
        self._layers = []
        self._rope = K.RopeTable(self._cp, self.spec)


class CupyBackend:
    """The "cupy" backend (alias gpu). Options: device (CUDA device index, default 0),
    attention (auto: the flash-decoding kernel for up to MAX_KERNEL_ROWS query rows per
    KV head, matrix products above; kernel or blas forces one), block (keys per block of
    the matrix-product path)."""

    device_aliases = {"gpu": {}}

    name = "cupy"

    def __init__(self, *, device: int = 0, attention: str = "auto", block: int = DEFAULT_BLOCK) -> None:
        self.device_index = _option_int("device", device, 0)
        if attention not in ATTENTION_MODES:
            raise SpecError(f"cupy backend option attention={attention!r}, but should be one of "
                            f"{', '.join(ATTENTION_MODES)}")
        self.attention = attention
        self.block = _option_int("block", block, 1)
        self.cp = cp = _import_cupy()
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no driver, cudaErrorInsufficientDriver, cudaErrorNoDevice, ...
            raise BackendUnavailable(f"no usable CUDA device ({type(exc).__name__}: {exc})") from None
        if count == 0:
            raise BackendUnavailable("no CUDA device is visible")
        if self.device_index >= count:
            raise SpecError(f"cupy backend option device={self.device_index}, but this machine has "
                            f"{count} CUDA device(s): 0..{count - 1}")
        self._device = cp.cuda.Device(self.device_index)
        self._device.use()
        self._properties = cp.cuda.runtime.getDeviceProperties(self.device_index)
        self.multiprocessors = int(self._properties["multiProcessorCount"])
        self._kernels: Dict[Tuple[str, int], _Kernels] = {}
        try:  # compile once now: a CuPy without a working NVRTC is unavailable, not a failure per case
            self.kernels("float32", 128).function("store_kv")
        except Exception as exc:
            first = " ".join(str(exc).split())[:300]
            raise BackendUnavailable(f"CuPy cannot compile CUDA kernels here ({type(exc).__name__}: {first})") from None

    def kernels(self, kv_dtype: str, head_dim: int) -> _Kernels:
        key = (kv_dtype, head_dim)
        if key not in self._kernels:
            self._kernels[key] = _Kernels(self.cp, _KIND[kv_dtype], head_dim)
        return self._kernels[key]

    def release_pool(self) -> None:
        self.cp.get_default_memory_pool().free_all_blocks()

    def info(self) -> BackendInfo:
        cp, props = self.cp, self._properties
        name = props["name"]
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        runtime = cp.cuda.runtime
        versions = {
            "cupy": cp.__version__,
            "cuda runtime": _cuda_version(runtime.runtimeGetVersion()),
            "driver": _cuda_version(runtime.driverGetVersion()),
            "compute capability": f"{props['major']}.{props['minor']}",
        }
        return BackendInfo(
            name=self.name,
            device_kind="gpu",
            device_name=f"{name} (device {self.device_index})",
            vendor="AMD" if getattr(runtime, "is_hip", False) else "NVIDIA",
            versions=versions,
            kv_dtypes=KV_DTYPES,
            max_positions=None,
        )

    def open_cache(self, spec: CacheSpec) -> CupyCache:
        if spec.kv_dtype not in KV_DTYPES:
            raise NotSupported(f"the cupy backend stores {', '.join(KV_DTYPES)}, not {spec.kv_dtype}")
        if spec.head_dim % 16 or spec.head_dim > 256:
            raise NotSupported(f"head_dim={spec.head_dim}: the cupy kernels take multiples of 16 up to 256")
        self._device.use()
        # Compile (or load from CuPy's cache) the kernels this cache will run now, not inside
        # the first timed append or attend.
        kernels = self.kernels(spec.kv_dtype, spec.head_dim)
        kernels.function("store_q8" if spec.kv_dtype == "q8_0" else "store_kv")
        kernels.function("attend_split", next((r for r in KERNEL_ROWS if r >= spec.group_size), KERNEL_ROWS[-1]))
        return CupyCache(self, spec)

    def asarray(self, array: np.ndarray) -> Any:
        return self.cp.asarray(array)

    def to_numpy(self, native: Any) -> np.ndarray:
        return self.cp.asnumpy(native)

    def synchronize(self) -> None:
        self._device.synchronize()

    def memory_in_use(self) -> int:
        """Bytes of live arrays in this process's CuPy pool: every buffer of this backend's
        caches comes from it. Not the driver's device-wide count (total - free): on an H200
        with 8 pytest-xdist workers that charged a 238 MiB q8_0 cache with 1.1 GiB (4.8x) of
        its neighbours' allocations, and 899 MiB "kept" after close."""
        return int(self.cp.get_default_memory_pool().used_bytes())

    def memory_available(self) -> int:
        free, _ = self.cp.cuda.runtime.memGetInfo()
        return int(free + self.cp.get_default_memory_pool().free_bytes())

    def bandwidth(self, nbytes: int = 1 << 30, repeats: int = 10) -> DeviceBandwidth:
        """Device-to-device copy (bytes read + written) and a streaming read, best of ``repeats``."""
        cp = self.cp
        size = min(int(nbytes), self.memory_available() // 8) // 16 * 16
        src = cp.ones(size // 4, cp.float32)
        dst = cp.zeros_like(src)
        partial = cp.zeros(self.multiprocessors * 8, cp.float32)
        read = self.kernels("float32", 128).function("read_sum")
        n4 = np.int64(size // 16)

        copy_s = _best_event_seconds(cp, lambda: cp.copyto(dst, src), repeats)
        read_s = _best_event_seconds(cp, lambda: read((partial.size,), (256,), (src, n4, partial)), repeats)
        return DeviceBandwidth(
            copy_gbps=2 * size / copy_s / 1e9,
            read_gbps=size / read_s / 1e9,
            nbytes=size,
            method="cupy: device-to-device copyto, read_sum kernel (CUDA events)",
        )

    def matmul_flops(self, size: int = 8192, repeats: int = 10) -> Tuple[float, str]:
        """The device's float16 matrix-multiply rate (tensor cores, cuBLAS through CuPy), FLOP/s:
        what longctx-bench reads prefill attention against."""
        cp = self.cp
        size = max(256, min(int(size), int((self.memory_available() // 8 // 6) ** 0.5)) // 256 * 256)
        a = cp.ones((size, size), cp.float16)
        b = cp.ones((size, size), cp.float16)
        out = cp.empty((size, size), cp.float16)
        seconds = _best_event_seconds(cp, lambda: cp.matmul(a, b, out=out), repeats)
        return 2 * size ** 3 / seconds, f"cupy float16 matmul {size}x{size}x{size} (CUDA events), best of {repeats}"


def _best_event_seconds(cp: Any, fn: Any, repeats: int) -> float:
    """Fastest of ``repeats`` calls after a warm-up, timed by CUDA events around each."""
    fn()
    seconds = []
    for _ in range(repeats):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        seconds.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return min(seconds)


def _cuda_version(code: int) -> str:
    """CUDA's integer version (12040) as text (12.4)."""
    return f"{code // 1000}.{code % 1000 // 10}"
