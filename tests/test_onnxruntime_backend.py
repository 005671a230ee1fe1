"""The onnxruntime backend against the contract and the float64 reference, and the suite on it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pytest_longctx import reference as ref  # noqa: E402
from pytest_longctx.access.registry import load_backend  # noqa: E402
from pytest_longctx.backends import onnxruntime_backend as O  # noqa: E402
from pytest_longctx.errors import BackendUnavailable, NotSupported, SpecError  # noqa: E402
from pytest_longctx.protocol import KVBackend, KVCache  # noqa: E402
from pytest_longctx.spec import CacheSpec, RopeSpec  # noqa: E402

from _suite_runs import FLOORS_OFF, ROPES, check_refuses_when_full, failing_import, run_suite  # noqa: E402
from _suite_runs import kv as _kv  # noqa: E402

SMALL = CacheSpec(3, 8, 2, 64, 300, kv_dtype="float32", rope=RopeSpec(theta=10000.0))
# Stored K against the float64 rotation: float32 rounding; in float16 the op rounds its inputs,
# cos/sin and the rotated result to float16 (two float16 quanta of |K| <= ~4).
K_TOL = {"float32": dict(rtol=0, atol=2e-6), "float16": dict(rtol=2.0**-9, atol=2.0**-9)}



@pytest.fixture(scope="module")
def backend() -> O.OnnxRuntimeBackend:
    return O.OnnxRuntimeBackend()


# --- options and availability ---

@pytest.mark.parametrize("text, message", [
    ("onnxruntime[ep=]", "option 'ep=' is not key=value; accepted keys: ep, compute, threads, device_id"),
    ("onnxruntime[bogus=1]", "unexpected keyword argument 'bogus'; accepted keys: ep, compute, threads, device_id"),
    ("onnxruntime[ep=CPU]", "ep='CPU', but should be an execution provider name"),
    ("onnxruntime[compute=half]", "compute='half', but should be one of cache, float32 (accepted keys: ep,"),
    ("onnxruntime[threads=0]", "threads=0, but should be a positive integer"),
    ("onnxruntime[device_id=-1]", "device_id=-1, but should be a non-negative integer"),
])
def test_malformed_option_is_a_spec_error_naming_the_keys(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_backend(text)
    assert message in str(info.value)


def test_missing_provider_is_unavailable_and_named() -> None:
    with pytest.raises(BackendUnavailable, match="has no QNNExecutionProvider .*installed: .*CPUExecutionProvider"):
        load_backend("onnxruntime[ep=QNNExecutionProvider]")


def test_missing_onnxruntime_is_unavailable_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    failing_import(monkeypatch, ImportError("No module named 'onnxruntime'"), "onnxruntime")
    with pytest.raises(BackendUnavailable, match=r"pip install 'pytest-longctx\[onnxruntime\]'"):
        O.OnnxRuntimeBackend()


def test_info_names_provider_version_and_device_kind(backend: O.OnnxRuntimeBackend) -> None:
    import onnxruntime

    assert isinstance(backend, KVBackend)
    info = backend.info()
    assert info.name == "onnxruntime" and info.device_kind == "cpu"
    assert info.versions["onnxruntime"] == onnxruntime.__version__
    assert info.versions["ep"] == "CPUExecutionProvider" and "CPUExecutionProvider" in info.device_name
    assert "float32" in info.kv_dtypes
    assert backend.memory_in_use() is None and backend.synchronize() is None


# --- what the op cannot hold ---

@pytest.mark.parametrize("kv_dtype", ["q8_0", "q4_0", "fp8_e4m3"])
def test_block_and_fp8_formats_are_not_supported(backend: O.OnnxRuntimeBackend, kv_dtype: str) -> None:
    with pytest.raises(NotSupported, match=f"not {kv_dtype}"):
        backend.open_cache(SMALL.replace(kv_dtype=kv_dtype, head_dim=64))


def test_a_cache_type_the_provider_lacks_is_not_supported_with_ort_message(backend: O.OnnxRuntimeBackend) -> None:
    if "bfloat16" in backend.info().kv_dtypes:
        pytest.skip("this provider implements a bfloat16 cache")
    with pytest.raises(NotSupported, match="compute=float32|cannot build GroupQueryAttention"):
        backend.open_cache(SMALL.replace(kv_dtype="bfloat16"))
    with pytest.raises(NotSupported, match="cannot build GroupQueryAttention .*NOT_IMPLEMENTED"):
        O.OnnxRuntimeBackend(compute="float32").open_cache(SMALL.replace(kv_dtype="bfloat16"))


def test_a_session_that_fails_to_build_is_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in an onnxruntime too old for the op: ORT's message, and nothing raised but NotSupported."""
    real = O.build_model

    def without_the_op(onnx, config):  # type: ignore[no-untyped-def]
        model = onnx.load_from_string(real(onnx, config))
        model.graph.node[0].op_type = "GroupQueryAttentionFromTheFuture"
        return model.SerializeToString()

    monkeypatch.setattr(O, "build_model", without_the_op)
    with pytest.raises(NotSupported, match="cannot build GroupQueryAttention.*GroupQueryAttentionFromTheFuture"):
        O.OnnxRuntimeBackend().open_cache(SMALL)


