"""The "openvino" backend: the KV-cache contract on OpenVINO (CPU, GPU or NPU plugin).

Two forms (graphs in ``_openvino_graphs``):

- ``form=static`` (the default, on every device: the form an NPU compiler needs,
  and the one whose figures are the plugin's kernels): the cache is a pair of host
  tensors per layer at the compiled size, zero-filled at open; a store model
  rotates fixed chunks of new positions, an attend model takes TAIL query rows,
  the whole cache and the length held, and masks the padding out entirely. The
  compiled size is the cache's limit: an append past it raises
  ContextLimitExceeded and changes nothing.
- ``form=state``: the cache is model state, grown by ReadValue/Concat/Assign, one
  infer request per layer; read back with ``query_state`` and cleared with
  ``reset_state``. Without the fused stateful-SDPA node that OpenVINO GenAI's
  models use, the CPU plugin writes a new buffer of the whole state on every
  call (an append costs O(length)) and keeps a float16 state in float32: the
  suite fails its fill growth and memory, verdicts on this graph rather than on
  how OpenVINO serves a model, so it is not the default.

RoPE runs in the graph, at the engine's inference precision, on cos/sin rows
computed on the host from ``rope_frequencies`` (float64 angles, rounded to
float32 after cos/sin, as every backend here does): the engine's own arithmetic
is what gets certified, while OpenVINO has no float64 to form angles at 16K+
positions without losing ~1e-3 rad (and an NPU none at all).

Precision is never left to the plugin: INFERENCE_PRECISION_HINT (f32 unless
compute=cache) and KV_CACHE_PRECISION/KEY_/VALUE_ (the cache's type) are set
where the device has them, read back from the compiled model and shown by
info(). On a CPU with bf16 instructions the default hint is bf16 and the
default KV cache precision u8, either of which would spoil a certification.

openvino is imported when the backend is constructed; without it the backend is
unavailable with the install command.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from pytest_longctx.errors import BackendUnavailable, NotSupported, SpecError
from pytest_longctx.protocol import BackendInfo
from pytest_longctx.spec import CacheSpec

from . import _checks as C
from . import _openvino_graphs as G
from ._host import cpu_name_and_vendor, one_line
from ._kernels import RopeTable

OPTIONS = ("device", "form", "compute", "threads", "max_positions", "chunk", "align")
DEVICES = ("CPU", "GPU", "NPU")
FORMS = ("state", "static")
COMPUTE = ("float32", "cache")
KV_DTYPES = tuple(G.ELEMENT)
# Positions the static store model rotates per call (the last chunk of an append is padded).
DEFAULT_CHUNK = 256
# Tail positions of an append stored one call each (the one-position model) rather than padded
# to a chunk: a one-position call costs ~0.1 ms on the CPU plugin, a padded 256-row one ~1.5 ms.
ONE_BY_ONE = 8
_ITEM = {"float32": 4, "float16": 2, "bfloat16": 2}


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc}); pip install 'pytest-longctx[openvino]'") from None
    return openvino


def _option_error(key: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"openvino backend option {key}={value!r}, but should be {expected} "
                     f"(accepted keys: {', '.join(OPTIONS)})")


def _positive(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise _option_error(key, value, "a positive integer")


def _why_absent(core: Any, ov: Any, device: str) -> str:
    """What the plugin says when asked for a device it does not list: compiling a one-node model
    makes it load its libraries, so the message names the one that failed."""
    import openvino.opset13 as op

    try:
        x = op.parameter([1], np.float32)
        core.compile_model(ov.Model([op.relu(x)], [x]), device)
    except Exception as exc:  # the plugin's own words are the reason
        text = one_line(exc, 4000)
        found = re.search(r'Cannot load library "([^"]+)": ([^:]+(?:: [^:]+)?)', text)
        if found:
            return f'cannot load library "{found.group(1)}" ({found.group(2).strip()})'
        return one_line(exc)
    return "the plugin compiled a test model but does not list the device"


def _decode(array: np.ndarray, kv_dtype: str) -> np.ndarray:
    """Stored values as a fresh float32 array; OpenVINO hands bf16 tensors over as 16-bit words."""
    if kv_dtype == "bfloat16":
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


class _Cache:
    """What both forms share: checks, RoPE rows, lengths."""

    def __init__(self, backend: "OpenVinoBackend", spec: CacheSpec) -> None:
        self.spec = spec
        self._backend = backend
        self._rope = RopeTable(np, spec) if spec.rotary_dim else None
        self._lengths = [0] * spec.n_layers
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the cache is closed")

    def _as_input(self, name: str, x: Any, heads: int) -> np.ndarray:
        array = np.ascontiguousarray(x, dtype=np.float32)
        C.rows(self.spec, name, array, heads)
        return array

    def _rope_rows(self, name: str, start: int, stop: int, rows: Optional[int] = None) -> Dict[str, np.ndarray]:
        """cos_<name>, sin_<name> of positions start .. stop-1, zero-padded to ``rows``."""
        if self._rope is None:
            return {}
        cos, sin = self._rope.rows(start, stop)
        if rows is not None and rows > cos.shape[0]:
            pad = ((0, rows - cos.shape[0]), (0, 0))
            cos, sin = np.pad(cos, pad), np.pad(sin, pad)
        return {f"cos_{name}": np.ascontiguousarray(cos), f"sin_{name}": np.ascontiguousarray(sin)}

    def length(self, layer: int) -> int:
        C.layer(self.spec, layer)
        return self._lengths[layer]


class StateCache(_Cache):
    """K and V of each layer as the state of that layer's infer request (form=state)."""

    def __init__(self, backend: "OpenVinoBackend", spec: CacheSpec, compiled: Any) -> None:
        super().__init__(backend, spec)
        self._requests: List[Any] = [compiled.create_infer_request() for _ in range(spec.n_layers)]
        half = spec.rotary_dim // 2
        self._no_kv = np.zeros((0, spec.n_kv_heads, spec.head_dim), np.float32)
        self._no_q = np.zeros((0, spec.n_heads, spec.head_dim), np.float32)
        self._no_rope = np.zeros((0, half), np.float32)

    def _run(self, layer: int, k: np.ndarray, v: np.ndarray, q: np.ndarray, start: int) -> np.ndarray:
        inputs: Dict[str, np.ndarray] = {"k": k, "v": v, "q": q}
        if self._rope is not None:
            n, length = k.shape[0], start + k.shape[0]
            inputs.update(self._rope_rows("k", start, start + n) if n else {"cos_k": self._no_rope,
                                                                              "sin_k": self._no_rope})
            inputs.update(self._rope_rows("q", length - q.shape[0], length) if q.shape[0] else
                          {"cos_q": self._no_rope, "sin_q": self._no_rope})
        request = self._requests[layer]
        request.infer(inputs, share_inputs=True)
        return request.get_output_tensor(0).data

    def append(self, layer: int, k: Any, v: Any) -> None:
        self._check_open()
        k, v, start = C.append_inputs(self.spec, self._lengths, layer, k, v, self._as_input)
        if k.shape[0]:
            self._run(layer, k, v, self._no_q, start)
        self._lengths[layer] = start + k.shape[0]

    def attend(self, layer: int, q: Any) -> np.ndarray:
        self._check_open()
        C.layer(self.spec, layer)
        q = self._as_input("q", q, self.spec.n_heads)
        length = self._lengths[layer]
        C.queries(q.shape[0], length)
        return np.array(self._run(layer, self._no_kv, self._no_kv, q, length), np.float32)

    def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        self._check_open()
        C.layer(self.spec, layer)
        C.read_range(start, stop, self._lengths[layer])
        states = {s.name: s for s in self._requests[layer].query_state()}
        out = []
        for name in ("k_cache", "v_cache"):
            if self._lengths[layer] == 0:
                out.append(np.zeros((0, self.spec.n_kv_heads, self.spec.head_dim), np.float32))
                continue
            held = states[name].state.data  # (1, n_kv, length, d)
            out.append(_decode(held[0, :, start:stop].transpose(1, 0, 2), self.spec.kv_dtype))
        return out[0], out[1]

    def nbytes(self) -> int:
        """The state tensors' bytes: positions held x K and V x n_kv x d x the cache type."""
        if self._closed:
            return 0
        return sum(self._lengths) * self.spec.position_bytes() // self.spec.n_layers

    def synchronize(self) -> None:
        for request in self._requests:
            request.wait()

    def close(self) -> None:
        for request in self._requests:
            request.reset_state()
        self._requests = []
        self._closed = True


