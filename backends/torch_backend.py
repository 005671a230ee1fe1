"""The PyTorch backend: a KV cache in torch tensors on any device torch drives.

Each layer stores K (rotated) and V as (n_kv_heads, max_positions, head_dim) in
float32, float16, bfloat16 or float8_e4m3fn (with a per-tensor float32 scale per
layer, K and V: stored = e4m3(clamp(x / scale, +-448)), read = e4m3 x scale; the
scale is 1.0, as an engine without calibrated scales runs, which is also what the
suite's fp8_e4m3 yardstick holds), allocated whole at open.

RoPE is computed as engines compute it, in float32 throughout: transformers'
``1 / base ** (arange(0, d, 2) / d)`` in float32 for the default, linear and
dynamic kinds (the others: the normative frequencies rounded to float32, as their
float32 formulas give within a few ulp), float32 position x frequency, float32
cos and sin. The suite's yardstick (reference.plain.FREQ_ULPS) covers that.

Attention runs in float32 over the stored K and V (cast up per call) through
``scaled_dot_product_attention``: the query heads of one KV head are packed as
rows of one batch entry (GQA without copying K), a decode step slices the visible
keys and needs no mask, a chunk gets an explicit bottom-right causal (and window)
mask, since SDPA's ``is_causal`` aligns the mask top-left. Softcapping has no SDPA
form; it runs in a blockwise float32 math fallback (online softmax over key
blocks). FlexAttention is not used: the key length changes every call, so its
compiled kernels would recompile per step, and on the CPU it needs a C++ compiler.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from pytest_longctx.errors import BackendUnavailable, NotSupported, SpecError
from pytest_longctx.protocol import BackendInfo, DeviceBandwidth
from pytest_longctx.rope import rope_frequencies
from pytest_longctx.spec import CacheSpec

from . import _checks as C
from ._host import available_cores, cpu_name_and_vendor, one_line

KV_DTYPES = ("float32", "float16", "bfloat16", "fp8_e4m3")
_TORCH_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp8_e4m3": "float8_e4m3fn"}
FP8_MAX = 448.0
ACCELERATORS = ("cuda", "xpu", "mps")
# Query positions per SDPA call in a chunk: bounds the mask and the scores a math kernel makes.
QUERY_BLOCK = 128
# Keys per block of the softcap fallback: bounds its float32 scores.
KEY_BLOCK = 8192
# Query rows per KV head (queries x group) up to which an accelerator attends by matmuls
# rather than SDPA (see _matmul_attention): a decode step or a short verify chunk.
DECODE_ROWS = 16
SPLIT_KEYS = 1024


def _import_torch() -> Any:
    try:
        import torch
    except Exception as exc:  # ImportError, or a CUDA library that fails to load at import
        raise BackendUnavailable(
            f"torch is not importable ({type(exc).__name__}: {one_line(exc, 200)}); install it with "
            "pip install 'pytest-longctx[torch]' (or a build for your device from pytorch.org)"
        ) from None
    return torch


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"torch backend option {name}={value!r}, but should be a positive integer")
    return value


def _device_module(torch: Any, kind: str) -> Any:
    """torch.cuda, torch.xpu or torch.mps: what synchronizes and counts memory on that device."""
    return getattr(torch, kind, None)


def _devices_here(torch: Any) -> str:
    """The devices this torch build can use here, for messages: "cpu, cuda:0, cuda:1"."""
    found = ["cpu"]
    for kind in ("cuda", "xpu"):
        module = _device_module(torch, kind)
        try:
            if module is not None and module.is_available():
                found += [f"{kind}:{i}" for i in range(module.device_count())]
        except Exception:
            pass
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return ", ".join(found)


def _build(torch: Any) -> str:
    """What devices the build was made for: "CUDA 12.8", "ROCm 6.3", "CPU-only"."""
    hip = getattr(torch.version, "hip", None)
    if hip:
        return f"ROCm {hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU-only"


def resolve_device(torch: Any, device: Any) -> Any:
    """The torch.device asked for, checked against what this build and machine have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise SpecError(f"torch backend option device={device!r}, but should be a device such as cpu, cuda, cuda:1")
    try:
        found = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise SpecError(f"torch backend option device={device!r} is not a torch device ({one_line(exc, 160)}); "
                        f"devices here: {_devices_here(torch)}") from None
    if found.type == "cpu":
        return found
    if found.type not in ACCELERATORS:
        raise SpecError(f"torch backend option device={device!r}: the {found.type} device is not supported "
                        f"(cpu, {', '.join(ACCELERATORS)}); devices here: {_devices_here(torch)}")
    if found.type == "mps":
        mps = torch.backends.mps
        if not mps.is_available():
            why = "this torch build has no MPS support" if not mps.is_built() else "no MPS device is visible"
            raise BackendUnavailable(f"torch device {device!r} asked, but {why}; devices here: {_devices_here(torch)}")
        if found.index not in (None, 0):
            raise SpecError(f"torch backend option device={device!r}, but there is one MPS device: mps:0")
        return torch.device("mps")
    module = _device_module(torch, found.type)
    try:
        available = module is not None and module.is_available()
        count = module.device_count() if available else 0
    except Exception as exc:  # a driver that fails as it is asked
        raise BackendUnavailable(f"torch device {device!r} asked, but torch cannot reach it "
                                 f"({type(exc).__name__}: {one_line(exc, 200)})") from None
    if not available or count == 0:
        build = _build(torch)
        why = (f"torch {torch.__version__} is a {build} build" if found.type == "cuda" and build == "CPU-only"
               else f"no {found.type} device is visible to torch {torch.__version__} ({build})")
        raise BackendUnavailable(f"torch device {device!r} asked, but {why}; devices here: {_devices_here(torch)}")
    index = 0 if found.index is None else found.index
    if index >= count:
        raise SpecError(f"torch backend option device={device!r}, but this machine has {count} {found.type} "
                        f"device(s): {found.type}:0..{found.type}:{count - 1}")
    return torch.device(found.type, index)


