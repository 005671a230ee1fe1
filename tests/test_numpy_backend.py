"""The numpy backend and its kernels against the contract and the float64 reference."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from pytest_longctx import reference as ref
from pytest_longctx.access.registry import load_backend
from pytest_longctx.backends import _kernels as K
from pytest_longctx.backends import _native as N
from pytest_longctx.backends.numpy_backend import KV_DTYPES, NumpyBackend
from pytest_longctx.errors import ContextLimitExceeded, NotSupported, SpecError
from pytest_longctx.protocol import KVBackend, KVCache
from pytest_longctx.rope import rope_frequencies
from pytest_longctx.spec import CacheSpec, RopeSpec

from _suite_runs import FLOORS_OFF, run_suite
from _suite_runs import ROPES as SHARED_ROPES
from _suite_runs import kv as _kv

SMALL = CacheSpec(2, 4, 2, 64, 300, kv_dtype="float32", rope=RopeSpec(theta=10000.0))
# Largest error of a stored value over |value|: half a quantum; q8_0 is checked per block.
STORAGE_RTOL = {"float32": 2e-6, "float16": 2.0**-11, "bfloat16": 2.0**-8}

# The pairing-independent cases: gptj pairing is the kernels' own test below.
ROPES: Dict[str, RopeSpec] = {name: rope for name, rope in SHARED_ROPES.items() if "gptj" not in name}


@pytest.fixture(autouse=True, params=["native", "numpy"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: with the native kernels (where they build) and with the NumPy ones."""
    if request.param == "native" and not N.available():
        pytest.skip(f"native kernels unavailable: {N.reason()}")
    if request.param == "numpy":
        monkeypatch.setattr(N, "_lib", None)
        monkeypatch.setattr(N, "_reason", "off for this test")
    return request.param


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _filled(spec: CacheSpec, n: int, chunk: int = 97, seed: int = 0, **options: Any) -> Tuple[KVCache, np.ndarray, np.ndarray]:
    """A cache with every layer holding the same n positions, appended in chunks."""
    cache = NumpyBackend(**options).open_cache(spec)
    k, v = _kv(spec, n, seed)
    for layer in range(spec.n_layers):
        for a in range(0, n, chunk):
            cache.append(layer, k[a : a + chunk], v[a : a + chunk])
    return cache, k, v


def _truth_over_stored(cache: KVCache, layer: int, q: np.ndarray) -> np.ndarray:
    """float64 attention of q (rotated in float64) over the K and V the cache says it holds."""
    spec = cache.spec
    length, n_q = cache.length(layer), q.shape[0]
    k, v = cache.read(layer, 0, length)
    q_rot = ref.apply_rope(q, np.arange(length - n_q, length), spec)
    return ref.attention(q_rot, k, v, spec)


def _assert_close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    err = float(np.max(np.abs(got - want)))
    assert err <= atol, f"{what}: max |error|={err:.3g}, but should be <= {atol:.3g}"


# ---------------------------------------------------------------- backend


def test_backend_satisfies_protocol_and_describes_cpu(kernels: str) -> None:
    backend = NumpyBackend()
    assert isinstance(backend, KVBackend) and backend.name == "numpy"
    info = backend.info()
    assert info.name == "numpy" and info.device_kind == "cpu" and info.device_name
    assert info.kv_dtypes == ("float32", "float16", "bfloat16", "q8_0", "q4_0")
    assert info.versions["numpy"] == np.__version__ and info.max_positions is None
    assert info.versions["kernels"] == ("native" if kernels == "native" else "numpy (off for this test)")
    assert isinstance(backend.open_cache(SMALL), KVCache)
    x = np.arange(3.0)
    assert backend.to_numpy(backend.asarray(x)) is x
    assert backend.synchronize() is None and backend.memory_in_use() is None


