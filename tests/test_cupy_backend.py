"""The cupy backend: option and availability handling everywhere, kernels on a real GPU.

Tests of the first kind run on any machine (a missing or broken CuPy is faked
through ``sys.modules``). Tests of the second kind compare the device kernels
with the numpy backend and the float64 reference, and are skipped with the
reason when no usable GPU is here.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from pytest_longctx import reference as ref
from pytest_longctx.access.registry import load_backend
from pytest_longctx.backends.cupy_backend import CupyBackend
from pytest_longctx.backends.numpy_backend import NumpyBackend
from pytest_longctx.errors import BackendUnavailable, ContextLimitExceeded, NotSupported, SpecError
from pytest_longctx.measure.preflight import cache_preflight
from pytest_longctx.spec import CacheSpec, RopeSpec

from _suite_runs import kv as _kv
from _suite_runs import run_suite, small_spec

# --- any machine ------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"device": -1}, "device=-1, but should be an integer >= 0"),
    ({"device": "x"}, "device='x'"),
    ({"attention": "fast"}, "attention='fast', but should be one of auto, kernel, blas"),
    ({"block": 0}, "block=0, but should be an integer >= 1"),
])
def test_bad_option_is_a_spec_error_before_cupy_is_imported(monkeypatch, options, message) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        CupyBackend(**options)


def test_missing_cupy_is_unavailable_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(BackendUnavailable, match=r"CuPy is not importable .*pytest-longctx\[gpu\]"):
        CupyBackend()


def _fake_cupy(count: Any) -> types.ModuleType:
    """A cupy whose runtime reports ``count`` devices, or raises it when it is an exception."""

    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count() -> int:
        if isinstance(count, type) and issubclass(count, BaseException) or isinstance(count, BaseException):
            raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return count

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return cupy


def test_driver_error_is_unavailable_with_the_driver_message(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(RuntimeError))
    with pytest.raises(BackendUnavailable, match="no usable CUDA device .*cudaErrorInsufficientDriver"):
        CupyBackend()


def test_no_device_is_unavailable(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    with pytest.raises(BackendUnavailable, match="no CUDA device is visible"):
        CupyBackend()


def test_device_index_past_the_last_gpu_names_the_count(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    with pytest.raises(SpecError, match=r"device=7, but this machine has 1 CUDA device\(s\): 0..0"):
        CupyBackend(device=7)


def test_gpu_alias_is_unavailable_naming_cupy(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendUnavailable, match="no gpu backend is available .*cupy: CuPy is not importable"):
        load_backend("gpu")


def test_suite_on_gpu_without_one_skips_every_case_with_the_reason(pytester, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    result = run_suite(pytester, "gpu", "-rs", shape="n_layers=2,n_heads=4,n_kv_heads=2,head_dim=64", module=None)
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("skipped", 0) > 0 and set(outcomes) <= {"skipped", "warnings", "deselected"}
    result.stdout.fnmatch_lines(["*backend 'gpu' unavailable: no gpu backend is available (cupy: CuPy is not*"])


# --- a real GPU -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu() -> CupyBackend:
    try:
        return CupyBackend()
    except BackendUnavailable as exc:
        pytest.skip(f"no usable GPU: {exc}")


def _spec(kv_dtype: str = "float32", positions: int = 3000, **fields: Any) -> CacheSpec:
    return small_spec(kv_dtype, positions, **fields)


def _both(gpu: CupyBackend, spec: CacheSpec, n: int, chunk: int = 701, seed: int = 0):
    """The same n positions appended in chunks to a GPU cache and a CPU cache."""
    k, v = _kv(spec, n, seed)
    caches = gpu.open_cache(spec), NumpyBackend(threads=1).open_cache(spec)
    for layer in range(spec.n_layers):
        for a in range(0, n, chunk):
            caches[0].append(layer, gpu.asarray(k[a:a + chunk]), gpu.asarray(v[a:a + chunk]))
            caches[1].append(layer, k[a:a + chunk], v[a:a + chunk])
    return caches, k, v


ROPES = {
    "neox": RopeSpec(theta=10000.0),
    "gptj": RopeSpec(theta=10000.0, style="gptj"),
    "partial": RopeSpec(theta=10000.0, rotary_dim=32),
    "yarn": RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=512),
    "none": RopeSpec(kind="none"),
}


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_stored_bytes_equal_the_cpu_backends(gpu, kv_dtype, rope) -> None:
    """The store kernel rounds as the CPU kernels do: the same K and V, bit for bit."""
    spec = _spec(kv_dtype, rope=ROPES[rope])
    (device, host), _, _ = _both(gpu, spec, 3000)
    for layer in range(spec.n_layers):
        for got, want in zip(device.read(layer, 0, 3000), host.read(layer, 0, 3000)):
            np.testing.assert_array_equal(gpu.to_numpy(got), want)


def test_q8_0_reads_equal_the_cpu_backends(gpu) -> None:
    spec = _spec("q8_0")
    (device, host), _, _ = _both(gpu, spec, 2000)
    for got, want in zip(device.read(1, 0, 2000), host.read(1, 0, 2000)):
        np.testing.assert_array_equal(gpu.to_numpy(got), want)


def _truth(cache, gpu, layer: int, q: np.ndarray) -> np.ndarray:
    """float64 attention of q over what the cache holds."""
    spec = cache.spec
    length, n_q = cache.length(layer), q.shape[0]
    k, v = (gpu.to_numpy(x).astype(np.float64) for x in cache.read(layer, 0, length))
    q_rot = ref.apply_rope(q, np.arange(length - n_q, length), spec)
    return ref.attention(q_rot, k, v, spec)


FEATURES = {
    "gqa4": dict(n_heads=8, n_kv_heads=2),
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa8": dict(n_heads=16, n_kv_heads=2),
    "window": dict(sliding_window=700),
    "softcap": dict(softcap=30.0),
    "scale": dict(softmax_scale=0.05),
    "d128": dict(head_dim=128, n_heads=4, n_kv_heads=1),
    "d80": dict(head_dim=80),
}


@pytest.mark.parametrize("mode", ["kernel", "blas"])
@pytest.mark.parametrize("n_q", [1, 3, 16])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "q8_0"])
def test_attention_matches_the_float64_truth(gpu, kv_dtype, feature, n_q, mode) -> None:
    if kv_dtype == "q8_0" and FEATURES[feature].get("head_dim", 64) % 32:
        pytest.skip("q8_0 blocks are 32 values")
    spec = _spec(kv_dtype, positions=5000, **FEATURES[feature])
    backend = CupyBackend(attention=mode)
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 4500)
    for a in range(0, 4500, 1000):
        cache.append(0, backend.asarray(k[a:a + 1000]), backend.asarray(v[a:a + 1000]))
    q = np.random.default_rng(1).standard_normal((n_q, spec.n_heads, spec.head_dim)).astype(np.float32) * 3
    got = backend.to_numpy(cache.attend(0, backend.asarray(q)))
    want = _truth(cache, backend, 0, q)
    assert got.shape == (n_q, spec.n_heads, spec.head_dim) and got.dtype == np.float32
    error = np.abs(got - want).max()
    assert error <= 2e-5 * max(1.0, np.abs(want).max()), f"max error {error:.3g} ({feature}, n_q={n_q}, {mode})"


def test_kernel_and_blas_paths_agree_at_depth(gpu) -> None:
    spec = _spec("float16", positions=70000, n_layers=1)
    cache = gpu.open_cache(spec)
    k, v = _kv(spec, 8192)
    for a in range(0, 70000, 8192):
        n = min(8192, 70000 - a)
        cache.append(0, gpu.asarray(k[:n]), gpu.asarray(v[:n]))
    q = gpu.asarray(np.random.default_rng(2).standard_normal((1, spec.n_heads, spec.head_dim)).astype(np.float32))
    by_kernel = gpu.to_numpy(cache._attend_kernel(0, q, 70000))
    by_blas = gpu.to_numpy(cache._attend_blas(0, q, 70000))
    np.testing.assert_allclose(by_kernel, by_blas, atol=2e-5)


def test_one_position_past_the_limit_raises_and_changes_nothing(gpu) -> None:
    spec = _spec("float16", positions=1000)
    cache = gpu.open_cache(spec)
    k, v = _kv(spec, 1001)
    cache.append(0, gpu.asarray(k[:1000]), gpu.asarray(v[:1000]))
    before = [gpu.to_numpy(x) for x in cache.read(0, 0, 1000)]
    with pytest.raises(ContextLimitExceeded):
        cache.append(0, gpu.asarray(k[1000:]), gpu.asarray(v[1000:]))
    assert cache.length(0) == 1000
    for got, want in zip(cache.read(0, 0, 1000), before):
        np.testing.assert_array_equal(gpu.to_numpy(got), want)


def test_wrong_input_shape_is_a_one_line_value_error(gpu) -> None:
    cache = gpu.open_cache(_spec())
    with pytest.raises(ValueError, match=r"k has shape \(4, 3, 64\), but should be \('n', 2, 64\)"):
        cache.append(0, gpu.asarray(np.zeros((4, 3, 64), np.float32)), gpu.asarray(np.zeros((4, 2, 64), np.float32)))


def test_memory_in_use_grows_by_the_analytic_size(gpu) -> None:
    spec = _spec("float16", positions=65536, n_layers=4, n_kv_heads=8, head_dim=128)
    gpu.release_pool()
    before = gpu.memory_in_use()
    cache = gpu.open_cache(spec)
    held = gpu.memory_in_use() - before
    assert cache.nbytes() == spec.kv_bytes(spec.max_positions)
    assert spec.kv_bytes(spec.max_positions) <= held <= spec.kv_bytes(spec.max_positions) * 1.05 + (8 << 20)
    cache.close()
    assert gpu.memory_in_use() - before <= 8 << 20


def test_cache_larger_than_the_device_is_refused_before_allocating(gpu) -> None:
    free = gpu.memory_available()
    positions = 131072
    per_position = CacheSpec(1, 32, 32, 128, 1, kv_dtype="float32").kv_bytes(1)
    layers = free // (per_position * positions) + 2
    spec = CacheSpec(int(layers), 32, 32, 128, positions, kv_dtype="float32")
    reason = cache_preflight(gpu, spec)
    assert reason is not None and "of gpu memory" in reason and "free" in reason


def test_unsupported_dtype_and_head_dim_are_not_supported(gpu) -> None:
    with pytest.raises(NotSupported, match="not bfloat16"):
        gpu.open_cache(_spec("bfloat16"))
    with pytest.raises(NotSupported, match="head_dim=72"):
        gpu.open_cache(_spec(head_dim=72))


def test_bandwidth_probe_measures_the_device(gpu) -> None:
    found = gpu.bandwidth(nbytes=256 << 20, repeats=3)
    assert found.copy_gbps > 50 and found.read_gbps > 50 and found.nbytes > 0


def test_matmul_probe_measures_the_tensor_cores(gpu) -> None:
    flops, method = gpu.matmul_flops(size=2048, repeats=3)
    assert flops > 5e12 and "float16 matmul 2048x2048x2048" in method  # any tensor-core GPU of note


def test_info_names_the_device_and_versions(gpu) -> None:
    info = gpu.info()
    assert info.device_kind == "gpu" and info.device_name and {"cupy", "driver", "cuda runtime"} <= set(info.versions)