# --- the cache against the reference ---

@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
def test_stored_k_is_the_reference_rotation(backend: O.OnnxRuntimeBackend, rope: str, kv_dtype: str) -> None:
    spec = SMALL.replace(rope=ROPES[rope], kv_dtype=kv_dtype)
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 290)
    for layer in range(spec.n_layers):
        for a, b in ((0, 3), (3, 4), (4, 290)):  # a chunk, one position, a chunk longer than a store step
            cache.append(layer, k[a:b], v[a:b])
    got_k, got_v = cache.read(2, 0, 290)
    np.testing.assert_allclose(got_k, ref.apply_rope(k, np.arange(290), spec), **K_TOL[kv_dtype])
    np.testing.assert_array_equal(got_v, ref.stored_v(v, spec))
    assert all(np.array_equal(a, b) for a, b in zip(cache.read(0, 0, 290), (got_k, got_v)))


@pytest.mark.parametrize("compute", ["cache", "float32"])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "scale", "mqa"])
def test_attend_matches_the_reference(compute: str, kv_dtype: str, feature: str) -> None:
    spec = SMALL.replace(kv_dtype=kv_dtype, **{
        "plain": {}, "window": {"sliding_window": 37}, "softcap": {"softcap": 5.0},
        "scale": {"softmax_scale": 0.3}, "mqa": {"n_kv_heads": 1},
    }[feature])
    cache = O.OnnxRuntimeBackend(compute=compute).open_cache(spec)
    k, v = _kv(spec, 290)
    cache.append(1, k[:200], v[:200])
    cache.append(1, k[200:], v[200:])
    before = cache.read(1, 0, 290)
    k_true, v_true = ref.apply_rope(k, np.arange(290), spec), v.astype(np.float64)
    q = np.random.default_rng(1).standard_normal((16, spec.n_heads, spec.head_dim)).astype(np.float32)
    for n_q in (1, 16):
        got = cache.attend(1, q[:n_q])
        assert got.shape == (n_q, spec.n_heads, spec.head_dim) and got.dtype == np.float32
        truth = ref.attention(ref.apply_rope(q[:n_q], np.arange(290 - n_q, 290), spec), k_true, v_true, spec)
        np.testing.assert_allclose(got, truth, rtol=0, atol=2e-5 if kv_dtype == "float32" else 4e-3)
    # attend writes the last positions again: with the same values.
    assert all(np.array_equal(a, b) for a, b in zip(before, cache.read(1, 0, 290)))