def test_options() -> None:
    assert NumpyBackend(block=16, threads=1).block == 16
    with pytest.raises(TypeError):
        NumpyBackend(bogus=1)  # type: ignore[call-arg]
    assert NumpyBackend().block is None and NumpyBackend(native=False).native is False
    for bad in ({"block": 0}, {"block": 1.5}, {"threads": 0}, {"native": "yes"}, {"prepare": "later"}):
        with pytest.raises(SpecError):
            NumpyBackend(**bad)
    assert load_backend("numpy[block=32]").block == 32  # type: ignore[attr-defined]
    with pytest.raises(SpecError, match="does not take"):
        load_backend("numpy[bogus=1]")


def test_storage_is_prepared_at_open_or_a_layer_at_its_first_write(kernels: str) -> None:
    """prepare="open" zeroes every page at open, so a fill never pays a page fault;
    prepare="write" zeroes a layer on its first append and leaves the others untouched."""
    if kernels != "native":
        pytest.skip("preparation does not depend on the kernels; 256 MiB of first touches once is enough")
    import psutil

    from pytest_longctx.measure.memory import release_free_memory

    spec = CacheSpec(2, 2, 2, 64, 65536, kv_dtype="float32", rope=RopeSpec(theta=10000.0))
    layer = spec.kv_bytes(spec.max_positions) // 2  # 64 MiB per layer (K and V)
    process = psutil.Process()
    for prepare, at_open in (("open", 2 * layer), ("write", 0)):
        release_free_memory()
        before = process.memory_info().rss
        cache = NumpyBackend(threads=2, prepare=prepare).open_cache(spec)
        opened = process.memory_info().rss - before
        assert abs(opened - at_open) < 16 << 20, (prepare, opened)
        cache.append(1, *_kv(spec, 1))
        written = process.memory_info().rss - before
        assert abs(written - max(at_open, layer)) < 16 << 20, (prepare, written)
        assert np.all(cache._k.data[1, :, 1:] == 0) and np.all(cache._v.data[1, :, 1:] == 0)  # type: ignore
        cache.close()
        del cache


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3"])
def test_unsupported_storage_is_refused(kv_dtype: str) -> None:
    with pytest.raises(NotSupported, match=kv_dtype):
        NumpyBackend().open_cache(SMALL.replace(kv_dtype=kv_dtype))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_storage_is_preallocated_to_the_analytic_size(kv_dtype: str) -> None:
    spec = SMALL.replace(kv_dtype=kv_dtype)
    cache = NumpyBackend().open_cache(spec)
    assert cache.nbytes() == spec.kv_bytes(spec.max_positions)
    cache.append(0, *_kv(spec, 10))
    assert cache.nbytes() == spec.kv_bytes(spec.max_positions)
    cache.close()
    assert cache.nbytes() == 0
    with pytest.raises(ValueError, match="closed"):
        cache.append(0, *_kv(spec, 1))


# ---------------------------------------------------------------- limits


def test_exactly_max_positions_fit_and_one_more_changes_nothing() -> None:
    spec = SMALL.replace(max_positions=64)
    cache, k, v = _filled(spec, 64, chunk=16)
    assert [cache.length(layer) for layer in range(spec.n_layers)] == [64, 64]
    before = cache.read(0, 0, 64)
    with pytest.raises(ContextLimitExceeded) as info:
        cache.append(0, *_kv(spec, 1, seed=1))
    assert (info.value.layer, info.value.length, info.value.requested, info.value.max_positions) == (0, 64, 1, 64)
    assert cache.length(0) == 64
    for got, want in zip(cache.read(0, 0, 64), before):
        np.testing.assert_array_equal(got, want)
    assert np.all(np.isfinite(cache.attend(0, _rng().standard_normal((64, 4, 64)))))


def test_a_chunk_crossing_the_limit_changes_nothing() -> None:
    spec = SMALL.replace(max_positions=40, kv_dtype="float16")
    cache, _, _ = _filled(spec, 37, chunk=37)
    before = cache.read(1, 0, 37)
    with pytest.raises(ContextLimitExceeded) as info:
        cache.append(1, *_kv(spec, 5, seed=2))
    assert (info.value.length, info.value.requested) == (37, 5)
    assert cache.length(1) == 37
    for got, want in zip(cache.read(1, 0, 37), before):
        np.testing.assert_array_equal(got, want)
    cache.append(1, *_kv(spec, 3, seed=3))  # what fits still fits
    assert cache.length(1) == 40


