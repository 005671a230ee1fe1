"""The numpy backend's optional native fast path: _native.c, compiled on first use.

The float16, bfloat16, q8_0 and q4_0 codecs, RoPE fused into the encode of K,
and the products of decode attention read straight from storage, as plain C with
AVX2/F16C/FMA, loaded with ctypes, which releases the GIL so the
backend's threads run it in parallel. The shared library is built with the
system C compiler into a per-user cache directory
(``$XDG_CACHE_HOME/pytest-longctx`` or ``~/.cache/pytest-longctx``) under a
name that hashes the source, the compiler, its flags and the CPU, written
under a temporary name and renamed, so concurrent pytest-xdist workers are
safe. Nothing here raises on import: without a compiler, when the build or
its self-check fails, or with ``LONGCTX_NATIVE=0``, ``available()`` is False
and ``reason()`` says why in one line; the backend then keeps its NumPy code.

The wrappers take NumPy arrays of up to three axes (planes, rows, cols) whose
last axis is contiguous; they check dtype, shape, alignment, writability and
strides, and pass the strides of the other axes, in elements, to the C code,
which touches exactly the arrays' elements.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

SOURCE = Path(__file__).with_name("_native.c")
COMMON_FLAGS = ("-O3", "-std=c99", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")
# Tried in order: the first that builds is used.
FLAG_SETS = (("-march=native",) + COMMON_FLAGS, COMMON_FLAGS)
FORMATS = {"float32": 0, "float16": 1, "bfloat16": 2}
_F32 = np.dtype(np.float32)
STORED_DTYPES = {"float32": _F32, "float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.uint16)}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None  # None: not tried yet; "": loaded


def available() -> bool:
    """Whether the native kernels are loaded (building them on the first call)."""
    return _load() is not None


def reason() -> str:
    """Why the native kernels are not available, in one line ("" when they are)."""
    _load()
    return _reason or ""


def describe() -> str:
    """"native" or "numpy (<reason>)": what the backend's codecs run on."""
    return "native" if available() else f"numpy ({reason()})"


def simd() -> bool:
    """Whether the loaded kernels use AVX2, F16C and FMA (False: the portable C, or none)."""
    lib = _load()
    return bool(lib is not None and lib.lc_simd())


# --- build and load ----------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-longctx"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            found = shutil.which(name)
            if found:
                return found
    return None