def test_stores_touch_only_their_rows(backend: O.OnnxRuntimeBackend) -> None:
    spec = SMALL.replace(n_layers=2, max_positions=16)
    cache = backend.open_cache(spec)
    assert cache._in_place
    cache._host[...] = 5.0
    k, v = _kv(spec, 3)
    cache.append(1, k, v)
    cache.append(0, k[:1], v[:1])
    values = 4 * cache._layer_values  # K and V of two layers
    stored = cache._host[:values].reshape(2, 2, spec.n_kv_heads, 16, spec.head_dim)
    written = np.zeros(stored.shape, bool)
    written[:, 1, :, :3] = written[:, 0, :, :1] = True
    assert np.all(stored[~written] == 5.0) and not np.any(stored[written] == 5.0)
    assert np.all(cache._host[values:] == 5.0)  # the slack block


def test_float32_inputs_beside_a_float16_cache_fall_back_to_whole_layer_stores() -> None:
    """ONNX Runtime 1.32's CPU kernel zeroes rows past the end in this mode (docs/findings.md)."""
    cache = O.OnnxRuntimeBackend(compute="float32").open_cache(SMALL.replace(kv_dtype="float16"))
    assert not cache._in_place
    k, v = _kv(SMALL, 50)
    cache.append(0, k, v)
    np.testing.assert_allclose(cache.read(0, 0, 50)[0], ref.apply_rope(k, np.arange(50), SMALL),
                               **K_TOL["float16"])


def test_full_cache_refuses_and_changes_nothing(backend: O.OnnxRuntimeBackend) -> None:
    spec = SMALL.replace(max_positions=40)
    cache = backend.open_cache(spec)
    check_refuses_when_full(cache)


def test_bad_calls_are_value_errors(backend: O.OnnxRuntimeBackend) -> None:
    cache = backend.open_cache(SMALL)
    assert isinstance(cache, KVCache)
    k, v = _kv(SMALL, 20)
    cache.append(0, k, v)
    q = np.zeros((O.TAIL + 1, SMALL.n_heads, SMALL.head_dim), np.float32)
    with pytest.raises(ValueError, match="n_q=17, but should be between 1 and min"):
        cache.attend(0, q)
    with pytest.raises(ValueError, match="layer=3"):
        cache.append(3, k, v)
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="read"):
        cache.read(0, 0, 21)
    cache.close()
    assert cache.nbytes() == 0
    with pytest.raises(ValueError, match="closed"):
        cache.append(0, k, v)


def test_nbytes_is_the_bound_buffer(backend: O.OnnxRuntimeBackend) -> None:
    for kv_dtype in ("float32", "float16"):
        spec = SMALL.replace(kv_dtype=kv_dtype)
        slack = spec.max_positions * spec.head_dim * (4 if kv_dtype == "float32" else 2)
        assert backend.open_cache(spec).nbytes() == spec.kv_bytes(spec.max_positions) + slack


# --- the suite on this backend ---


def test_the_suite_passes_on_the_cpu_provider(pytester: pytest.Pytester) -> None:
    """What `pytest` runs on the backend: every question, both cache types, a small shape."""
    result = run_suite(pytester, "onnxruntime", "--longctx-profile=onnxruntime-cpu", *FLOORS_OFF, positions="2048")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-4000:]
    assert outcomes.get("passed", 0) >= 20 and "xfailed" not in outcomes, outcomes  # the profile excuses nothing
    ran = outcomes.get("passed", 0) + outcomes.get("xfailed", 0) + outcomes.get("xpassed", 0)
    assert ran >= 40 and outcomes.get("skipped", 0) == 0, outcomes
    result.stdout.fnmatch_lines(["*longctx: backend onnxruntime on cpu*"])


def test_an_absent_provider_skips_every_case_with_the_reason(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "onnxruntime[ep=QNNExecutionProvider]", "-rs", module="test_limits.py",
                       positions="256")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 1 and "passed" not in outcomes and "failed" not in outcomes
    result.stdout.fnmatch_lines(["*unavailable: onnxruntime * has no QNNExecutionProvider*"])