class RopeRows:
    """cos and sin (n, rotary_dim/2) of positions, float32 on the device, as engines make them."""

    def __init__(self, torch: Any, spec: CacheSpec, device: Any) -> None:
        self._torch = torch
        freqs = rope_frequencies(spec)
        self.half = freqs.rotary_dim // 2
        self.style = spec.rope.style
        self.factor = freqs.attention_factor
        self.inv_freq = inv_freq32(torch, spec, device) if self.half else None

    def rows(self, start: int, stop: int) -> Tuple[Any, Any]:
        torch = self._torch
        positions = torch.arange(start, stop, dtype=torch.float32, device=self.inv_freq.device)
        angles = positions[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(angles), torch.sin(angles)
        if self.factor != 1.0:
            cos, sin = cos * self.factor, sin * self.factor
        return cos, sin

    def rotate(self, x: Any, start: int) -> Any:
        """float32 x (n, heads, d) rotated at positions start .. start+n-1 (a new tensor)."""
        if not self.half:
            return x.clone()
        n, half = x.shape[0], self.half
        cos, sin = self.rows(start, start + n)
        cos, sin = cos[:, None, :], sin[:, None, :]
        out = x.clone()
        if self.style == "neox":
            a, b = x[..., :half], x[..., half:2 * half]
            out[..., :half] = a * cos - b * sin
            out[..., half:2 * half] = a * sin + b * cos
        else:
            a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
            out[..., 0:2 * half:2] = a * cos - b * sin
            out[..., 1:2 * half:2] = a * sin + b * cos
        return out


def inv_freq32(torch: Any, spec: CacheSpec, device: Any) -> Any:
    """Inverse frequencies in float32, computed the way transformers computes them."""
    rope, dim = spec.rope, spec.rotary_dim

    def base_formula(base: float) -> Any:
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (base ** exponents)

    if rope.kind in ("none", "default"):
        return base_formula(rope.theta)
    if rope.kind == "linear":
        return base_formula(rope.theta) / rope.factor
    if rope.kind == "dynamic":
        orig = rope.original_max_positions
        length = max(spec.max_positions, orig)
        base = rope.theta * ((rope.factor * length / orig) - (rope.factor - 1)) ** (dim / (dim - 2))
        return base_formula(base)
    # yarn, longrope, llama3: blends of the base frequencies; the normative values rounded to float32.
    return torch.tensor(rope_frequencies(spec).inv_freq, dtype=torch.float32, device=device)


class _Store:
    """K or V of every layer in one storage dtype; decodes to float32."""

    def __init__(self, torch: Any, spec: CacheSpec, device: Any) -> None:
        self._torch = torch
        self.kind = spec.kv_dtype
        self.dtype = getattr(torch, _TORCH_DTYPE[spec.kv_dtype])
        shape = (spec.n_layers, spec.n_kv_heads, spec.max_positions, spec.head_dim)
        self.data = torch.empty(shape, dtype=self.dtype, device=device)
        # fp8: one float32 scale per layer (per-tensor, as engines keep k_scale / v_scale).
        self.scale = torch.ones(spec.n_layers, dtype=torch.float32, device=device) if self.kind == "fp8_e4m3" else None

    @property
    def nbytes(self) -> int:
        total = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total

    def put(self, layer: int, start: int, x: Any) -> None:
        """Store float32 x (n, n_kv, d) at positions start .. start+n-1."""
        stop = start + x.shape[0]
        x = x.transpose(0, 1)
        if self.scale is not None:  # torch's float8 cast overflows to NaN: saturate first, as engines do
            x = (x / self.scale[layer]).clamp(-FP8_MAX, FP8_MAX)
        self.data[layer, :, start:stop].copy_(x)

    def get(self, layer: int, start: int, stop: int) -> Any:
        """float32 (n_kv, stop-start, d): a view of float32 storage, else a decoded copy."""
        stored = self.data[layer, :, start:stop]
        if self.scale is not None:
            return stored.float() * self.scale[layer]
        return stored if self.kind == "float32" else stored.float()


class TorchCache:
    """A KV cache of one spec in torch tensors on one device, preallocated at open."""

    Rope = RopeRows

    def __init__(self, backend: "TorchBackend", spec: CacheSpec) -> None:
        self.spec = spec
        self._torch = torch = backend.torch
        self._device = backend.device
        self._use_threads = backend.use_threads
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        self._decode_by_matmul = self._device.type != "cpu"
        self._k: Optional[_Store] = _Store(torch, spec, self._device)
        self._v: Optional[_Store] = _Store(torch, spec, self._device)
        self._rope = self.Rope(torch, spec, self._device)
        self._lengths = [0] * spec.n_layers

    # --- checks ---

    def _stores(self) -> Tuple[_Store, _Store]:
        if self._k is None or self._v is None:
            raise ValueError("the cache is closed")
        return self._k, self._v

    def _as_input(self, name: str, x: Any, heads: int) -> Any:
        torch = self._torch
        tensor = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        tensor = tensor.to(device=self._device, dtype=torch.float32)
        C.rows(self.spec, name, tensor, heads)
        return tensor

    # --- protocol ---

    def length(self, layer: int) -> int:
        C.layer(self.spec, layer)
        return self._lengths[layer]

    def append(self, layer: int, k: Any, v: Any) -> None:
        k_store, v_store = self._stores()
        self._use_threads()
        k, v, start = C.append_inputs(self.spec, self._lengths, layer, k, v, self._as_input)
        n = k.shape[0]
        if n:
            k_store.put(layer, start, self._rope.rotate(k, start))
            v_store.put(layer, start, v)
        self._lengths[layer] = start + n

    def attend(self, layer: int, q: Any) -> Any:
        k_store, v_store = self._stores()
        self._use_threads()
        C.layer(self.spec, layer)
        spec = self.spec
        q = self._as_input("q", q, spec.n_heads)
        length, n_q = self._lengths[layer], q.shape[0]
        C.queries(n_q, length)
        rotated = self._rope.rotate(q, length - n_q)
        out = self._torch.empty_like(rotated)
        for a in range(0, n_q, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, n_q)
            out[a:b] = self._attend_block(layer, rotated[a:b], length - n_q + a, k_store, v_store)
        return out

    def _attend_block(self, layer: int, q: Any, first: int, k_store: _Store, v_store: _Store) -> Any:
        """Rotated q (n, n_heads, d) at positions first .. first+n-1 over the keys they see."""
        spec, torch = self.spec, self._torch
        n, group, n_kv = q.shape[0], spec.group_size, spec.n_kv_heads
        last = first + n - 1
        lo, hi = self._key_range(first, last)
        keys = k_store.get(layer, lo, hi)
        values = v_store.get(layer, lo, hi)
        # Rows of one KV head, ordered (query, head in group): no copy of K for GQA.
        rows = q.reshape(n, n_kv, group, spec.head_dim).permute(1, 0, 2, 3).reshape(n_kv, n * group, spec.head_dim)
        mask = None
        if n > 1:  # one query sees exactly the sliced keys
            key_pos = torch.arange(lo, hi, device=self._device)
            row_pos = torch.arange(first, last + 1, device=self._device).repeat_interleave(group)
            mask = self._visible(key_pos[None, :], row_pos[:, None])
        if spec.softcap is not None:
            out = self._softcapped(rows, keys, values, mask)
        elif self._decode_by_matmul and n * group <= DECODE_ROWS:
            out = self._matmul_attention(rows, keys, values, mask)
        else:
            # (batch 1, KV heads, rows, d): torch's CPU kernels take the 4-D layout several times
            # faster than a 3-D batch.
            out = self._sdpa(rows[None], keys[None], values[None], attn_mask=mask, scale=spec.scale)[0]
        return out.reshape(n_kv, n, group, spec.head_dim).permute(1, 0, 2, 3).reshape(n, spec.n_heads, spec.head_dim)

    def _matmul_attention(self, rows: Any, keys: Any, values: Any, mask: Optional[Any]) -> Any:
        """Few query rows on an accelerator: scores by batched matmul over all keys, softmax in
        float32, then weights x V. SDPA's fused kernels give each (KV head, row block) one
        thread block that walks every key, so a decode step ran 8 blocks on a 132-SM H200
        (40 GB/s, 1% of read, at 4K to 64K positions); cuBLAS spreads the keys over the device."""
        torch = self._torch
        scores = torch.matmul(rows, keys.transpose(1, 2)) * self.spec.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        weights = torch.softmax(scores, dim=-1)
        # weights x V reduces over every key with a handful of rows: cuBLAS ran it at ~100 GB/s
        # on the H200, so the keys are split in blocks of SPLIT_KEYS, one batch entry each,
        # and the partial sums added (split-K by hand).
        n_kv, r, n_keys = weights.shape
        full = n_keys // SPLIT_KEYS * SPLIT_KEYS
        out = torch.zeros((n_kv, r, values.shape[2]), dtype=torch.float32, device=values.device)
        if full:
            w = weights[:, :, :full].reshape(n_kv, r, full // SPLIT_KEYS, SPLIT_KEYS).transpose(1, 2)
            v = values[:, :full].reshape(n_kv, full // SPLIT_KEYS, SPLIT_KEYS, values.shape[2])
            out += torch.matmul(w, v).sum(1)
        if full < n_keys:
            out += torch.matmul(weights[:, :, full:], values[:, full:])
        return out

    def _key_range(self, first: int, last: int) -> Tuple[int, int]:
        """Positions lo .. hi-1 that queries at first .. last can see: the window's and the last's."""
        window = self.spec.sliding_window
        return (max(0, first - window + 1) if window else 0), last + 1

    def _visible(self, key_pos: Any, row_pos: Any) -> Any:
        """The bottom-right causal (and window) mask: a key at or before the row's position."""
        mask = key_pos <= row_pos
        if self.spec.sliding_window:
            mask = mask & (key_pos > row_pos - self.spec.sliding_window)
        return mask

    def _softcapped(self, rows: Any, keys: Any, values: Any, mask: Optional[Any]) -> Any:
        """The float32 math fallback: scores, cap * tanh(s / cap), mask, online softmax over key blocks."""
        torch, spec = self._torch, self.spec
        cap = float(spec.softcap)
        n_kv, r, _ = rows.shape
        running = torch.full((n_kv, r, 1), -math.inf, dtype=torch.float32, device=self._device)
        denom = torch.zeros((n_kv, r, 1), dtype=torch.float32, device=self._device)
        acc = torch.zeros((n_kv, r, values.shape[2]), dtype=torch.float32, device=self._device)
        for a in range(0, keys.shape[1], KEY_BLOCK):
            b = min(a + KEY_BLOCK, keys.shape[1])
            scores = torch.matmul(rows, keys[:, a:b].transpose(1, 2)) * spec.scale
            scores = cap * torch.tanh(scores / cap)
            if mask is not None:
                scores = scores.masked_fill(~mask[None, :, a:b], -math.inf)
            new = torch.maximum(running, scores.amax(dim=2, keepdim=True))
            shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
            rescale = torch.exp(running - shift)
            weights = torch.exp(scores - shift)
            denom = denom * rescale + weights.sum(dim=2, keepdim=True)
            acc = acc * rescale + torch.matmul(weights, values[:, a:b])
            running = new
        return acc / denom

    def read(self, layer: int, start: int, stop: int) -> Tuple[Any, Any]:
        k_store, v_store = self._stores()
        self._use_threads()
        C.layer(self.spec, layer)
        C.read_range(start, stop, self._lengths[layer])
        return (k_store.get(layer, start, stop).transpose(0, 1).contiguous(),
                v_store.get(layer, start, stop).transpose(0, 1).contiguous())

    def nbytes(self) -> int:
        if self._k is None or self._v is None:
            return 0
        return self._k.nbytes + self._v.nbytes

    def close(self) -> None:
        self._k = self._v = None


def _out_of_memory(torch: Any) -> type:
    """torch's out-of-memory error (torch.OutOfMemoryError from 2.5, torch.cuda's before)."""
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class TorchBackend:
    """The "torch" backend. Options: device (cpu, cuda, cuda:N, xpu[:N], mps; default cuda
    when torch sees one, else cpu), threads (device=cpu only: torch's intra-op threads, which
    torch keeps per process; default the cores this process may use).

    Registered with device kind "cpu": the cpu alias takes numpy first (always available),
    so torch is reached by name only, and the gpu alias never lands on torch running on a
    CPU. ``info().device_kind`` says where this instance runs ("gpu" for cuda, xpu and mps).
    """

    name = "torch"
    Cache = TorchCache

    def __init__(self, *, device: Optional[Any] = None, threads: Optional[int] = None) -> None:
        if threads is not None:
            _positive_int("threads", threads)
        self.torch = torch = _import_torch()
        self.device = resolve_device(torch, device)
        self.kind = self.device.type
        if threads is not None and self.kind != "cpu":
            raise SpecError(f"torch backend option threads={threads} applies to device=cpu, not {self.device}")
        if self.kind == "cpu":
            self.threads = threads or available_cores()
            self.use_threads()
        else:
            self.threads = None
            self.bandwidth = self._bandwidth  # the suite's roofline is this device's, not the host's
        self._module = _device_module(torch, self.kind)
        self._refused = self._probe_dtypes()

    def use_threads(self) -> None:
        """Set torch's intra-op threads to this backend's: torch keeps one number per process,
        so two torch backends in one run (longctx-bench) would otherwise share the last one's."""
        if self.threads and self.torch.get_num_threads() != self.threads:
            self.torch.set_num_threads(self.threads)

    def _probe_dtypes(self) -> Dict[str, str]:
        """The storage dtypes this device cannot hold, with torch's one-line reason."""
        torch, refused = self.torch, {}
        for kv_dtype in KV_DTYPES[1:]:
            dtype = getattr(torch, _TORCH_DTYPE[kv_dtype], None)
            if dtype is None:
                refused[kv_dtype] = f"torch {torch.__version__} has no {_TORCH_DTYPE[kv_dtype]}"
                continue
            try:
                x = torch.linspace(-2.0, 2.0, 8, device=self.device)
                back = x.to(dtype).float()
                if self.kind != "cpu":
                    self.synchronize()
                if not torch.allclose(back.cpu(), x.cpu(), atol=0.25):
                    refused[kv_dtype] = f"a {_TORCH_DTYPE[kv_dtype]} round trip on {self.device} came back wrong"
            except Exception as exc:  # TypeError / RuntimeError: the device has no such dtype
                refused[kv_dtype] = one_line(exc, 160)
        if self.kind == "cuda" and "bfloat16" not in refused and not torch.cuda.is_bf16_supported():
            refused["bfloat16"] = "torch.cuda.is_bf16_supported() is False on this GPU"
        return refused

    def kv_dtypes(self) -> Tuple[str, ...]:
        return tuple(d for d in KV_DTYPES if d not in self._refused)

    def info(self) -> BackendInfo:
        torch = self.torch
        versions = {"torch": torch.__version__, "build": _build(torch), "attention": self._attention_paths()}
        if self.kind == "cpu":
            name, vendor = cpu_name_and_vendor()
            versions["threads"] = str(self.threads)
        elif self.kind == "mps":
            name, vendor = "Apple MPS", "Apple"
        else:
            props = self._module.get_device_properties(self.device)
            name = f"{props.name} ({self.device})"
            vendor = "Intel" if self.kind == "xpu" else "AMD" if getattr(torch.version, "hip", None) else "NVIDIA"
            if self.kind == "cuda":
                versions["compute capability"] = f"{props.major}.{props.minor}"
        return BackendInfo(
            name=self.name, device_kind="cpu" if self.kind == "cpu" else "gpu", device_name=name, vendor=vendor,
            versions=versions, kv_dtypes=self.kv_dtypes(), max_positions=None,
        )

    @staticmethod
    def _attention_paths() -> str:
        return "sdpa float32 (chunk: explicit causal mask); softcap: float32 math fallback"

    def open_cache(self, spec: CacheSpec) -> TorchCache:
        if spec.kv_dtype not in KV_DTYPES:
            raise NotSupported(f"the torch backend stores {', '.join(KV_DTYPES)}, not {spec.kv_dtype}")
        if spec.kv_dtype in self._refused:
            raise NotSupported(f"torch on {self.device} cannot store {spec.kv_dtype} "
                               f"({self._refused[spec.kv_dtype]}); it stores {', '.join(self.kv_dtypes())}")
        try:
            return self.Cache(self, spec)
        except _out_of_memory(self.torch) as exc:
            self._release()
            raise NotSupported(f"{self.device} out of memory allocating the cache: {one_line(exc, 200)}") from None

    def _release(self) -> None:
        empty = getattr(self._module, "empty_cache", None)
        if callable(empty):
            empty()

    def asarray(self, array: np.ndarray) -> Any:
        return self.torch.tensor(np.asarray(array), device=self.device)

    def to_numpy(self, native: Any) -> np.ndarray:
        torch = self.torch
        if not isinstance(native, torch.Tensor):
            return np.asarray(native)
        tensor = native.detach()
        if tensor.dtype in (torch.bfloat16,) or "float8" in str(tensor.dtype):
            tensor = tensor.float()  # NumPy has no bfloat16 or float8: float32 holds them exactly
        return tensor.cpu().numpy()

    def synchronize(self) -> None:
        if self.kind == "cuda":
            self.torch.cuda.synchronize(self.device)
        elif self.kind == "xpu":
            self.torch.xpu.synchronize(self.device)
        elif self.kind == "mps":
            self.torch.mps.synchronize()

    def memory_in_use(self) -> Optional[int]:
        """Bytes of live tensors on the device as torch's allocator counts them; None on the
        CPU, where the suite's RSS and tracemalloc probes observe host memory."""
        if self.kind in ("cuda", "xpu"):
            return int(self._module.memory_allocated(self.device))
        if self.kind == "mps":
            return int(self.torch.mps.current_allocated_memory())
        return None

    def memory_available(self) -> Optional[int]:
        """Free device memory plus what torch's caching allocator holds unused."""
        if self.kind not in ("cuda", "xpu") or not hasattr(self._module, "mem_get_info"):
            return None
        free, _ = self._module.mem_get_info(self.device)
        cached = self._module.memory_reserved(self.device) - self._module.memory_allocated(self.device)
        return int(free + cached)

    def _bandwidth(self, nbytes: int = 1 << 30, repeats: int = 10) -> DeviceBandwidth:
        """Device-to-device copy (bytes read + written) and a streaming sum, best of ``repeats``."""
        torch = self.torch
        free = self.memory_available()
        size = (min(int(nbytes), free // 8) if free else int(nbytes)) // 16 * 16
        src = torch.ones(size // 4, dtype=torch.float32, device=self.device)
        dst = torch.empty_like(src)

        def best(fn: Any) -> float:
            fn()
            self.synchronize()
            seconds = []
            for _ in range(repeats):
                if self.kind == "cuda":
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    stop.record()
                    stop.synchronize()
                    seconds.append(start.elapsed_time(stop) / 1e3)
                else:
                    began = time.perf_counter()
                    fn()
                    self.synchronize()
                    seconds.append(time.perf_counter() - began)
            return min(seconds)

        copy_s = best(lambda: dst.copy_(src))
        read_s = best(lambda: torch.sum(src))
        del src, dst
        timer = "CUDA events" if self.kind == "cuda" else "synchronize + perf_counter"
        return DeviceBandwidth(copy_gbps=2 * size / copy_s / 1e9, read_gbps=size / read_s / 1e9, nbytes=size,
                               method=f"torch on {self.device}: copy_, sum ({timer})")