class StaticCache(_Cache):
    """K and V of each layer in host tensors of the compiled size (form=static)."""

    def __init__(self, backend: "OpenVinoBackend", spec: CacheSpec, compiled_size: int, stores: List[Any],
                 attend: Any) -> None:
        super().__init__(backend, spec)
        ov = backend.ov
        elem = getattr(ov.Type, G.ELEMENT[spec.kv_dtype])
        shape = [1, spec.n_kv_heads, compiled_size, spec.head_dim]
        self.compiled_size = compiled_size
        # Zero-filled: padding is masked out, but 0 x NaN from stale memory would still be NaN.
        self._tensors: List[Tuple[Any, Any]] = []
        for _ in range(spec.n_layers):
            pair = (ov.Tensor(elem, shape), ov.Tensor(elem, shape))
            for tensor in pair:
                tensor.data.view(np.uint8)[...] = 0
            self._tensors.append(pair)
        # One store request per compiled row count (1 and chunk), as NPU pipelines keep a prefill
        # model and a one-token model: a decode-style append does not pay for a padded chunk.
        self._stores = {store.input("k").get_shape()[0]: store.create_infer_request() for store in stores}
        self._chunk = max(self._stores)
        self._attend = attend.create_infer_request()

    def _words(self, tensor: Any) -> np.ndarray:
        """The tensor's memory as a NumPy view with the stored bits (bf16 as uint16)."""
        data = tensor.data
        return data.view(np.uint16) if self.spec.kv_dtype == "bfloat16" else data

    def append(self, layer: int, k: Any, v: Any) -> None:
        self._check_open()
        k, v, start = C.append_inputs(self.spec, self._lengths, layer, k, v, self._as_input)
        n = k.shape[0]
        k_cache, v_cache = (self._words(t)[0] for t in self._tensors[layer])
        a = 0
        while a < n:
            # Whole chunks, then a short tail position by position; a longer tail is one padded chunk.
            rows = self._chunk if n - a >= self._chunk or n - a > ONE_BY_ONE else 1
            b = min(a + rows, n)
            pad = ((0, rows - (b - a)), (0, 0), (0, 0))
            inputs = {"k": np.pad(k[a:b], pad), "v": np.pad(v[a:b], pad)}
            inputs.update(self._rope_rows("k", start + a, start + b, rows))
            store = self._stores[rows]
            store.infer(inputs, share_inputs=True)
            for index, cache in enumerate((k_cache, v_cache)):
                out = store.get_output_tensor(index).data
                cache[:, start + a:start + b] = out.view(cache.dtype)[:, :b - a]
            a = b
        self._lengths[layer] = start + n

    def attend(self, layer: int, q: Any) -> np.ndarray:
        self._check_open()
        C.layer(self.spec, layer)
        q = self._as_input("q", q, self.spec.n_heads)
        length, n_q = self._lengths[layer], q.shape[0]
        if not 1 <= n_q <= min(length, G.TAIL):
            raise ValueError(f"n_q={n_q}, but should be between 1 and min(length {length}, {G.TAIL}: the static "
                             f"attend is compiled for {G.TAIL} query rows)")
        inputs: Dict[str, Any] = {"q": np.pad(q, ((0, G.TAIL - n_q), (0, 0), (0, 0))),
                                  "k_cache": self._tensors[layer][0], "v_cache": self._tensors[layer][1],
                                  "length": np.array([length], np.int64), "n_q": np.array([n_q], np.int64)}
        inputs.update(self._rope_rows("q", length - n_q, length, G.TAIL))
        self._attend.infer(inputs, share_inputs=True)
        return np.array(self._attend.get_output_tensor(0).data[:n_q], np.float32)

    def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        self._check_open()
        C.layer(self.spec, layer)
        C.read_range(start, stop, self._lengths[layer])
        return tuple(_decode(self._words(t)[0][:, start:stop].transpose(1, 0, 2), self.spec.kv_dtype)
                     for t in self._tensors[layer])  # type: ignore[return-value]

    def nbytes(self) -> int:
        """The cache tensors at the compiled size, every layer, allocated at open."""
        if self._closed:
            return 0
        return 2 * self.spec.n_layers * self.spec.n_kv_heads * self.compiled_size * self.spec.head_dim \
            * _ITEM[self.spec.kv_dtype]

    def synchronize(self) -> None:
        for request in (*self._stores.values(), self._attend):
            request.wait()

    def close(self) -> None:
        self._tensors = []
        self._stores, self._attend = {}, None
        self._closed = True


