"""The numpy backend's native kernels: bit-exact codecs, strided writes, fused RoPE,
attention products, the fallback without them, and identical storage either way."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

from pytest_longctx.backends import _kernels as K
from pytest_longctx.backends import _native as N
from pytest_longctx.backends.numpy_backend import NumpyBackend
from pytest_longctx.spec import CacheSpec, RopeSpec

needs_native = pytest.mark.skipif(not N.available(), reason=f"native kernels unavailable: {N.reason()}")
SMALL = CacheSpec(2, 4, 2, 64, 300, kv_dtype="float16", rope=RopeSpec(theta=10000.0))
Codec = Callable[[str, str, np.ndarray, np.ndarray], None]  # (function, kind, src, dst)


def _floats(bits: Any) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _each_refused_in_one_line(refused: List[Tuple[Callable[[], Any], str]]) -> None:
    """Every call raises ValueError or TypeError, one line holding its expected message."""
    for call, message in refused:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def scalar_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """_native.c built without -march=native: the scalar C that machines without AVX2 run."""
    compiler = N._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("scalar")))
        lib = ctypes.CDLL(str(N._build(compiler, N.COMMON_FLAGS, N.SOURCE.read_bytes())))
    N._declare(lib)
    if lib.lc_simd():
        pytest.skip("this compiler enables AVX2, F16C and FMA by default")
    return lib


@pytest.fixture(params=["simd", "scalar"])
def codec(request: pytest.FixtureRequest) -> Codec:
    """encode/decode through the -march=native build (AVX2/F16C where the CPU has them)
    and through the scalar build, both of which must give the same bits."""
    if not N.available():
        pytest.skip(f"native kernels unavailable: {N.reason()}")
    lib = N._load() if request.param == "simd" else request.getfixturevalue("scalar_lib")

    def run(function: str, kind: str, src: np.ndarray, dst: np.ndarray) -> None:
        stored = N.STORED_DTYPES[kind]
        src_dtype, dst_dtype = (N._F32, stored) if function == "lc_encode" else (stored, N._F32)
        N._call_codec(lib, function, N.FORMATS[kind], src, dst, src_dtype, dst_dtype)

    return run


def _hard_values() -> np.ndarray:
    """Every finite half, the midpoints between neighbours and their float32 neighbours
    (ties), subnormals of both types, overflow, infinities, zeros and random values."""
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = np.unique(halves[np.isfinite(halves)].astype(np.float64))
    mid = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(0)
    return np.concatenate([
        finite.astype(np.float32), mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
        (rng.standard_normal(4000) * 10.0 ** rng.uniform(-10, 6, 4000)).astype(np.float32),
        _floats([1, 0x80000001, 0x007FFFFF, 0x33000000, 0x33000001, 0xB3000000, 0x337FFFFF, 0x38800000, 0x387FFFFF]),
        np.float32([65504, 65519.99, 65520, -65520, 1e5, -3e38, np.inf, -np.inf, 0.0, -0.0]),
    ])


def test_available_or_says_why() -> None:
    if N.available():
        assert N.reason() == "" and N.describe() == "native"
    else:
        assert N.reason() and N.describe() == f"numpy ({N.reason()})"
    assert "\n" not in N.describe()


# ---------------------------------------------------------------- codecs


def test_float16_encode_is_numpy_astype_bit_for_bit(codec: Codec) -> None:
    x = _hard_values()
    quiet_nans = _floats([0x7FC00000, 0xFFC00000, 0x7FC02000, 0x7FFFFFFF, 0xFFFFE000])
    x = np.concatenate([x, quiet_nans, np.float32([np.nan, -np.nan])])
    x = np.concatenate([x, x[:5]])  # not a multiple of 8: the scalar tail too
    bits = np.empty(x.shape, np.uint16)
    codec("lc_encode", "float16", x, bits)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(bits, want)


def test_float16_signalling_nans_stay_nans_with_their_sign(codec: Codec) -> None:
    """F16C quiets a signalling NaN; NumPy's astype may or may not (its build decides)."""
    x = _floats([0x7F800001, 0xFF800001, 0x7F802000, 0x7FBFFFFF] * 3)
    bits = np.empty(x.shape, np.uint16)
    codec("lc_encode", "float16", x, bits)
    assert np.all(np.isnan(bits.view(np.float16)))
    np.testing.assert_array_equal(bits >> 15, np.signbit(x))