def _cpu_fingerprint() -> str:
    """What -march=native depends on, so a shared home on another CPU rebuilds."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _build(compiler: str, flags: Tuple[str, ...], source: bytes) -> Path:
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    directory = cache_dir()
    target = directory / f"_native-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", temporary],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise OSError(message[-1] if message else f"exit status {done.returncode}")
        os.replace(temporary, target)  # atomic: another worker may have done the same
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_ssize_t
    lib.lc_simd.argtypes, lib.lc_simd.restype = [], i
    for name in ("lc_encode", "lc_decode"):
        getattr(lib, name).argtypes = [i, p, n, n, p, n, n, n, n, n]
        getattr(lib, name).restype = None
    lib.lc_rope_encode.argtypes = [i, p, n, n, p, p, n, n, i, p, n, n, n, n, n]
    lib.lc_rope_encode.restype = i
    lib.lc_fill.argtypes = [i, p, p, n, n, p, p, n, n, i, p, p, n, n, n, n, n, i]
    lib.lc_fill.restype = i
    lib.lc_products.argtypes = [i, i, p, n, n, p, n, n, p, n, n, n, n, n, n]
    lib.lc_products.restype = i
    lib.lc_quant_products.argtypes = [i, i, p, n, n, p, n, n, p, n, n, p, n, n, n, n, n, n]
    lib.lc_quant_products.restype = i
    for name in ("lc_quant_encode", "lc_quant_decode"):
        getattr(lib, name).argtypes = [i, p, n, n, p, n, n, p, n, n, n, n, n]
        getattr(lib, name).restype = None


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _reason
    if _reason is not None:
        return _lib
    with _lock:
        if _reason is None:
            _lib, _reason = _try_load()
    return _lib


def _try_load() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get("LONGCTX_NATIVE", "").strip() == "0":
        return None, "LONGCTX_NATIVE=0"
    try:
        source = SOURCE.read_bytes()
    except OSError:
        return None, f"{SOURCE.name} is not installed"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc, clang) found"
    failure = ""
    # -march=native first: built on first use on the CPU that runs it (the name hashes its
    # flags), so AVX2, F16C and FMA are used exactly where that CPU has them, and the portable
    # C where it does not; LONGCTX_NATIVE=portable asks for the portable C on any CPU.
    portable = os.environ.get("LONGCTX_NATIVE", "").strip() == "portable"
    for flags in FLAG_SETS[1:] if portable else FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags, source)))
            _declare(lib)
            problem = _self_check(lib)
        except Exception as exc:  # a failed build, load or check must never break the backend
            failure = f"build failed ({os.path.basename(compiler)} {flags[0]}: {exc})"
            continue
        if not problem:
            return lib, ""
        failure = f"self-check failed ({problem})"
    return None, " ".join(failure.split())[:240]


def _self_check(lib: ctypes.CDLL) -> str:
    """The build agrees with NumPy on a few telling values (rounding, overflow, subnormals)."""
    # Two groups of 16: the vector encoder redoes a group holding a NaN in scalar code, so
    # the first group (no NaN) checks the SIMD path and the second the scalar one.
    telling = [1.0, -2.5, 65504.0, 65519.0, 65520.0, -1e9, 6e-8, -3e-8, 1 + 2.0**-11, np.inf,
               -np.inf, 1.00390625, 0.0, -0.0, 3.0, 7e-6]
    x = np.array(telling + telling[:10] + [np.nan] + telling[11:], np.float32)
    bits = np.empty(x.shape, np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    _call_codec(lib, "lc_encode", 1, x, bits, _F32, np.dtype(np.uint16))
    if not np.array_equal(bits, want):
        return f"float16 encode gave {bits.tolist()}, expected {want.tolist()}"
    back = np.empty(x.shape, np.float32)
    _call_codec(lib, "lc_decode", 1, bits, back, np.dtype(np.uint16), _F32)
    if not np.array_equal(back, want.view(np.float16).astype(np.float32), equal_nan=True):
        return "float16 decode"
    return ""


# --- wrappers --------------------------------------------------------------------------


def _layout(array: np.ndarray, dtype: np.dtype, name: str, writable: bool = False) -> Tuple[Tuple[int, ...], int, int]:
    """(shape as 3 axes, plane stride, row stride), strides in elements; raises if unsafe."""
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        raise TypeError(f"{name} should be a NumPy array of {dtype}, not {getattr(array, 'dtype', type(array))}")
    if not 1 <= array.ndim <= 3:
        raise ValueError(f"{name} has {array.ndim} axes, but should have 1 to 3")
    if writable and not array.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not array.flags.aligned:
        raise ValueError(f"{name} is not aligned")
    shape = (1,) * (3 - array.ndim) + array.shape
    strides = (0,) * (3 - array.ndim) + array.strides
    size = dtype.itemsize
    if array.size == 0:  # nothing will be touched
        return shape, 0, 0
    for axis in range(3):
        if shape[axis] > 1 and (strides[axis] < 0 or strides[axis] % size):
            raise ValueError(f"{name} has strides {array.strides}, but they should be non-negative "
                             f"multiples of {size}")
    if shape[2] > 1 and strides[2] != size:
        raise ValueError(f"{name} is not contiguous in its last axis (strides {array.strides})")
    return shape, strides[0] // size, strides[1] // size


def _check_pair(src: np.ndarray, dst: np.ndarray) -> None:
    if src.shape != dst.shape:
        raise ValueError(f"destination has shape {dst.shape}, but should be the source's {src.shape}")
    if np.may_share_memory(src, dst):
        raise ValueError("source and destination overlap")


def _call_codec(lib: ctypes.CDLL, function: str, fmt: int, src: np.ndarray, dst: np.ndarray,
                src_dtype: np.dtype, dst_dtype: np.dtype) -> None:
    shape, src_ps, src_rs = _layout(src, src_dtype, "source")
    _, dst_ps, dst_rs = _layout(dst, dst_dtype, "destination", writable=True)
    _check_pair(src, dst)
    if src.size:
        getattr(lib, function)(fmt, src.ctypes.data, src_ps, src_rs, dst.ctypes.data, dst_ps, dst_rs, *shape)


def _library() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernels are not available: {reason()}")
    return lib


def encode(kind: str, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = float32 x stored as ``kind`` (float16/bfloat16 bits in uint16, or float32)."""
    _call_codec(_library(), "lc_encode", FORMATS[kind], x, out, _F32, STORED_DTYPES[kind])
    return out