class OpenVinoBackend:
    """The "openvino" backend. Options: device (CPU, GPU or NPU, or an indexed name such as
    GPU.1; default CPU), form (static, the default, or state), compute
    (float32: f32 inference precision hint, default; cache: the hint in the cache's type),
    threads (INFERENCE_NUM_THREADS), and for form=static: max_positions (the compiled size;
    default each spec's own), chunk (positions per store call, default 256), align (the
    compiled size must be a multiple of it, default 1)."""

    # OpenVINO's CPU plugin by default; the "npu" alias reaches it with device=NPU, after rkllm
    # (a backend there by default comes before one that needs options to get there).
    device_aliases = {"npu": {"device": "NPU"}}

    name = "openvino"

    def __init__(self, *, device: str = "CPU", form: Optional[str] = None, compute: str = "float32",
                 threads: Optional[int] = None, max_positions: Optional[int] = None, chunk: int = DEFAULT_CHUNK,
                 align: int = 1) -> None:
        if not isinstance(device, str) or device.partition(".")[0] not in DEVICES:
            raise _option_error("device", device, f"one of {', '.join(DEVICES)} (or an indexed name such as GPU.1)")
        form = form if form is not None else "static"
        if form not in FORMS:
            raise _option_error("form", form, f"one of {', '.join(FORMS)}")
        if compute not in COMPUTE:
            raise _option_error("compute", compute, f"one of {', '.join(COMPUTE)}")
        for key, value in (("threads", threads), ("max_positions", max_positions), ("chunk", chunk),
                           ("align", align)):
            _positive(key, value)
        if form == "state" and max_positions is not None:
            raise _option_error("max_positions", max_positions, "unset with form=state (the state grows; only "
                                "form=static is compiled for a size)")
        if max_positions is not None and max_positions % align:
            raise _option_error("max_positions", max_positions, f"a multiple of align={align}")
        self.ov = _import_openvino()
        self.core = self.ov.Core()
        available = list(self.core.available_devices)
        if not any(d == device or d.partition(".")[0] == device for d in available):
            raise BackendUnavailable(f"openvino {self.ov.get_version()} has no {device} device (available: "
                                     f"{', '.join(available) or 'none'}); {_why_absent(self.core, self.ov, device)}")
        self.device, self.form, self.compute, self.threads = device, form, compute, threads
        self.max_positions, self.chunk, self.align = max_positions, chunk, align
        self._compiled: Dict[Tuple[Any, ...], Any] = {}
        self._precision: Dict[str, Dict[str, str]] = {}  # kv dtype -> what the compiled model reports
        self._executed: Dict[str, Tuple[str, ...]] = {}  # attention kind -> layer types run
        self._kv_dtypes: Optional[Tuple[str, ...]] = None
        self._caches: "weakref.WeakSet[Any]" = weakref.WeakSet()  # open caches, for synchronize()

    # --- compiling ---

    def _config(self, kv_dtype: str, threads: Optional[int] = None) -> Dict[str, Any]:
        """Every precision property the device has, set explicitly, and the threads."""
        elem = G.ELEMENT[kv_dtype]
        wanted = {"INFERENCE_PRECISION_HINT": "f32" if self.compute == "float32" else elem,
                  "KV_CACHE_PRECISION": elem, "KEY_CACHE_PRECISION": elem, "VALUE_CACHE_PRECISION": elem}
        if threads or self.threads:
            wanted["INFERENCE_NUM_THREADS"] = threads or self.threads
        supported = self.core.get_property(self.device, "SUPPORTED_PROPERTIES")
        return {key: value for key, value in wanted.items() if key in supported}

    def _compile(self, key: Tuple[Any, ...], build: Any, kv_dtype: str, threads: Optional[int] = None) -> Any:
        if key not in self._compiled:
            compiled = self.core.compile_model(build(), self.device, self._config(kv_dtype, threads))
            readback = {}
            for name in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION"):
                try:
                    value = compiled.get_property(name)
                    readback[name] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
                except Exception:  # the device does not have it
                    readback[name] = "n/a on this device"
            self._precision[kv_dtype] = readback
            self._compiled[key] = compiled
        return self._compiled[key]

    def kv_dtypes(self) -> Tuple[str, ...]:
        """The cache types this device compiles the model for (a tiny model each, once)."""
        if self._kv_dtypes is None:
            supported = []
            for dtype in KV_DTYPES:
                probe = CacheSpec(1, 2, 1, 8, 8, kv_dtype=dtype)
                try:
                    self._models(probe)
                    supported.append(dtype)
                except Exception:
                    continue
            self._kv_dtypes = tuple(supported)
        return self._kv_dtypes

    def _models(self, spec: CacheSpec, size: Optional[int] = None) -> Tuple[Any, ...]:
        config = G.GraphConfig.of(spec)
        if self.form == "state":
            compiled = (self._compile(("state", config), lambda: G.state_model(config), spec.kv_dtype),)
        else:
            size = size or spec.max_positions
            # A store is a few small products: on one thread, with no pool to wake, its time is
            # steady (on the CPU plugin, 2 busy cores: p90 0.13 ms against 3.5 ms on the pool).
            stores = tuple(self._compile(("store", config, rows), lambda rows=rows: G.store_model(config, rows),
                                         spec.kv_dtype, threads=1 if self.device == "CPU" else None)
                           for rows in sorted({1, self.chunk}))
            compiled = (*stores, self._compile(("attend", config, size), lambda: G.attend_model(config, size),
                                               spec.kv_dtype))
        self._executed[config.attention] = G.executed_attention(compiled[-1])
        return compiled

    # --- protocol ---

    def info(self) -> BackendInfo:
        name, vendor = cpu_name_and_vendor()
        device_name = name
        try:
            device_name = str(self.core.get_property(self.device, "FULL_DEVICE_NAME"))
        except Exception:
            pass
        kv_dtypes = self.kv_dtypes()
        hint = "f32" if self.compute == "float32" else "the cache's type"
        precision = "; ".join(f"{dtype}: " + ", ".join(f"{k}={v}" for k, v in self._precision[dtype].items())
                              for dtype in kv_dtypes if dtype in self._precision)
        executed = "; ".join(f"{kind} -> runs {'+'.join(types) or 'fused'}" for kind, types in self._executed.items())
        return BackendInfo(
            name=self.name,
            device_kind=self.device_kind,
            device_name=f"{self.device} ({device_name})",
            vendor=vendor if self.device == "CPU" else "Intel",
            versions={"openvino": self.ov.get_version(), "device": self.device, "form": self.form,
                      "compute": f"{self.compute} (INFERENCE_PRECISION_HINT={hint})",
                      "precision": precision,
                      "attention": executed,
                      "rope": "in the graph, host cos/sin rows (float64 angles, float32 rows)"},
            kv_dtypes=kv_dtypes,
            max_positions=self.max_positions,
        )

    @property
    def device_kind(self) -> str:
        return {"CPU": "cpu", "GPU": "gpu", "NPU": "npu"}[self.device.partition(".")[0]]

    def open_cache(self, spec: CacheSpec) -> Any:
        if spec.kv_dtype not in KV_DTYPES:
            raise NotSupported(f"the openvino backend holds {', '.join(KV_DTYPES)} caches, not {spec.kv_dtype} "
                               f"(OpenVINO's u8/u4 KV caches are its own per-token formats, not the contract's "
                               f"block formats)")
        if self.form == "static":
            return self._open_static(spec)
        try:
            (compiled,) = self._models(spec)
        except Exception as exc:
            raise NotSupported(f"openvino {self.device} cannot compile the state model for {spec.describe()} "
                               f"{spec.kv_dtype}: {one_line(exc)}") from None
        return self._track(StateCache(self, spec, compiled))

    def _open_static(self, spec: CacheSpec) -> StaticCache:
        size = self.max_positions or spec.max_positions
        if spec.max_positions > size:
            raise NotSupported(f"the static model is compiled for {size} positions (max_positions={size}), "
                               f"not {spec.max_positions}")
        if size % self.align:
            raise NotSupported(f"static size {size} is not a multiple of align={self.align}, which "
                               f"{self.device} was said to need")
        needed = 2 * spec.n_layers * spec.n_kv_heads * size * spec.head_dim * _ITEM[spec.kv_dtype]
        import psutil

        free = psutil.virtual_memory().available
        if needed > free:
            raise NotSupported(f"the static cache at {size} positions needs {needed} bytes, "
                               f"but {free} are available")
        try:
            *stores, attend = self._models(spec, size)
        except Exception as exc:
            raise NotSupported(f"openvino {self.device} cannot compile the static models at {size} positions "
                               f"for {spec.describe()} {spec.kv_dtype}: {one_line(exc)}") from None
        return self._track(StaticCache(self, spec, size, stores, attend))

    def _track(self, cache: Any) -> Any:
        self._caches.add(cache)
        return cache

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def to_numpy(self, native: Any) -> np.ndarray:
        return np.asarray(native)

    def synchronize(self) -> None:
        """Wait on every open cache's infer requests (infer() itself returns when done)."""
        for cache in list(self._caches):
            if not cache._closed:
                cache.synchronize()

    def memory_in_use(self) -> Optional[int]:
        """None on the CPU (the suite reads RSS). On a GPU, the plugin's own count of what this
        process allocated (GPU_MEMORY_STATISTICS), when it reports one."""
        if self.device_kind != "gpu":
            return None
        try:
            stats = self.core.get_property(self.device, "GPU_MEMORY_STATISTICS")
            return int(sum(int(v) for v in dict(stats).values()))
        except Exception:
            return None