def test_float16_decode_is_exact_for_every_half(codec: Codec) -> None:
    bits = np.arange(65536, dtype=np.uint16)
    got = np.empty(65536, np.float32)
    codec("lc_decode", "float16", bits, got)
    halves = bits.view(np.float16)
    nan = np.isnan(halves)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), halves[~nan].astype(np.float32).view(np.uint32))
    assert np.all(np.isnan(got[nan])) and np.array_equal(np.signbit(got[nan]), np.signbit(halves[nan]))


def test_bfloat16_is_the_numpy_codec_bit_for_bit(codec: Codec) -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([
        _hard_values(), _floats(rng.integers(0, 2**32, 20000, dtype=np.uint64)),  # every kind of bits, NaNs too
        _floats([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7F8000, 0x7F800001, 0xFFFFFFFF, 0x00008000]),
    ])
    want = np.empty(x.shape, np.uint16)
    K.bfloat16_encode(np, x, want)
    got = np.empty(x.shape, np.uint16)
    codec("lc_encode", "bfloat16", x, got)
    np.testing.assert_array_equal(got, want)

    every = np.arange(65536, dtype=np.uint16)
    back, want_back = np.empty(65536, np.float32), np.empty(65536, np.float32)
    codec("lc_decode", "bfloat16", every, back)
    K.bfloat16_decode(np, every, want_back)
    np.testing.assert_array_equal(back.view(np.uint32), want_back.view(np.uint32))


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
def test_strided_writes_and_reads_land_in_place(codec: Codec, kind: str) -> None:
    """An (n, heads, d) chunk into the (layers, heads, positions, d) storage, nothing else touched."""
    rng = np.random.default_rng(2)
    dtype = N.STORED_DTYPES[kind]
    storage = np.full((3, 4, 50, 24), 0xAB, dtype=dtype)
    before = storage.copy()
    x = rng.standard_normal((13, 4, 24)).astype(np.float32)
    codec("lc_encode", kind, x, storage[1, :, 20:33].transpose(1, 0, 2))
    want = np.empty((4, 13, 24), dtype)
    codec("lc_encode", kind, np.ascontiguousarray(x.transpose(1, 0, 2)), want)  # contiguous, one run
    before[1, :, 20:33] = want
    np.testing.assert_array_equal(storage, before)

    out = np.full((13, 4, 30), -1.0, np.float32)  # decode back into a strided (n, heads, d) view
    codec("lc_decode", kind, storage[1, :, 20:33], out[:, :, 3:27].transpose(1, 0, 2))
    if kind == "float16":
        want_values = x.astype(np.float16).astype(np.float32)
    elif kind == "bfloat16":
        want_values = K.bfloat16_decode(np, K.bfloat16_encode(np, x, np.empty(x.shape, np.uint16)), np.empty_like(x))
    else:
        want_values = x
    np.testing.assert_array_equal(out[:, :, 3:27], want_values)
    assert np.all(out[:, :, :3] == -1) and np.all(out[:, :, 27:] == -1)


@needs_native
def test_wrappers_refuse_what_they_cannot_pass_safely() -> None:
    x = np.zeros((4, 2, 8), np.float32)
    out = np.zeros((4, 2, 8), np.uint16)
    with pytest.raises(TypeError):
        N.encode("float16", x.astype(np.float64), out)
    with pytest.raises(TypeError):
        N.encode("float16", x, out.view(np.int16))
    with pytest.raises(ValueError, match="contiguous in its last axis"):
        N.encode("float16", x[:, :, ::2], out[:, :, :4])
    with pytest.raises(ValueError, match="non-negative"):
        N.encode("float16", x[::-1], out)
    with pytest.raises(ValueError, match="shape"):
        N.encode("float16", x, out[:3])
    with pytest.raises(ValueError, match="read-only"):
        out.flags.writeable = False
        N.encode("float16", x, out)
    with pytest.raises(ValueError, match="overlap"):
        N.decode("float32", x, x)
    with pytest.raises(ValueError, match="axes"):
        N.encode("float16", x[None], np.zeros((1, 4, 2, 8), np.uint16))
    N.encode("float16", x[:0], np.zeros((0, 2, 8), np.uint16))  # empty: nothing to do


# ---------------------------------------------------------------- RoPE and products


