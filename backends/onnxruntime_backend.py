"""The "onnxruntime" backend: a KV cache run by ONNX Runtime's GroupQueryAttention.

The cache is what ONNX Runtime's own generate loop keeps: K and V buffers of
(1, n_kv_heads, max_positions, head_dim) per layer in the execution provider's
memory, bound with IOBinding as both past_key/past_value and present_key/
present_value of a one-node GroupQueryAttention model (domain com.microsoft),
so the op writes new positions in place and nothing else is copied. RoPE is
the op's own (do_rotary with cos/sin caches built here from the contract's
frequencies, the attention factor folded in; rotary_interleaved for gptj),
the sliding window is local_window_size, softcap and scale are attributes.

The op appends K/V only together with a query, and the contract separates the
two, which costs:

- append runs the op in its first-prompt form on a view that starts at the
  write position (``OnnxRuntimeCache._store``): one call per layer and step of
  ``APPEND_STEP`` positions, whose zero queries attend over the positions
  being written only; and
- attend runs the op on the whole layer with the past length set to
  length - n_q and, as new K/V, the pre-RoPE K/V of the last n_q positions,
  which the op rotates and writes again with the same values. So each layer
  keeps the pre-RoPE K/V of its last ``TAIL`` positions on the host (``TAIL``
  positions x 2 x n_kv_heads x head_dim values), and attend takes at most
  ``TAIL`` queries.

onnxruntime and onnx are imported when the backend is constructed, so that
listing the built-ins imports nothing heavy; without them the backend is
unavailable, with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from pytest_longctx.errors import BackendUnavailable, NotSupported, SpecError
from pytest_longctx.protocol import BackendInfo
from pytest_longctx.rope import rope_frequencies
from pytest_longctx.spec import CacheSpec

from . import _checks as C
from ._host import cpu_name, one_line

OPTIONS = ("ep", "compute", "threads", "device_id")
# What the op's T (query, key, value, cos/sin, output) is: the cache's type, as in a model
# exported in that precision, or float32 beside a half-precision cache (T_CACHE != T).
COMPUTE = ("cache", "float32")
KV_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_EP = "CPUExecutionProvider"
# Pre-RoPE positions kept per layer for attend (the suite asks for up to 16 queries).
TAIL = 16
# Positions per op call of an append: a store attends its zero queries over the positions
# it writes (n^2 per KV head), so long appends go in steps; 64 was among the fastest per
# position of 16..512 for qwen3-0.6b's heads on the CPU provider (a noisy, shared machine).
APPEND_STEP = 64

# Device kind and OrtValue device of each execution provider this backend knows.
# Providers whose inputs and outputs live in host memory use "cpu" buffers.
_PROVIDERS: Dict[str, Tuple[str, str]] = {
    "CPUExecutionProvider": ("cpu", "cpu"),
    "DnnlExecutionProvider": ("cpu", "cpu"),
    "XnnpackExecutionProvider": ("cpu", "cpu"),
    "CUDAExecutionProvider": ("gpu", "cuda"),
    "TensorrtExecutionProvider": ("gpu", "cuda"),
    "NvTensorRTRTXExecutionProvider": ("gpu", "cuda"),
    "ROCMExecutionProvider": ("gpu", "cuda"),
    "MIGraphXExecutionProvider": ("gpu", "cuda"),
    "DmlExecutionProvider": ("gpu", "dml"),
    "WebGpuExecutionProvider": ("gpu", "webgpu"),
    "CoreMLExecutionProvider": ("npu", "cpu"),
    "QNNExecutionProvider": ("npu", "cpu"),
    "VitisAIExecutionProvider": ("npu", "cpu"),
    "OpenVINOExecutionProvider": ("npu", "cpu"),
    "RknpuExecutionProvider": ("npu", "cpu"),
    "NnapiExecutionProvider": ("npu", "cpu"),
}

# NumPy storage and ONNX element type of each kv dtype (bfloat16 as its bits).
_STORAGE = {"float32": (np.float32, 1), "float16": (np.float16, 10), "bfloat16": (np.uint16, 16)}


def _decode(stored: np.ndarray) -> np.ndarray:
    """Stored values as a fresh float32 array; uint16 storage holds bfloat16 bits."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def _import_ort() -> Tuple[Any, Any]:
    """onnxruntime and onnx, or BackendUnavailable naming what is missing."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            f"onnxruntime is not installed ({exc}); pip install 'pytest-longctx[onnxruntime]'"
        ) from None
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailable(f"onnx is not installed ({exc}); pip install 'pytest-longctx[onnxruntime]'") from None
    return onnxruntime, onnx


@dataclass(frozen=True)
class OpConfig:
    """What one GroupQueryAttention session is built for: one per distinct config."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int  # 0: no rotary inputs
    interleaved: bool
    window: int  # local_window_size, -1 for none
    softcap: float
    scale: float
    kv_dtype: str  # the cache's type (the op's T_CACHE)
    io_dtype: str  # query, key, value, cos/sin caches and output (the op's T)

    @classmethod
    def of(cls, spec: CacheSpec, compute: str) -> "OpConfig":
        return cls(spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.rotary_dim, spec.rope.style == "gptj",
                   spec.sliding_window or -1, float(spec.softcap or 0.0), float(spec.scale), spec.kv_dtype,
                   spec.kv_dtype if compute == "cache" else "float32")