def test_malformed_calls_say_what_was_expected() -> None:
    cache, _, _ = _filled(SMALL, 20)
    k, v = _kv(SMALL, 4)
    with pytest.raises(ValueError, match=r"\(4, 3, 64\).*\('n', 2, 64\)"):
        cache.append(0, k[:, :, :].repeat(2, axis=1)[:, :3], v)
    with pytest.raises(ValueError, match="positions"):
        cache.append(0, k, v[:3])
    with pytest.raises(ValueError, match="layer"):
        cache.append(2, k, v)
    with pytest.raises(ValueError, match="n_q"):
        cache.attend(0, np.zeros((21, 4, 64), np.float32))
    with pytest.raises(ValueError, match=r"\(1, 2, 64\).*\('n', 4, 64\)"):
        cache.attend(0, np.zeros((1, 2, 64), np.float32))
    for start, stop in ((-1, 3), (5, 4), (0, 21)):
        with pytest.raises(ValueError, match="start"):
            cache.read(0, start, stop)
    cache.append(0, k[:0], v[:0])  # an empty append is allowed and changes nothing
    assert cache.length(0) == 20


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_v_reads_back_exactly_as_the_storage_type_holds_it(kv_dtype: str) -> None:
    spec = SMALL.replace(kv_dtype=kv_dtype)
    cache, _, v = _filled(spec, 200, chunk=64)
    _, got = cache.read(1, 0, 200)
    assert got.dtype == np.float32 and got.shape == (200, 2, 64)
    np.testing.assert_array_equal(got, ref.roundtrip(v, kv_dtype))
    np.testing.assert_array_equal(cache.read(1, 50, 70)[1], got[50:70])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_k_is_stored_rotated_at_its_positions(kv_dtype: str) -> None:
    spec = SMALL.replace(kv_dtype=kv_dtype, max_positions=4096)
    cache = NumpyBackend().open_cache(spec)
    k, v = _kv(spec, 8)
    cache.append(0, np.zeros((4000, 2, 64), np.float32), np.zeros((4000, 2, 64), np.float32))
    cache.append(0, k, v)
    got, _ = cache.read(0, 4000, 4008)
    truth = ref.apply_rope(k, np.arange(4000, 4008), spec)
    if kv_dtype == "q8_0":  # within half a step of the block's scale, plus the scale's rounding
        step = np.abs(truth).reshape(8, 2, 2, 32).max(axis=-1, keepdims=True) / 127
        err = np.abs(got - truth).reshape(8, 2, 2, 32)
        assert np.all(err <= 0.53 * step + 1e-6)
    elif kv_dtype == "q4_0":  # a step is max/8; the side opposite the max clamps at 7 steps (error
        # up to one step), the rest round to half a step; plus the scale's rounding (7 of 2**-11)
        step = np.abs(truth).reshape(8, 2, 2, 32).max(axis=-1, keepdims=True) / 8
        err = np.abs(got - truth).reshape(8, 2, 2, 32)
        assert np.all(err <= (1 + 7 * 2.0**-11) * step + 1e-6)
        assert np.mean(err <= 0.5 * (1 + 8 * 2.0**-11) * step + 1e-6) > 0.9
    else:
        assert np.all(np.abs(got - truth) <= STORAGE_RTOL[kv_dtype] * np.abs(truth) + 1e-6)