def decode(kind: str, bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 out = the values ``bits`` hold as ``kind``; exact."""
    _call_codec(_library(), "lc_decode", FORMATS[kind], bits, out, STORED_DTYPES[kind], _F32)
    return out


_U16 = np.dtype(np.uint16)


@dataclass(frozen=True)
class Quant:
    """A ggml block format as the C code takes it: its LC_Q* number, the dtype of its values
    array and how many values one element of it holds."""

    fmt: int
    values: np.dtype
    per_element: int


# q8_0: an int8 per value; q4_0: two 4-bit values a byte. Scales: float16 bits per 32 values.
QUANT = {"q8_0": Quant(8, np.dtype(np.int8), 1), "q4_0": Quant(4, np.dtype(np.uint8), 2)}


def _quant_layouts(kind: str, shape: Tuple[int, ...], q: np.ndarray, d: np.ndarray,
                   writable: bool = False) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(plane, row) strides of the values q and scales d of ``kind`` that hold values of
    ``shape`` (..., cols); raises, naming the argument, unless they fit."""
    quant = QUANT[kind]
    cols = shape[-1]
    if cols % 32:
        raise ValueError(f"values of shape {shape} have {cols} columns, but {kind} needs a multiple of 32")
    _shaped("q", q, shape[:-1] + (cols // quant.per_element,), f" for {kind} values of shape {shape}")
    _, q_ps, q_rs = _layout(q, quant.values, "q", writable)
    _shaped("d", d, shape[:-1] + (cols // 32,), f" (a scale per 32 values of {shape})")
    _, d_ps, d_rs = _layout(d, _U16, "d", writable)
    return (q_ps, q_rs), (d_ps, d_rs)


def quant_encode(kind: str, x: np.ndarray, q: np.ndarray, d: np.ndarray) -> None:
    """``kind`` (q8_0 or q4_0) of float32 x (..., cols): values q and half-bit scales d
    (..., cols/32), the bits _kernels' q8_0_encode or q4_0_encode gives."""
    shape, x_ps, x_rs = _layout(x, _F32, "x")
    (q_ps, q_rs), (d_ps, d_rs) = _quant_layouts(kind, x.shape, q, d, writable=True)
    if x.size:
        _library().lc_quant_encode(QUANT[kind].fmt, x.ctypes.data, x_ps, x_rs, q.ctypes.data, q_ps, q_rs,
                                   d.ctypes.data, d_ps, d_rs, *shape)


def quant_decode(kind: str, q: np.ndarray, d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 out (..., cols) = the values ``kind`` stores in q and d; exact."""
    shape, out_ps, out_rs = _layout(out, _F32, "out", writable=True)
    (q_ps, q_rs), (d_ps, d_rs) = _quant_layouts(kind, out.shape, q, d)
    if out.size:
        _library().lc_quant_decode(QUANT[kind].fmt, q.ctypes.data, q_ps, q_rs, d.ctypes.data, d_ps, d_rs,
                                   out.ctypes.data, out_ps, out_rs, *shape)
    return out


def _rope_args(kind: str, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str,
               out: np.ndarray) -> Tuple[Tuple[int, ...], int, int, int, int]:
    """Checks of a rotate-and-store: (shape, x's plane and row strides, out's), in elements."""
    if style not in ("neox", "gptj"):
        raise ValueError(f"style is {style!r}, but should be neox or gptj")
    _shaped("x", x, (None, None, None))
    shape, x_ps, x_rs = _layout(x, _F32, "x")
    _shaped("out", out, x.shape, " (as x)")
    _, out_ps, out_rs = _layout(out, STORED_DTYPES[kind], "out", writable=True)
    _check_pair(x, out)
    n, _, d = x.shape
    _shaped("cos", cos, (n, None), f" for x {x.shape}")
    if 2 * cos.shape[1] > d:
        raise ValueError(f"cos has {cos.shape[1]} columns, but should have at most head_dim/2 = {d // 2}")
    _shaped("sin", sin, cos.shape, " (as cos)")
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, np.ndarray) or table.dtype != _F32 or not table.flags.c_contiguous:
            raise ValueError(f"{name} should be a C-contiguous float32 array")
    return shape, x_ps, x_rs, out_ps, out_rs


def rope_encode(kind: str, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str, out: np.ndarray) -> np.ndarray:
    """out = x (n, heads, d) rotated with table rows cos, sin (n, rotary_dim/2), stored as kind.

    The same float32 arithmetic as _kernels.rotate; out may be any view whose
    last axis is contiguous, such as the (heads, positions, d) storage
    transposed to (positions, heads, d).
    """
    shape, x_ps, x_rs, out_ps, out_rs = _rope_args(kind, x, cos, sin, style, out)
    if x.size == 0:
        return out
    half = cos.shape[1]
    # x is walked as (heads, n, d): its planes are heads, its rows positions.
    status = _library().lc_rope_encode(
        FORMATS[kind], x.ctypes.data, x_rs, x_ps, cos.ctypes.data, sin.ctypes.data, half, half,
        int(style == "gptj"), out.ctypes.data, out_rs, out_ps, shape[1], shape[0], shape[2])
    if status != 0:
        raise MemoryError("native rope_encode could not allocate its row buffer")
    return out


def fill(kind: str, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str,
         out_k: np.ndarray, out_v: np.ndarray, threads: int) -> None:
    """One append: out_k = rope_encode of k, out_v = encode of v, the positions split over
    ``threads`` cores (the native team). k and v share a layout, as do out_k and out_v."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}, but should be a positive integer")
    shape, x_ps, x_rs, out_ps, out_rs = _rope_args(kind, k, cos, sin, style, out_k)
    for name, array, like, dtype in (("v", v, k, _F32), ("out_v", out_v, out_k, STORED_DTYPES[kind])):
        _layout(array, dtype, name, writable=name == "out_v")
        if array.shape != like.shape or array.strides != like.strides:
            raise ValueError(f"{name} has shape {array.shape} and strides {array.strides}, but should have "
                             f"those of {'k' if like is k else 'out_k'}: {like.shape}, {like.strides}")
    for a, b in ((v, out_k), (v, out_v), (k, out_v), (out_k, out_v)):
        if np.may_share_memory(a, b):
            raise ValueError("k, v, out_k and out_v overlap")
    if k.size == 0:
        return
    half = cos.shape[1]
    status = _library().lc_fill(
        FORMATS[kind], k.ctypes.data, v.ctypes.data, x_rs, x_ps, cos.ctypes.data, sin.ctypes.data, half, half,
        int(style == "gptj"), out_k.ctypes.data, out_v.ctypes.data, out_rs, out_ps, shape[1], shape[0], shape[2],
        threads)
    if status != 0:
        raise MemoryError("native fill could not allocate its row buffer")


def _products(accumulate: bool, kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray, cols: int) -> None:
    a_shape, a_ps, a_rs = _layout(a, _F32, "a")
    b_shape, b_ps, b_rs = _layout(b, STORED_DTYPES[kind], "b")
    _, out_ps, out_rs = _layout(out, _F32, "out", writable=True)
    if np.may_share_memory(out, a) or np.may_share_memory(out, b):
        raise ValueError("out overlaps an input")
    if out.size == 0:
        return
    planes, m, n = a_shape[0], a_shape[1], b_shape[1]
    status = _library().lc_products(
        int(accumulate), FORMATS[kind], a.ctypes.data, a_ps, a_rs, b.ctypes.data, b_ps, b_rs,
        out.ctypes.data, out_ps, out_rs, planes, m, n, cols)
    if status != 0:
        raise MemoryError("native products could not allocate their row buffer")


def _shaped(name: str, array: np.ndarray, want: Tuple[Optional[int], ...], why: str = "") -> None:
    """A one-line error naming ``name`` unless it is an array of shape ``want`` (None: any)."""
    shape = getattr(array, "shape", None)
    if shape is None or len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        expected = "(" + ", ".join("n" if w is None else str(w) for w in want) + ")"
        raise ValueError(f"{name} has shape {shape}, but should be {expected}{why}")


def dot(kind: str, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (h, m, n) = a (h, m, d) @ b.T per head, for float32 a and b (h, n, d) stored as kind."""
    _shaped("a", a, (None, None, None))
    _shaped("b", b, (a.shape[0], None, a.shape[2]), f" to fit a {a.shape}")
    _shaped("out", out, (a.shape[0], a.shape[1], b.shape[1]), f" for a {a.shape} and b {b.shape}")
    _products(False, kind, a, b, out, a.shape[2])
    return out


def accumulate(kind: str, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (h, m, d) += w (h, m, n) @ b per head, for float32 w and b (h, n, d) stored as kind."""
    _shaped("w", w, (None, None, None))
    _shaped("b", b, (w.shape[0], w.shape[2], None), f" to fit w {w.shape}")
    _shaped("out", out, (w.shape[0], w.shape[1], b.shape[2]), f" for w {w.shape} and b {b.shape}")
    _products(True, kind, w, b, out, b.shape[2])
    return out


def _quant_products(accumulate: bool, kind: str, a: np.ndarray, values: Tuple[int, int, int], q: np.ndarray,
                    d: np.ndarray, out: np.ndarray) -> None:
    a_shape, a_ps, a_rs = _layout(a, _F32, "w" if accumulate else "a")
    (q_ps, q_rs), (d_ps, d_rs) = _quant_layouts(kind, values, q, d)
    _, out_ps, out_rs = _layout(out, _F32, "out", writable=True)
    if any(np.may_share_memory(out, x) for x in (a, q, d)):
        raise ValueError("out overlaps an input")
    if out.size == 0:
        return
    status = _library().lc_quant_products(
        int(accumulate), QUANT[kind].fmt, a.ctypes.data, a_ps, a_rs, q.ctypes.data, q_ps, q_rs, d.ctypes.data,
        d_ps, d_rs, out.ctypes.data, out_ps, out_rs, a_shape[0], a_shape[1], values[1], values[2])
    if status != 0:
        raise MemoryError(f"native {kind} products could not allocate their row buffer")


def _stored_rows(name: str, q: np.ndarray) -> int:
    """How many stored rows q (h, n, ...) holds: a one-line error unless it has three axes."""
    _shaped(name, q, (None, None, None))
    return q.shape[1]


def quant_dot(kind: str, a: np.ndarray, q: np.ndarray, d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (h, m, n) = a (h, m, cols) @ K.T per head, K (h, n, cols) stored as ``kind``: values
    q and half-bit scales d (h, n, cols/32), decoded exactly in registers."""
    _shaped("a", a, (None, None, None))
    values = (a.shape[0], _stored_rows("q", q), a.shape[2])
    _shaped("out", out, (a.shape[0], a.shape[1], values[1]), f" for a {a.shape} and q {q.shape}")
    _quant_products(False, kind, a, values, q, d, out)
    return out


def quant_accumulate(kind: str, w: np.ndarray, q: np.ndarray, d: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (h, m, cols) += w (h, m, n) @ V per head, V (h, n, cols) stored as ``kind`` in q and d."""
    _shaped("w", w, (None, None, None))
    _shaped("out", out, (w.shape[0], w.shape[1], None))
    values = (w.shape[0], w.shape[2], out.shape[2])
    _quant_products(True, kind, w, values, q, d, out)
    return out