def build_model(onnx: Any, config: OpConfig) -> bytes:
    """The one-node model: query, key, value, the shared past buffers, lengths, cos/sin caches."""
    helper, proto = onnx.helper, onnx.TensorProto
    types = {"float32": proto.FLOAT, "float16": proto.FLOAT16, "bfloat16": proto.BFLOAT16}
    elem, cache = types[config.io_dtype], types[config.kv_dtype]
    h, kv, d = config.n_heads, config.n_kv_heads, config.head_dim
    inputs = [
        helper.make_tensor_value_info("query", elem, ["B", "S", h * d]),
        helper.make_tensor_value_info("key", elem, ["B", "S", kv * d]),
        helper.make_tensor_value_info("value", elem, ["B", "S", kv * d]),
        helper.make_tensor_value_info("past_key", cache, ["B", kv, "M", d]),
        helper.make_tensor_value_info("past_value", cache, ["B", kv, "M", d]),
        helper.make_tensor_value_info("seqlens_k", proto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", proto.INT32, []),
    ]
    names = [i.name for i in inputs]
    if config.rotary_dim:
        for name in ("cos_cache", "sin_cache"):
            inputs.append(helper.make_tensor_value_info(name, elem, ["R", config.rotary_dim // 2]))
            names.append(name)
    outputs = [
        helper.make_tensor_value_info("output", elem, ["B", "S", h * d]),
        helper.make_tensor_value_info("present_key", cache, ["B", kv, "M", d]),
        helper.make_tensor_value_info("present_value", cache, ["B", kv, "M", d]),
    ]
    node = helper.make_node(
        "GroupQueryAttention", names, [o.name for o in outputs], domain="com.microsoft",
        num_heads=h, kv_num_heads=kv, do_rotary=int(config.rotary_dim > 0),
        rotary_interleaved=int(config.interleaved), local_window_size=config.window,
        softcap=config.softcap, scale=config.scale,
    )
    graph = helper.make_graph([node], "longctx_gqa", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases older than this onnx
    return model.SerializeToString()


def rope_caches(spec: CacheSpec, dtype: Any) -> Tuple[np.ndarray, np.ndarray]:
    """cos/sin(pos * inv_freq) * attention_factor for every position, in float64, then cast.

    The op indexes them by absolute position, so they cover max_positions.
    """
    freqs = rope_frequencies(spec)
    angles = np.arange(spec.max_positions, dtype=np.float64)[:, None] * freqs.inv_freq[None, :]
    cos = np.cos(angles) * freqs.attention_factor
    sin = np.sin(angles) * freqs.attention_factor
    return np.ascontiguousarray(cos.astype(dtype)), np.ascontiguousarray(sin.astype(dtype))


class OnnxRuntimeCache:
    """A KV cache of one spec: K and V of every layer in one buffer that the op updates in place.

    Layout: K of layer 0..L-1, then V of layer 0..L-1, each (n_kv_heads,
    max_positions, head_dim) as the op's BNSH past/present with batch 1, then
    one (max_positions, head_dim) slack block (see ``_view``). Views into it
    are bound by pointer, so nothing is copied between calls.
    """

    def __init__(self, backend: "OnnxRuntimeBackend", spec: CacheSpec, sessions: Tuple[Any, Any],
                 io_dtype: str, in_place: bool) -> None:
        self.spec = spec
        self._in_place = in_place
        self._ort = backend._ort
        self._append_session, self._attend_session = sessions
        self._device, self._device_id = backend.memory_device, backend.device_id
        storage, self._onnx_type = _STORAGE[spec.kv_dtype]
        self._item = np.dtype(storage).itemsize
        self._layer_values = spec.n_kv_heads * spec.max_positions * spec.head_dim
        size = 2 * spec.n_layers * self._layer_values + spec.max_positions * spec.head_dim
        self._host: Optional[np.ndarray] = None
        if self._device == "cpu":
            # NumPy memory: tracemalloc sees it at open, its pages are touched as positions are
            # written, and read() slices it.
            self._host = np.empty(size, storage)
            self._buffer = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(self._host, self._onnx_type)
        elif spec.kv_dtype == "bfloat16":
            raise NotSupported(f"a bfloat16 cache in {self._device} memory: NumPy has no bfloat16 to allocate it")
        else:
            self._buffer = self._ort.OrtValue.ortvalue_from_shape_and_type([size], storage, self._device,
                                                                           self._device_id)
        self._ptr = self._buffer.data_ptr()
        io = _STORAGE[io_dtype][0]
        self._io, self._io_type = io, _STORAGE[io_dtype][1]
        self._io_item = np.dtype(io).itemsize
        self._rope: Optional[Tuple[Any, Any]] = None
        if spec.rotary_dim:
            self._rope = tuple(self._device_value(table) for table in rope_caches(spec, io))
        group = spec.n_heads // spec.n_kv_heads
        self._zeros = np.zeros((spec.n_kv_heads, APPEND_STEP, group * spec.head_dim), io)
        empty = np.zeros((0, spec.n_kv_heads, spec.head_dim), io)
        self._tails: List[Tuple[np.ndarray, np.ndarray]] = [(empty, empty)] * spec.n_layers
        self._lengths = [0] * spec.n_layers
        self._closed = False

    def _device_value(self, array: np.ndarray) -> Any:
        """A copy of a host array where the provider keeps its tensors."""
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, self._device,
                                                                self._device_id)
        value.update_inplace(array)
        return value

    # --- checks ---

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the cache is closed")

    def _as_input(self, name: str, x: Any, heads: int) -> np.ndarray:
        array = np.asarray(x)
        C.rows(self.spec, name, array, heads)
        return np.ascontiguousarray(array, dtype=self._io)

    # --- the op ---

    def _offset(self, tensor: int, layer: int, position: int = 0) -> int:
        """Byte offset of (K=0/V=1, layer, head 0, position) in the buffer."""
        return ((tensor * self.spec.n_layers + layer) * self._layer_values
                + position * self.spec.head_dim) * self._item

    def _bind_cache(self, binding: Any, shape: List[int], layer: int, position: int) -> None:
        """past_key/past_value and present_key/present_value: the same view of K and V."""
        for tensor, (past, present) in enumerate((("past_key", "present_key"), ("past_value", "present_value"))):
            ptr = self._ptr + self._offset(tensor, layer, position)
            binding.bind_input(past, self._device, self._device_id, self._onnx_type, shape, ptr)
            binding.bind_output(present, self._device, self._device_id, self._onnx_type, shape, ptr)

    def _bind_io(self, binding: Any, name: str, array: np.ndarray) -> None:
        if array.dtype != np.uint16:  # NumPy knows the type
            binding.bind_cpu_input(name, array)
        else:
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, self._io_type))

    def _store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v (n, n_kv, d) at positions start .. start+n-1 of one layer.

        The op runs in its first-prompt form (no past) on a view that begins at
        position ``start``, with the cos/sin caches offset by ``start`` rows, so
        it rotates and writes the new positions without attending over the
        cache. Each KV head is one batch entry (kv_num_heads=1, batch stride
        max_positions x head_dim); the view of the last layer's V runs up to
        start x head_dim values past it, into the slack block, which the op
        never touches (it writes rows 0 .. n-1 of each entry). The zero query's
        attention over the n new positions is the only wasted work.

        Where the op would touch rows past the new ones (``_stores_in_place``),
        the store is the op on the whole layer with past = start and a zero
        query instead, which also attends over the whole cache.
        """
        spec, n = self.spec, k.shape[0]
        if not self._in_place:
            self._attend(layer, start, np.zeros((n, spec.n_heads, spec.head_dim), self._io), k, v)
            return
        kv, d = spec.n_kv_heads, spec.head_dim
        binding = self._append_session.io_binding()
        self._bind_io(binding, "query", self._zeros[:, :n])
        self._bind_io(binding, "key", np.ascontiguousarray(k.transpose(1, 0, 2)))
        self._bind_io(binding, "value", np.ascontiguousarray(v.transpose(1, 0, 2)))
        self._bind_cache(binding, [kv, 1, spec.max_positions, d], layer, start)
        binding.bind_cpu_input("seqlens_k", np.full(kv, n - 1, np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(n, np.int32))
        if self._rope is not None:
            half = spec.rotary_dim // 2
            for name, table in zip(("cos_cache", "sin_cache"), self._rope):
                binding.bind_input(name, self._device, self._device_id, self._io_type,
                                   [spec.max_positions - start, half], table.data_ptr() + start * half * self._io_item)
        binding.bind_output("output", "cpu")
        self._append_session.run_with_iobinding(binding)

    def _attend(self, layer: int, past: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The op on the whole layer: queries and k, v (n, ...) at positions past .. past+n-1."""
        spec, n = self.spec, k.shape[0]
        binding = self._attend_session.io_binding()
        binding.bind_output("output", "cpu")  # first: get_outputs() lists outputs in binding order
        self._bind_io(binding, "query", q.reshape(1, n, -1))
        self._bind_io(binding, "key", k.reshape(1, n, -1))
        self._bind_io(binding, "value", v.reshape(1, n, -1))
        self._bind_cache(binding, [1, spec.n_kv_heads, spec.max_positions, spec.head_dim], layer, 0)
        binding.bind_cpu_input("seqlens_k", np.array([past + n - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(past + n, np.int32))
        if self._rope is not None:
            binding.bind_ortvalue_input("cos_cache", self._rope[0])
            binding.bind_ortvalue_input("sin_cache", self._rope[1])
        self._attend_session.run_with_iobinding(binding)
        return _decode(binding.get_outputs()[0].numpy())

    # --- protocol ---

    def length(self, layer: int) -> int:
        C.layer(self.spec, layer)
        return self._lengths[layer]

    def append(self, layer: int, k: Any, v: Any) -> None:
        self._check_open()
        spec = self.spec
        k, v, start = C.append_inputs(spec, self._lengths, layer, k, v, self._as_input)
        n = k.shape[0]
        for a in range(0, n, APPEND_STEP):
            b = min(a + APPEND_STEP, n)
            self._store(layer, start + a, k[a:b], v[a:b])
            self._lengths[layer] = start + b
        tail_k, tail_v = self._tails[layer]
        self._tails[layer] = (np.concatenate([tail_k, k[-TAIL:]])[-TAIL:],
                              np.concatenate([tail_v, v[-TAIL:]])[-TAIL:])

    def attend(self, layer: int, q: Any) -> np.ndarray:
        """The op over the whole layer with past = length - n_q: the last n_q positions go in
        again as new K/V (pre-RoPE, from the tail) and are rewritten with the same values."""
        self._check_open()
        C.layer(self.spec, layer)
        spec = self.spec
        q = self._as_input("q", q, spec.n_heads)
        length, n_q = self._lengths[layer], q.shape[0]
        if not 1 <= n_q <= min(length, TAIL):
            raise ValueError(f"n_q={n_q}, but should be between 1 and min(length {length}, {TAIL} kept pre-RoPE)")
        tail_k, tail_v = self._tails[layer]
        out = self._attend(layer, length - n_q, q, tail_k[-n_q:], tail_v[-n_q:])
        return out.reshape(n_q, spec.n_heads, spec.head_dim)

    def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        self._check_open()
        C.layer(self.spec, layer)
        length = self._lengths[layer]
        C.read_range(start, stop, length)
        spec = self.spec
        shape = (spec.n_kv_heads, spec.max_positions, spec.head_dim)
        out = []
        for tensor in (0, 1):
            first = self._offset(tensor, layer) // self._item
            layer_values = self._stored()[first:first + self._layer_values].reshape(shape)
            out.append(_decode(layer_values[:, start:stop].transpose(1, 0, 2)))
        return out[0], out[1]

    def _stored(self) -> np.ndarray:
        """The buffer as NumPy: the host buffer itself, or a device buffer copied whole (slow; see docs/backends/onnxruntime.md)."""
        if self._host is not None:
            return self._host
        return self._buffer.numpy()

    def nbytes(self) -> int:
        """Bytes of the buffer bound to the op, slack block included."""
        if self._closed:
            return 0
        return (2 * self.spec.n_layers * self._layer_values + self.spec.max_positions * self.spec.head_dim) * self._item

    def close(self) -> None:
        self._buffer = self._host = self._rope = None
        self._tails = []
        self._closed = True


def _stores_in_place(backend: "OnnxRuntimeBackend", spec: CacheSpec, sessions: Tuple[Any, Any],
                     io_dtype: str) -> bool:
    """Whether the op, run on a view that starts at the write position, writes only the new
    rows of each batch entry (as the float32 and float16 CPU kernels do; with float32 inputs
    beside a float16 cache, ONNX Runtime 1.32's CPU kernel zeroes every row past the new
    length instead). Checked on a small cache of the same config filled with ones."""
    probe = OnnxRuntimeCache(backend, spec.replace(n_layers=1, max_positions=8), sessions, io_dtype, True)
    try:
        ones = np.ones(probe._buffer.shape(), probe._host.dtype if probe._host is not None else np.float32)
        if probe._host is not None:
            probe._host[...] = ones.astype(probe._host.dtype) if probe._host.dtype != np.uint16 else 0x3F80
        else:
            probe._buffer.update_inplace(ones.astype(_STORAGE[spec.kv_dtype][0]))
        zeros = np.zeros((2, spec.n_kv_heads, spec.head_dim), np.float32)
        probe.append(0, zeros, zeros)
        probe.append(0, zeros, zeros)
        stored = _decode(probe._stored())
        kv = stored[:2 * probe._layer_values].reshape(2, spec.n_kv_heads, 8, spec.head_dim)
        return bool(np.all(kv[:, :, :4] == 0) and np.all(kv[:, :, 4:] == 1)
                    and np.all(stored[2 * probe._layer_values:] == 1))
    except Exception:
        return False
    finally:
        probe.close()


def _option_error(key: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"onnxruntime backend option {key}={value!r}, but should be {expected} "
                     f"(accepted keys: {', '.join(OPTIONS)})")


class OnnxRuntimeBackend:
    """The "onnxruntime" backend. Options: ep (execution provider, default
    CPUExecutionProvider), compute (cache: the op's inputs and output in the
    cache's type, default; float32: float32 beside a half-precision cache),
    threads (intra-op threads; default ONNX Runtime's), device_id (for device
    providers, default 0)."""

    name = "onnxruntime"

    def __init__(self, *, ep: str = DEFAULT_EP, compute: str = "cache", threads: Optional[int] = None,
                 device_id: int = 0) -> None:
        if not isinstance(ep, str) or not ep.endswith("ExecutionProvider"):
            raise _option_error("ep", ep, "an execution provider name such as CPUExecutionProvider")
        if compute not in COMPUTE:
            raise _option_error("compute", compute, f"one of {', '.join(COMPUTE)}")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise _option_error("threads", threads, "a positive integer")
        if not isinstance(device_id, int) or isinstance(device_id, bool) or device_id < 0:
            raise _option_error("device_id", device_id, "a non-negative integer")
        self._ort, self._onnx = _import_ort()
        available = self._ort.get_available_providers()
        if ep not in available:
            raise BackendUnavailable(
                f"onnxruntime {self._ort.__version__} has no {ep} (installed: {', '.join(available)}); "
                f"install the onnxruntime package built with it"
            )
        self.ep, self.compute, self.threads, self.device_id = ep, compute, threads, device_id
        self.device_kind, self.memory_device = _PROVIDERS.get(ep, ("gpu", "cpu"))
        self._sessions: Dict[Tuple[OpConfig, Optional[int]], Any] = {}
        self._kv_dtypes: Optional[Tuple[str, ...]] = None
        self._in_place: Dict[OpConfig, bool] = {}

    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            device_kind=self.device_kind,
            device_name=self.ep if self.device_kind != "cpu" else f"{self.ep} ({cpu_name()})",
            vendor="",
            versions={"onnxruntime": self._ort.__version__, "onnx": self._onnx.__version__, "ep": self.ep,
                      "compute": self.compute},
            kv_dtypes=self.kv_dtypes(),
            max_positions=None,
        )

    def kv_dtypes(self) -> Tuple[str, ...]:
        """The cache types this provider builds the op for (a small probe session each, once)."""
        if self._kv_dtypes is None:
            supported = []
            for dtype in KV_DTYPES:
                io = dtype if self.compute == "cache" else "float32"
                probe = OpConfig(2, 1, 8, 8, False, -1, 0.0, 8 ** -0.5, dtype, io)
                with contextlib.suppress(Exception):
                    self._session(probe)
                    supported.append(dtype)
            self._kv_dtypes = tuple(supported)
        return self._kv_dtypes

    def _session(self, config: OpConfig, threads: Optional[int] = None) -> Any:
        """One session per op config (and thread count), shared by every cache and layer of that config."""
        threads = threads or self.threads
        if (config, threads) not in self._sessions:
            options = self._ort.SessionOptions()
            # Scratch is freed after each run instead of kept in an arena: memory stays what the cache holds.
            options.enable_cpu_mem_arena = False
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
            provider_options = [{"device_id": str(self.device_id)}] if self.memory_device != "cpu" else None
            self._sessions[(config, threads)] = self._ort.InferenceSession(
                build_model(self._onnx, config), options, providers=[self.ep], provider_options=provider_options)
        return self._sessions[(config, threads)]

    def open_cache(self, spec: CacheSpec) -> OnnxRuntimeCache:
        if spec.kv_dtype not in KV_DTYPES:
            raise NotSupported(f"the onnxruntime backend binds {', '.join(KV_DTYPES)} caches ({', '.join(self.kv_dtypes())} "
                               f"on {self.ep}), not {spec.kv_dtype} "
                               f"(GroupQueryAttention's int8/int4/fp8 caches use per-tensor or per-channel scales, "
                               f"not the contract's block formats)")
        config = OpConfig.of(spec, self.compute)
        # The store runs one KV head per batch entry, no window, softcap or scale to honour.
        store = dataclasses.replace(config, n_heads=spec.group_size, n_kv_heads=1, window=-1, softcap=0.0)
        if config.io_dtype == "bfloat16":
            raise NotSupported("bfloat16 queries and outputs cannot be passed from NumPy; "
                               "onnxruntime[compute=float32] keeps a bfloat16 cache with float32 inputs")
        try:
            # A store is a few small products per KV head: one thread, no pool to wake or spin.
            sessions = (self._session(store, threads=1), self._session(config))
        except Exception as exc:  # an old onnxruntime without the op or an attribute, or a provider refusal
            raise NotSupported(f"onnxruntime {self._ort.__version__} {self.ep} cannot build GroupQueryAttention "
                               f"for {spec.describe()} {spec.kv_dtype}: {one_line(exc)}") from None
        if config not in self._in_place:
            self._in_place[config] = _stores_in_place(self, spec, sessions, config.io_dtype)
        return OnnxRuntimeCache(self, spec, sessions, config.io_dtype, self._in_place[config])

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def to_numpy(self, native: Any) -> np.ndarray:
        return np.asarray(native)

    def synchronize(self) -> None:
        return None  # run_with_iobinding returns once the outputs are ready

    def memory_in_use(self) -> Optional[int]:
        if self.memory_device == "cpu":
            return None
        return _nvml_used(self.device_id) if self.memory_device == "cuda" else None




def _nvml_used(device_id: int) -> Optional[int]:
    """Device memory in use by NVML, when pynvml is installed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_id)).used)
    except Exception:
        return None