def test_float16_codec_rounds_every_case_like_ieee() -> None:
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float64)
    finite = np.unique(finite)
    midpoints = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
    specials = np.array([np.inf, -np.inf, np.nan, 65519.996, 65520.0, -65520.0, 1e30, -1e-30, 3e-8, -3e-8], np.float32)
    x = np.concatenate([
        finite.astype(np.float32), midpoints,
        np.nextafter(midpoints, np.float32(np.inf)), np.nextafter(midpoints, np.float32(-np.inf)),
        _rng().standard_normal(10000).astype(np.float32) * np.float32(1e-6), specials,
    ])
    bits = np.empty(x.shape, np.uint16)
    assert K.float16_encode(np, x, bits)  # inf and NaN are reported
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(bits[~nan], want[~nan].view(np.uint16))
    assert np.all(np.isnan(bits[nan].view(np.float16)))
    assert not K.float16_encode(np, np.float32([1.0, -65504.0]), np.empty(2, np.uint16))

    all_bits = np.arange(65536, dtype=np.uint16)
    decoded = np.empty(65536, np.float32)
    K.float16_decode(np, all_bits.view(np.int16), decoded)
    ok = np.isfinite(halves)
    np.testing.assert_array_equal(decoded[ok], halves[ok].astype(np.float32))
    K.float16_decode(np, all_bits.view(np.int16), decoded, scaled=True)
    np.testing.assert_array_equal(decoded[ok] * np.float64(2.0**K.HALF_EXPONENT), halves[ok].astype(np.float64))


def test_bfloat16_and_q8_0_codecs_match_the_reference() -> None:
    rng = _rng(1)
    x = (rng.standard_normal((64, 64)) * 10.0 ** rng.integers(-30, 30, (64, 64))).astype(np.float32)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    x[1, 5] = np.float32(np.frombuffer(np.uint32(0x7FFFFFFF).tobytes(), np.float32)[0])  # NaN, large payload
    bits = np.empty(x.shape, np.uint16)
    back = np.empty(x.shape, np.float32)
    K.bfloat16_decode(np, K.bfloat16_encode(np, x, bits), back)
    np.testing.assert_array_equal(back, ref.roundtrip(x, "bfloat16"))

    y = rng.standard_normal((50, 3, 64)).astype(np.float32)
    y[0, 0, :32] = 0.0  # an all-zero block
    y[1, 1, 7] = 0.5 * (y[1, 1].reshape(2, 32)[0].max())  # a value near a rounding tie
    q, d = np.empty(y.shape, np.int8), np.empty((50, 3, 2), np.float16)
    K.q8_0_encode(np, y, q, d)
    want_d, want_q = ref.quantize_q8_0(y)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(d, want_d)
    out = np.empty(y.shape, np.float32)
    np.testing.assert_array_equal(K.q8_0_decode(np, q, d, out), ref.roundtrip(y, "q8_0"))