@needs_native
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 24, 0])
def test_rope_encode_is_rotate_then_encode_bit_for_bit(kind: str, style: str, rotary_dim: int) -> None:
    rng = np.random.default_rng(3)
    n, heads, d = 37, 3, 64
    x = (rng.standard_normal((n, heads, d)) * 10.0 ** rng.uniform(-3, 3, (n, heads, d))).astype(np.float32)
    angles = rng.uniform(0, 1000, (n, rotary_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32) * 1.1, np.sin(angles).astype(np.float32) * 1.1
    rotated = K.rotate(np, x, cos, sin, style, np.empty_like(x))
    want = np.empty((n, heads, d), N.STORED_DTYPES[kind])
    N.encode(kind, rotated, want)
    storage = np.zeros((heads, 50, d), N.STORED_DTYPES[kind])
    N.rope_encode(kind, x, cos, sin, style, storage[:, 5:5 + n].transpose(1, 0, 2))
    np.testing.assert_array_equal(storage[:, 5:5 + n].transpose(1, 0, 2), want)
    assert not storage[:, :5].any() and not storage[:, 5 + n:].any()


def _stored(kind: str, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    bits = np.empty(x.shape, N.STORED_DTYPES[kind])
    N.encode(kind, x, bits)
    values = np.empty(x.shape, np.float32)
    N.decode(kind, bits, values)
    return bits, values.astype(np.float64)


@needs_native
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("h,m,n,d", [(2, 2, 1030, 128), (3, 1, 37, 64), (1, 5, 6, 24), (2, 3, 9, 12)])
def test_products_against_stored_blocks(kind: str, h: int, m: int, n: int, d: int) -> None:
    """Scores and weighted sums read from storage agree with float64 products of the
    stored values; odd row counts, ragged blocks and widths off the vector size included."""
    rng = np.random.default_rng(4)
    storage, values = _stored(kind, rng.standard_normal((h, n + 4, d)).astype(np.float32))
    block, block_values = storage[:, 3 : 3 + n], values[:, 3 : 3 + n]
    q = rng.standard_normal((h, m, d)).astype(np.float32)
    scores = N.dot(kind, q, block, np.empty((h, m, n), np.float32))
    np.testing.assert_allclose(scores, q @ block_values.transpose(0, 2, 1), rtol=0, atol=1e-4 * np.sqrt(d))
    weights = rng.random((h, m, n)).astype(np.float32)
    acc = rng.standard_normal((h, m, d)).astype(np.float32)
    want = acc + weights @ block_values
    N.accumulate(kind, weights, block, acc)
    np.testing.assert_allclose(acc, want, rtol=0, atol=1e-5 * n)


@needs_native
def test_longctx_native_portable_runs_the_backend_on_the_portable_c(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """A CPU without F16C gets the portable build: forced here, the backend stores the bits the
    NumPy kernels store and decode attention (q8_0 and q4_0 included) agrees with theirs."""
    _forget(monkeypatch)
    monkeypatch.setenv("LONGCTX_NATIVE", "portable")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if N.simd():
        pytest.skip("this compiler enables AVX2, F16C and FMA by default")
    assert N.available() and N.describe() == "native"
    rng = np.random.default_rng(9)
    n = 1100
    k = rng.standard_normal((n, 2, 64)).astype(np.float32)
    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    for kv_dtype in ("float16", "q8_0", "q4_0"):
        spec = SMALL.replace(kv_dtype=kv_dtype, max_positions=n)
        portable = _fill(spec, True, k, v, (100, 1000), threads=2)
        numpy = _fill(spec, False, k, v, (100, 1000), threads=1)
        for a, b in zip(portable.read(1, 0, n), numpy.read(1, 0, n)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(portable.attend(0, q), numpy.attend(0, q), rtol=1e-5, atol=1e-5)


# The NumPy kernels of each block format, and the shape of the values array for (..., d) values.
QUANT_KERNELS = {"q8_0": (K.q8_0_encode, K.q8_0_decode), "q4_0": (K.q4_0_encode, K.q4_0_decode)}


def _quantized(kind: str, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Values and float16 scales of float32 x (..., d) as the NumPy kernels store ``kind``."""
    q = np.empty(x.shape[:-1] + (x.shape[-1] // N.QUANT[kind].per_element,), N.QUANT[kind].values)
    scales = np.empty(x.shape[:-1] + (x.shape[-1] // 32,), np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        QUANT_KERNELS[kind][0](np, x, q, scales)
    return q, scales


@pytest.mark.parametrize("kind", list(N.QUANT))
@pytest.mark.parametrize("build", ["simd", "scalar"])
@pytest.mark.parametrize("h,m,n,d", [(2, 2, 1030, 128), (3, 1, 37, 64), (1, 5, 6, 32)])
def test_quantized_products_read_the_stored_blocks(request: pytest.FixtureRequest, kind: str, build: str, h: int,
                                                   m: int, n: int, d: int) -> None:
    """Scores and weighted sums read from stored values and half scales agree with float64
    products of the decoded values, through the AVX2 build and the portable one."""
    if not N.available():
        pytest.skip(f"native kernels unavailable: {N.reason()}")
    lib = N._load() if build == "simd" else request.getfixturevalue("scalar_lib")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((h, n + 4, d)).astype(np.float32)
    q, scales = _quantized(kind, x)
    values = QUANT_KERNELS[kind][1](np, q, scales, np.empty(x.shape, np.float32)).astype(np.float64)[:, 3:3 + n]
    q, d_bits = q[:, 3:3 + n], scales.view(np.uint16)[:, 3:3 + n]
    a = rng.standard_normal((h, m, d)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(N, "_load", lambda: lib)
        scores = N.quant_dot(kind, a, q, d_bits, np.empty((h, m, n), np.float32))
        weights = rng.random((h, m, n)).astype(np.float32)
        acc = rng.standard_normal((h, m, d)).astype(np.float32)
        want = acc + weights @ values
        N.quant_accumulate(kind, weights, q, d_bits, acc)
    np.testing.assert_allclose(scores, a @ values.transpose(0, 2, 1), rtol=0, atol=1e-4 * np.sqrt(d))
    np.testing.assert_allclose(acc, want, rtol=0, atol=1e-5 * n)
    with pytest.raises(ValueError, match=r"d has shape \(1, 2, 1\), but should be \(1, 3, 1\)"):
        N.quant_dot(kind, a[:1, :, :32], q[:1, :3, :q.shape[2] * 32 // d], d_bits[:1, :2, :1],
                    np.empty((1, m, 3), np.float32))


@needs_native
def test_scalar_products_agree(scalar_lib: ctypes.CDLL) -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 16)).astype(np.float32)
    b = rng.standard_normal((2, 7, 16)).astype(np.float32)
    out = np.empty((2, 3, 7), np.float32)
    assert scalar_lib.lc_products(0, 0, a.ctypes.data, 48, 16, b.ctypes.data, 112, 16,
                                  out.ctypes.data, 21, 7, 2, 3, 7, 16) == 0
    np.testing.assert_allclose(out, a @ b.transpose(0, 2, 1), atol=1e-5)
    acc = a.copy()
    bits, values = _stored("float16", b)
    assert scalar_lib.lc_products(1, 1, out.ctypes.data, 21, 7, bits.ctypes.data, 112, 16,
                                  acc.ctypes.data, 48, 16, 2, 3, 7, 16) == 0
    np.testing.assert_allclose(acc, a + out @ values, atol=1e-5)


# ---------------------------------------------------------------- build, fallback


def _forget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next call load again, as in a fresh process without LONGCTX_NATIVE
    (undone after the test)."""
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_reason", None)
    monkeypatch.delenv("LONGCTX_NATIVE", raising=False)


def test_without_a_compiler_the_backend_uses_numpy_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget(monkeypatch)
    monkeypatch.setattr(N, "_compiler", lambda: None)
    assert not N.available() and N.reason() == "no C compiler (cc, gcc, clang) found"
    backend = NumpyBackend(threads=1)
    assert backend.info().versions["kernels"] == "numpy (no C compiler (cc, gcc, clang) found)"
    assert backend.open_cache(SMALL)._k.native is None  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="not available"):
        N.encode("float16", np.zeros(8, np.float32), np.zeros(8, np.uint16))
    assert NumpyBackend(native=False).info().versions["kernels"] == "numpy (native=False)"


def test_a_failed_build_is_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if N._compiler() is None:
        pytest.skip("no C compiler")
    _forget(monkeypatch)
    broken = tmp_path / "_native.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(N, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert not N.available()
    assert N.reason().startswith("build failed") and "\n" not in N.reason()
    assert NumpyBackend(threads=1).open_cache(SMALL)._k.native is None  # type: ignore[attr-defined]
    assert not list((tmp_path / "cache" / "pytest-longctx").glob("*"))  # no temporary left behind


def test_longctx_native_0_selects_numpy_in_a_fresh_process() -> None:
    code = ("from pytest_longctx.backends import _native as N\n"
            "from pytest_longctx.backends.numpy_backend import NumpyBackend\n"
            "print(N.available(), NumpyBackend().info().versions['kernels'])\n")
    env = dict(os.environ, LONGCTX_NATIVE="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False numpy (LONGCTX_NATIVE=0)"


@needs_native
def test_the_library_name_follows_source_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = N._compiler()
    assert compiler is not None
    source = tmp_path / "_native.c"
    source.write_text("int lc_simd(void) { return 7; }\n")
    monkeypatch.setattr(N, "SOURCE", source)
    first = N._build(compiler, N.COMMON_FLAGS, source.read_bytes())
    assert N._build(compiler, N.COMMON_FLAGS, source.read_bytes()) == first  # cached
    assert ctypes.CDLL(str(first)).lc_simd() == 7
    source.write_text("int lc_simd(void) { return 8; }\n")
    second = N._build(compiler, N.COMMON_FLAGS, source.read_bytes())
    assert second != first and ctypes.CDLL(str(second)).lc_simd() == 8
    assert first.parent == tmp_path / "pytest-longctx"


# ---------------------------------------------------------------- the backend either way


def _fill(spec: CacheSpec, native: bool, k: np.ndarray, v: np.ndarray, chunks: Tuple[int, ...], threads: int) -> Any:
    cache = NumpyBackend(native=native, threads=threads).open_cache(spec)
    for layer in range(spec.n_layers):
        start = 0
        for size in chunks:
            cache.append(layer, k[start : start + size], v[start : start + size])
            start += size
    return cache


@needs_native
@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial", "none"])
def test_the_backend_stores_the_same_bytes_with_and_without_native(kv_dtype: str, rope: str) -> None:
    ropes: Dict[str, RopeSpec] = {
        "neox": RopeSpec(theta=10000.0), "gptj": RopeSpec(theta=10000.0, style="gptj"),
        "partial": RopeSpec(theta=10000.0, rotary_dim=16), "none": RopeSpec(kind="none"),
    }
    spec = SMALL.replace(kv_dtype=kv_dtype, rope=ropes[rope], max_positions=3000)
    rng = np.random.default_rng(6)
    n = 2 + 1 + 300 + 2100
    k = (rng.standard_normal((n, 2, 64)) * 10.0 ** rng.uniform(-6, 4, (n, 2, 64))).astype(np.float32)
    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
    v[1, 0, :4] = [1e6, -1e6, np.inf, -np.inf]  # overflow to inf
    chunks = (2, 1, 300, 2100)  # decode-style, one NumPy cast, the kernels' passes
    native = _fill(spec, True, k, v, chunks, threads=2)
    numpy = _fill(spec, False, k, v, chunks, threads=1)
    assert native._k.native == kv_dtype and numpy._k.native is None
    # Storage is allocated unwritten: compare the n positions written, (layer, head, position, d).
    np.testing.assert_array_equal(native._k.data[:, :, :n], numpy._k.data[:, :, :n])
    np.testing.assert_array_equal(native._v.data[:, :, :n], numpy._v.data[:, :, :n])
    for a, b in zip(native.read(1, 0, n), numpy.read(1, 0, n)):
        np.testing.assert_array_equal(a, b)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    with np.errstate(invalid="ignore"):  # inf in V: that head's output is NaN
        got, want = native.attend(0, q), numpy.attend(0, q)
    ok = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), ok)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(N.QUANT))
@pytest.mark.parametrize("build", ["simd", "scalar"])
def test_quantizers_are_the_numpy_ones_bit_for_bit(request: pytest.FixtureRequest, kind: str, build: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of every scale (zero, subnormal-half scales, overflow to an inf scale), strided
    like the backend's storage, through both builds."""
    if not N.available():
        pytest.skip(f"native kernels unavailable: {N.reason()}")
    if build == "scalar":
        monkeypatch.setattr(N, "_lib", request.getfixturevalue("scalar_lib"))
    rng = np.random.default_rng(7)
    scales = 10.0 ** rng.choice([-30, -7, -5, 0, 3, 30], size=(300, 4, 1))
    x = (rng.standard_normal((300, 4, 64)) * scales).astype(np.float32)
    x[0, 0, :32], x[1, 1, :32] = 0.0, -0.0
    x[2, 2, 5], x[3, 3, 40] = 3e38, -127.5  # a block's max near float32's and a half-way value
    x[4, 0, :32] = np.abs(x[4, 0, :32])
    x[4, 0, 3], x[4, 0, 9] = 9.0, -9.0  # a tie in magnitude: the first sets q4_0's sign
    x[5, 1, 32:] = -np.abs(x[5, 1, 32:]) - 1.0  # every value of a block negative
    want_q, want_d = _quantized(kind, x)
    half = N.QUANT[kind].per_element
    q, d = np.empty((4, 300, 64 // half), want_q.dtype), np.empty((4, 300, 2), np.uint16)  # (heads, positions, d)
    N.quant_encode(kind, x, q.transpose(1, 0, 2), d.transpose(1, 0, 2))
    np.testing.assert_array_equal(q.transpose(1, 0, 2), want_q)
    np.testing.assert_array_equal(d.transpose(1, 0, 2), want_d.view(np.uint16))
    with np.errstate(invalid="ignore"):  # an inf scale times 0 is NaN in both
        want = QUANT_KERNELS[kind][1](np, want_q, want_d, np.empty(x.shape, np.float32))
    got = N.quant_decode(kind, q.transpose(1, 0, 2), d.transpose(1, 0, 2), np.empty(x.shape, np.float32))
    np.testing.assert_array_equal(got, want)


@needs_native
@pytest.mark.parametrize("kind", list(N.QUANT))
def test_quantized_wrappers_name_the_argument_they_refuse_and_touch_nothing(kind: str) -> None:
    per = N.QUANT[kind].per_element
    x, out = np.ones((2, 64), np.float32), np.full((2, 64), 7.0, np.float32)
    q, d = np.full((2, 64 // per), 3, N.QUANT[kind].values), np.full((2, 2), 5, np.uint16)
    a, w = np.ones((1, 2, 64), np.float32), np.ones((1, 2, 2), np.float32)
    refused = [
        (lambda: N.quant_encode(kind, x, q, d[:, :1]), "d has shape (2, 1), but should be (2, 2)"),
        (lambda: N.quant_encode(kind, x, q[:, :8], d), f"q has shape (2, 8), but should be (2, {64 // per})"),
        (lambda: N.quant_encode(kind, x[:, :48], q, d), "values of shape (2, 48) have 48 columns"),
        (lambda: N.quant_encode(kind, x.astype(np.float64), q, d), "x should be a NumPy array of float32"),
        (lambda: N.quant_encode(kind, x, q.astype(np.int16), d), "q should be a NumPy array of"),
        (lambda: N.quant_encode(kind, x, q, d.view(np.float16)), "d should be a NumPy array of uint16"),
        (lambda: N.quant_encode(kind, x, q, np.full((2, 4), 5, np.uint16)[:, ::2]), "d is not contiguous"),
        (lambda: N.quant_decode(kind, q, d, out[:, ::2]), "out is not contiguous"),
        (lambda: N.quant_decode(kind, np.full((2, 128 // per), 3, q.dtype)[:, ::2], d, out), "q is not contiguous"),
        (lambda: N.quant_decode(kind, q, d, out.astype(np.float16)), "out should be a NumPy array of float32"),
        (lambda: N.quant_dot(kind, a, q[None], d[None], np.empty((1, 2, 3), np.float32)), "out has shape (1, 2, 3)"),
        (lambda: N.quant_dot(kind, a, q, d[None], np.empty((1, 2, 2), np.float32)), "q has shape"),
        (lambda: N.quant_accumulate(kind, w, q[None], d[None, :1], out[None]), "d has shape (1, 1, 2)"),
        (lambda: N.quant_accumulate(kind, w[:, :, :1], q[None], d[None], out[None]), "q has shape (1, 2,"),
    ]
    _each_refused_in_one_line(refused)
    assert np.all(q == 3) and np.all(d == 5) and np.all(out == 7)


# ---------------------------------------------------------------- streamed writes, argument checks


@needs_native
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("offset", [0, 1])
def test_large_writes_stream_into_place_with_the_same_bits(kind: str, offset: int) -> None:
    """Writes past the native kernels' streaming size (64 KiB) go around the cache when the
    destination rows are 16-byte aligned (offset 0) and through it otherwise (offset 1 value):
    either way the stored bits are those of the small-write path, and nothing beside them moves."""
    rng = np.random.default_rng(11)
    n, heads, d = 300, 4, 64  # 300 x 4 x 64 x 2 bytes > 64 KiB
    x = (rng.standard_normal((n, heads, d)) * 3).astype(np.float32)
    x[5, 1, 7] = np.nan
    stored = N.STORED_DTYPES[kind]
    base = np.full(heads * (n + 2) * d + 8, 0x5A5A, stored) if stored.itemsize == 2 else \
        np.full(heads * (n + 2) * d + 8, -7.0, np.float32)
    store = base[offset:offset + heads * (n + 2) * d].reshape(heads, n + 2, d)
    slots = store[:, 1:n + 1].transpose(1, 0, 2)
    N.encode(kind, x, slots)
    want = np.empty((n, heads, d), stored)
    for i in range(0, n, 7):  # small writes: under the streaming size
        N.encode(kind, x[i:i + 7], want[i:i + 7])

    def bits(a: np.ndarray) -> np.ndarray:  # NaN payloads compared too
        return np.ascontiguousarray(a).view(np.uint16 if a.itemsize == 2 else np.uint32)

    assert np.array_equal(bits(slots), bits(want))
    assert np.array_equal(store[:, 0], np.full((heads, d), base[0])) and np.array_equal(store[:, -1], store[:, 0])
    cos, sin = K.rope_rows(np, SMALL.replace(head_dim=d), 0, n)
    N.rope_encode(kind, x, cos, sin, "neox", slots)
    for i in range(0, n, 7):
        N.rope_encode(kind, x[i:i + 7], cos[i:i + 7], sin[i:i + 7], "neox", want[i:i + 7])
    assert np.array_equal(bits(slots), bits(want))


@needs_native
def test_kernels_name_the_argument_they_refuse_and_touch_nothing() -> None:
    x = np.ones((4, 2, 8), np.float32)
    out = np.full((4, 2, 8), 7, np.uint16)
    cos, sin = np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32)
    a, b, acc = np.ones((2, 1, 8), np.float32), np.ones((2, 5, 8), np.uint16), np.zeros((2, 1, 8), np.float32)
    refused = [
        (lambda: N.rope_encode("float16", x, cos, sin, "neox", out[:3]), "out has shape (3, 2, 8)"),
        (lambda: N.rope_encode("float16", x, cos[:3], sin, "neox", out), "cos has shape (3, 4)"),
        (lambda: N.rope_encode("float16", x, cos, sin[:, :2], "neox", out), "sin has shape (4, 2)"),
        (lambda: N.rope_encode("float16", x, cos.astype(np.float64), sin, "neox", out), "cos should be"),
        (lambda: N.rope_encode("float16", x, np.asfortranarray(np.ones((4, 4), np.float32)), sin, "neox", out),
         "cos should be a C-contiguous"),
        (lambda: N.rope_encode("float16", x[:, :, ::2], cos[:, :2], sin[:, :2], "neox", out[:, :, :4]),
         "x is not contiguous"),
        (lambda: N.rope_encode("float16", x, cos, sin, "llama", out), "style is 'llama'"),
        (lambda: N.rope_encode("float16", x.astype(np.float16), cos, sin, "neox", out), "x should be"),
        (lambda: N.dot("float16", a, b[:, :, :4], np.empty((2, 1, 5), np.float32)), "b has shape (2, 5, 4)"),
        (lambda: N.dot("float16", a, b, np.empty((2, 1, 4), np.float32)), "out has shape (2, 1, 4)"),
        (lambda: N.dot("float16", a[0], b, np.empty((2, 1, 5), np.float32)), "a has shape (1, 8)"),
        (lambda: N.dot("float16", a, b.astype(np.float32), np.empty((2, 1, 5), np.float32)), "b should be"),
        (lambda: N.accumulate("float16", np.ones((2, 1, 4), np.float32), b, acc), "b has shape (2, 5, 8)"),
        (lambda: N.accumulate("float16", np.ones((2, 1, 5), np.float32), b, acc[:, :, :4]), "out has shape"),
        (lambda: N.encode("float16", x, out[:, :1]), "destination has shape (4, 1, 8)"),
    ]
    _each_refused_in_one_line(refused)
    assert np.all(out == 7) and np.all(acc == 0)


def _fill_inputs(n: int, heads: int, d: int, half: int) -> Tuple[np.ndarray, ...]:
    rng = np.random.default_rng(12)
    k = (rng.standard_normal((n, heads, d)) * 10.0 ** rng.uniform(-3, 3, (n, heads, d))).astype(np.float32)
    v = (rng.standard_normal((n, heads, d)) * 3).astype(np.float32)
    angles = rng.uniform(0, 1000, (n, half))
    return k, v, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@needs_native
@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("n,threads", [(1, 2), (7, 2), (7, 5), (300, 1), (300, 2), (300, 3)])
def test_fill_on_the_team_stores_what_rope_encode_and_encode_store(kind: str, style: str, n: int,
                                                                   threads: int) -> None:
    """One append split over the native team (positions per core, 300 x 4 x 64 values past the
    streaming size): the bits of the one-core kernels, in place, nothing beside them moved."""
    heads, d = 4, 64
    k, v, cos, sin = _fill_inputs(n, heads, d, 24)
    stored = N.STORED_DTYPES[kind]
    store_k, store_v = (np.full((heads, n + 2, d), 7, stored) for _ in range(2))
    N.fill(kind, k, v, cos, sin, style, store_k[:, 1:n + 1].transpose(1, 0, 2),
           store_v[:, 1:n + 1].transpose(1, 0, 2), threads)
    want_k, want_v = np.empty((n, heads, d), stored), np.empty((n, heads, d), stored)
    N.rope_encode(kind, k, cos, sin, style, want_k)
    N.encode(kind, v, want_v)
    np.testing.assert_array_equal(store_k[:, 1:n + 1].transpose(1, 0, 2), want_k)
    np.testing.assert_array_equal(store_v[:, 1:n + 1].transpose(1, 0, 2), want_v)
    for store in (store_k, store_v):
        assert np.all(store[:, 0] == 7) and np.all(store[:, -1] == 7)


@needs_native
def test_fill_names_the_argument_it_refuses_and_touches_nothing() -> None:
    k, v, cos, sin = _fill_inputs(4, 2, 8, 4)
    out_k, out_v = np.full((4, 2, 8), 7, np.uint16), np.full((4, 2, 8), 7, np.uint16)
    storage = np.full((2, 6, 8), 7, np.uint16)  # (heads, positions, d): other strides than out_k
    refused = [
        (lambda: N.fill("float16", k, v[:3], cos, sin, "neox", out_k, out_v, 2), "v has shape (3, 2, 8)"),
        (lambda: N.fill("float16", k, v, cos, sin, "neox", out_k, storage[:, :4].transpose(1, 0, 2), 2),
         "out_v has shape (4, 2, 8) and strides (16, 96, 2)"),
        (lambda: N.fill("float16", k, v.astype(np.float64), cos, sin, "neox", out_k, out_v, 2), "v should be"),
        (lambda: N.fill("float16", k, v, cos, sin, "neox", out_k, out_k, 2), "overlap"),
        (lambda: N.fill("float16", k, v, cos[:3], sin, "neox", out_k, out_v, 2), "cos has shape (3, 4)"),
        (lambda: N.fill("float16", k, v, cos, sin, "neox", out_k, out_v, 0), "threads=0"),
    ]
    _each_refused_in_one_line(refused)
    assert np.all(out_k == 7) and np.all(out_v == 7) and np.all(storage == 7)


@needs_native
def test_concurrent_fills_share_the_team_and_each_gets_its_bits() -> None:
    """Two callers at once: one has the team, the other does its whole append itself."""
    import threading

    k, v, cos, sin = _fill_inputs(300, 4, 64, 32)
    want_k, want_v = np.empty(k.shape, np.uint16), np.empty(v.shape, np.uint16)
    N.fill("float16", k, v, cos, sin, "neox", want_k, want_v, 1)
    wrong: list = []

    def caller() -> None:
        out_k, out_v = np.empty_like(want_k), np.empty_like(want_v)
        for _ in range(50):
            out_k.fill(0)
            out_v.fill(0)
            N.fill("float16", k, v, cos, sin, "neox", out_k, out_v, 2)
            if not (np.array_equal(out_k, want_k) and np.array_equal(out_v, want_v)):
                wrong.append(1)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a fill on the team did not return"
    assert not wrong


FORKED_FILL = """
import os, sys, time
import numpy as np
from pytest_longctx.backends import _native as N
k = np.ones((300, 4, 64), np.float32); v = 2 * k
cos, sin = np.ones((300, 32), np.float32), np.zeros((300, 32), np.float32)
out_k, out_v = np.empty(k.shape, np.uint16), np.empty(k.shape, np.uint16)
N.fill("float16", k, v, cos, sin, "neox", out_k, out_v, 2)  # the team's workers are running
pid = os.fork()
if pid == 0:
    out_k.fill(0); out_v.fill(0)
    N.fill("float16", k, v, cos, sin, "neox", out_k, out_v, 2)  # a new team in the child
    ok = (out_k == 0x3C00).all() and (out_v == 0x4000).all()
    os._exit(0 if ok else 3)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
print("the forked child hung in fill")
sys.exit(4)
"""


@needs_native
def test_a_forked_child_fills_with_a_team_of_its_own() -> None:
    """--longctx-isolate forks the process: the child has none of the parent's workers and
    must start its own, not wait on them."""
    done = subprocess.run([sys.executable, "-c", FORKED_FILL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