@pytest.mark.parametrize("shape", [(32,), (5, 96), (3, 7, 64)])
def test_q4_0_codec_matches_the_reference(kernels: str, shape: Tuple[int, ...]) -> None:
    """The native codec, or the NumPy one, gives ggml's q4_0 bits as reference/quant.py does:
    odd shapes, all-zero blocks of either sign, a block whose largest magnitude is negative,
    a tie in magnitude (the first sets the scale's sign), values a rounding tie away."""
    rng = _rng(12)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(np.float32)
    flat = x.reshape(-1, 32)
    flat[0, 5] = -2 * np.abs(flat[0]).max()  # the block's max is negative
    if len(flat) > 3:
        flat[1], flat[2] = 0.0, -0.0
        flat[3] = np.linspace(-1.0, 1.0, 32, dtype=np.float32)
        flat[3, 4], flat[3, 20] = 3.0, -3.0  # a tie: d = -3/8 from the first
        flat[3, 7], flat[3, 8] = 1.5 * 0.375, 2.5 * 0.375  # x/d + 8.5 lands on an integer
    q = np.empty(shape[:-1] + (shape[-1] // 2,), np.uint8)
    d = np.empty(shape[:-1] + (shape[-1] // 32,), np.float16)
    out = np.empty(shape, np.float32)
    if kernels == "native":
        N.quant_encode("q4_0", x, q, d.view(np.uint16))
        N.quant_decode("q4_0", q, d.view(np.uint16), out)
    else:
        K.q4_0_encode(np, x, q, d)
        K.q4_0_decode(np, q, d, out)
    want_d, want_q = ref.quantize_q4_0(x)
    np.testing.assert_array_equal(q, want_q.reshape(q.shape))
    np.testing.assert_array_equal(d.view(np.uint16), want_d.view(np.uint16))  # the sign of a zero scale too
    np.testing.assert_array_equal(out, ref.roundtrip(x, "q4_0"))
    if len(flat) > 3:
        assert np.all(q.reshape(-1, 16)[1:3] == 0x88) and d.reshape(-1)[3] == np.float16(-0.375)


def test_float16_inf_and_nan_are_held_and_other_layers_stay_fast() -> None:
    spec = SMALL.replace(kv_dtype="float16")
    cache, _, _ = _filled(spec, 10)
    k, v = _kv(spec, 2, seed=5)
    v[0, 0, :3] = [1e6, -np.inf, np.nan]
    cache.append(0, k, v)
    _, got = cache.read(0, 10, 12)
    np.testing.assert_array_equal(got, ref.roundtrip(v, "float16"))
    q = _rng(6).standard_normal((1, 4, 64)).astype(np.float32)
    out = cache.attend(0, q)
    assert np.all(np.isfinite(out[:, 2:])) and not np.all(np.isfinite(out[:, :2]))  # KV head 0 only
    _assert_close(cache.attend(1, q), _truth_over_stored(cache, 1, q), 1e-5, "finite layer")


# ---------------------------------------------------------------- attention


CASES: Dict[str, Dict[str, Any]] = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=8, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "window": dict(sliding_window=37),
    "window-1": dict(sliding_window=1),
    "softcap": dict(softcap=2.0, softmax_scale=1.0),
    "scale": dict(softmax_scale=0.3),
}


@pytest.mark.parametrize("n_q", [1, 2, 45, 260])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_over_what_the_cache_holds(case: str, n_q: int) -> None:
    spec = SMALL.replace(**CASES[case])
    cache, _, _ = _filled(spec, 260, block=32)
    q = _rng(7).standard_normal((n_q, spec.n_heads, 64)).astype(np.float32) * 3
    got = cache.attend(1, q)
    assert got.dtype == np.float32 and got.shape == (n_q, spec.n_heads, 64)
    _assert_close(got, _truth_over_stored(cache, 1, q), 2e-5, f"{case} n_q={n_q}")


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("n_q", [1, 30])
def test_attention_end_to_end_is_as_good_as_plain_float32(kv_dtype: str, n_q: int) -> None:
    """Within 2x the error of the plain yardstick (FlashAttention's criterion) plus a floor."""
    spec = SMALL.replace(kv_dtype=kv_dtype, n_heads=8, sliding_window=100)
    cache, k, v = _filled(spec, 280, chunk=128)
    q = _rng(8).standard_normal((n_q, 8, 64)).astype(np.float32)
    truth = ref.attend(q, k, v, spec)
    plain_err = float(np.max(np.abs(ref.plain_attend(q, k, v, spec) - truth)))
    _assert_close(cache.attend(0, q), truth, 2 * plain_err + 1e-5, kv_dtype)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_every_rope_kind_and_style(rope: str, style: str) -> None:
    spec = SMALL.replace(max_positions=256, rope=dataclasses.replace(ROPES[rope], style=style))
    cache, k, v = _filled(spec, 256, chunk=100)
    got_k, _ = cache.read(0, 0, 256)
    truth_k = ref.apply_rope(k, np.arange(256), spec)
    assert np.all(np.abs(got_k - truth_k) <= 2e-6 * np.abs(truth_k).max() + 1e-7)
    q = _rng(9).standard_normal((3, 4, 64)).astype(np.float32)
    _assert_close(cache.attend(0, q), ref.attend(q, k, v, spec), 1e-5, f"{rope}/{style}")


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_chunking_threads_and_block_size_change_nothing_but_rounding(style: str) -> None:
    spec = SMALL.replace(kv_dtype="float16", n_heads=8, sliding_window=50, style=style)
    one, k, v = _filled(spec, 290, chunk=290, threads=1, block=1024)
    many, _, _ = _filled(spec, 290, chunk=7, threads=2, block=16)
    for a, b in zip(one.read(1, 0, 290), many.read(1, 0, 290)):
        np.testing.assert_array_equal(a, b)
    for n_q in (1, 60):
        q = _rng(10).standard_normal((n_q, 8, 64)).astype(np.float32)
        _assert_close(one.attend(1, q), many.attend(1, q), 2e-6, f"n_q={n_q}")


# ---------------------------------------------------------------- kernels


def test_attention_visits_only_the_keys_some_query_can_see() -> None:
    spec = SMALL.replace(sliding_window=40, n_heads=2, n_kv_heads=1)
    length = 250
    k, v = _kv(spec, length)
    seen: List[Tuple[int, int]] = []

    def load(start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        seen.append((start, stop))
        return k[start:stop].transpose(1, 0, 2), v[start:stop].transpose(1, 0, 2)

    for n_q, first_key in ((1, length - 40), (10, length - 49)):
        seen.clear()
        q = _rng(11).standard_normal((n_q, 2, 64)).astype(np.float32)
        grouped = K.group_queries(np, q, 1, spec.scale)
        K.attend_grouped(np, grouped, length, load, spec, block=16)
        assert seen[0][0] == first_key and seen[-1][1] == length
        assert sum(stop - start for start, stop in seen) == length - first_key


def test_rope_tables_fold_the_attention_factor_in() -> None:
    spec = SMALL.replace(max_positions=4096, rope=ROPES["yarn"])
    cos, sin = K.rope_rows(np, spec, 0, spec.max_positions)
    assert cos.dtype == np.float32 and cos.shape == (4096, 32)
    factor = rope_frequencies(spec).attention_factor
    angles = ref.rope_angles(np.arange(4096), rope_frequencies(spec).inv_freq)
    np.testing.assert_array_equal(cos, (np.cos(angles) * factor).astype(np.float32))
    np.testing.assert_array_equal(sin, (np.sin(angles) * factor).astype(np.float32))


def test_fallback_float16_encode_keeps_the_sign_of_nan() -> None:
    """The NumPy kernels store a positive NaN as NumPy's cast does (0x7E00), not as -NaN."""
    x = np.array([np.nan, -np.nan, 1.0, -1.0], np.float32)
    out = np.empty(x.shape, np.uint16)
    K.float16_encode(np, x.copy(), out)
    want = x.astype(np.float16).view(np.uint16)
    assert out[0] >> 15 == want[0] >> 15 == 0 and out[1] >> 15 == want[1] >> 15 == 1
    np.testing.assert_array_equal(out[2:], want[2:])


def test_rope_table_keeps_the_last_long_range_for_the_next_layer() -> None:
    """A chunk goes through every layer at the same positions: its rows are computed once."""
    spec = SMALL.replace(max_positions=20000)
    table = K.RopeTable(np, spec)
    first = table.rows(100, 9000)  # spans more blocks than are kept
    assert table.rows(100, 9000) is first
    want = K.rope_rows(np, spec, 100, 9000)
    np.testing.assert_array_equal(first[0], want[0])
    np.testing.assert_array_equal(first[1], want[1])
    other = table.rows(9000, 17900)
    assert other is not first
    np.testing.assert_array_equal(other[0], K.rope_rows(np, spec, 9000, 17900)[0])


# ---------------------------------------------------------------- the suite


def test_the_suite_passes_on_a_q4_0_cache(kernels: str, pytester: pytest.Pytester) -> None:
    """Every question at q4_0, a small shape, with the native kernels and with the NumPy ones:
    the suite's own q4_0 tolerances, the memory group's analytic size (18 bytes per 32 values)."""
    result = run_suite(pytester, "cpu", "--longctx-kv-dtype=q4_0", *FLOORS_OFF, positions="1024")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-4000:]
    assert outcomes.get("passed", 0) >= 30 and outcomes.get("skipped", 0) == 0, outcomes  # 34 here
    result.stdout.fnmatch_lines(["*q4_0*KV memory / analytic*"])
