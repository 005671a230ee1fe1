"""The openvino backend against the contract and the float64 reference, and the suite on it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from pytest_longctx import reference as ref  # noqa: E402
from pytest_longctx.access.registry import load_backend  # noqa: E402
from pytest_longctx.backends import openvino_backend as O  # noqa: E402
from pytest_longctx.errors import BackendUnavailable, ContextLimitExceeded, NotSupported, SpecError  # noqa: E402
from pytest_longctx.protocol import KVBackend, KVCache  # noqa: E402
from pytest_longctx.spec import CacheSpec, RopeSpec  # noqa: E402

from _suite_runs import FLOORS_OFF, check_refuses_when_full, failing_import, run_suite  # noqa: E402
from _suite_runs import kv as _kv  # noqa: E402

SMALL = CacheSpec(2, 8, 2, 64, 300, kv_dtype="float32", rope=RopeSpec(theta=10000.0))
FORMS = ("state", "static")
# Stored K against the float64 rotation: float32 rounding; a float16 cache rounds the rotated
# float32 value once more (one float16 quantum of |K| <= ~4 either way of the exact rounding).
K_TOL = {"float32": dict(rtol=0, atol=2e-6), "float16": dict(rtol=2.0**-10, atol=2.0**-10)}
# The in-graph rotation's cases (neox over the whole head is every other test's): no rotation,
# adjacent pairs over part of the head, and a scaled kind with an attention factor.
ROPES = {
    "none": RopeSpec(kind="none"),
    "partial-gptj": RopeSpec(theta=10000.0, rotary_dim=16, style="gptj"),
    "yarn": RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=64),
}


@pytest.fixture(scope="module", params=FORMS)
def backend(request: pytest.FixtureRequest) -> O.OpenVinoBackend:
    return O.OpenVinoBackend(form=request.param)


# --- options and availability ---

@pytest.mark.parametrize("text, message", [
    ("openvino[bogus=1]", "unexpected keyword argument 'bogus'; accepted keys: device, form, compute, threads"),
    ("openvino[device=TPU]", "device='TPU', but should be one of CPU, GPU, NPU"),
    ("openvino[form=grown]", "form='grown', but should be one of state, static (accepted keys: device, form,"),
    ("openvino[compute=half]", "compute='half', but should be one of float32, cache"),
    ("openvino[threads=0]", "threads=0, but should be a positive integer"),
    ("openvino[form=state,max_positions=4096]", "max_positions=4096, but should be unset with form=state"),
    ("openvino[form=static,max_positions=1000,align=64]", "max_positions=1000, but should be a multiple of align=64"),
    ("openvino[form=static,chunk=-5]", "chunk=-5, but should be a positive integer"),
])
def test_malformed_option_is_a_spec_error_naming_the_keys(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_backend(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_openvino_is_unavailable_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    failing_import(monkeypatch, ImportError("No module named 'openvino'"), "openvino")
    with pytest.raises(BackendUnavailable, match=r"pip install 'pytest-longctx\[openvino\]'"):
        O.OpenVinoBackend()


def _absent(device: str) -> None:
    import openvino

    if any(d.startswith(device) for d in openvino.Core().available_devices):
        pytest.skip(f"this machine has an OpenVINO {device} device")


def test_an_absent_npu_is_unavailable_naming_the_devices_and_the_library() -> None:
    _absent("NPU")
    with pytest.raises(BackendUnavailable) as info:
        load_backend("openvino[device=NPU]")
    message = str(info.value)
    assert "has no NPU device (available: CPU" in message and "\n" not in message, message
    assert "cannot load library" in message and "npu" in message.lower(), message


def test_the_npu_alias_tries_rkllm_then_openvino_on_its_npu() -> None:
    _absent("NPU")
    with pytest.raises(BackendUnavailable) as info:
        load_backend("npu")
    message = str(info.value)
    assert message.index("rkllm: ") < message.index("openvino[device=NPU]: ") and "available: CPU" in message


def test_info_records_the_precision_set_and_read_back(backend: O.OpenVinoBackend) -> None:
    import openvino

    assert isinstance(backend, KVBackend)
    info = backend.info()
    assert info.name == "openvino" and info.device_kind == "cpu" and info.kv_dtypes == O.KV_DTYPES
    assert info.versions["openvino"] == openvino.get_version() and info.versions["form"] == backend.form
    precision = info.versions["precision"]
    for dtype, elem in (("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16")):
        assert f"{dtype}: INFERENCE_PRECISION_HINT=f32, KV_CACHE_PRECISION={elem}" in precision, precision
    assert "ScaledDotProductAttention" in info.versions["attention"]
    assert backend.memory_in_use() is None and backend.synchronize() is None


def test_block_formats_are_not_supported(backend: O.OpenVinoBackend) -> None:
    with pytest.raises(NotSupported, match="not q8_0"):
        backend.open_cache(SMALL.replace(kv_dtype="q8_0"))


# --- the cache against the reference ---

@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rope", list(ROPES), ids=list(ROPES))
def test_stored_k_is_the_reference_rotation(backend: O.OpenVinoBackend, rope: str, kv_dtype: str) -> None:
    spec = SMALL.replace(rope=ROPES[rope], kv_dtype=kv_dtype)
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 290)
    for a, b in ((0, 3), (3, 4), (4, 290)):  # a chunk, one position, a chunk longer than a store step
        cache.append(1, k[a:b], v[a:b])
    got_k, got_v = cache.read(1, 0, 290)
    np.testing.assert_allclose(got_k, ref.apply_rope(k, np.arange(290), spec), **K_TOL[kv_dtype])
    np.testing.assert_array_equal(got_v, ref.stored_v(v, spec))
    assert cache.length(1) == 290 and cache.length(0) == 0


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "mqa"])
def test_attend_matches_the_reference(backend: O.OpenVinoBackend, kv_dtype: str, feature: str) -> None:
    """A query chunk at the end of a longer cache: the mask is aligned bottom-right."""
    spec = SMALL.replace(kv_dtype=kv_dtype, **{
        "plain": {}, "window": {"sliding_window": 37}, "softcap": {"softcap": 5.0}, "mqa": {"n_kv_heads": 1},
    }[feature])
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 290)
    cache.append(0, k[:200], v[:200])
    cache.append(0, k[200:], v[200:])
    k_held, v_held = (x.astype(np.float64) for x in cache.read(0, 0, 290))
    q = np.random.default_rng(1).standard_normal((16, spec.n_heads, spec.head_dim)).astype(np.float32)
    for n_q in (1, 16):
        got = cache.attend(0, q[:n_q])
        assert got.shape == (n_q, spec.n_heads, spec.head_dim) and got.dtype == np.float32
        truth = ref.attention(ref.apply_rope(q[:n_q], np.arange(290 - n_q, 290), spec), k_held, v_held, spec)
        # float16 in the state form: the plugin keeps the state in float32 and rounds it when
        # read back, so the held values differ from what attention used by a float16 rounding.
        tol = 2e-6 if kv_dtype == "float32" or backend.form == "static" else 2e-3
        np.testing.assert_allclose(got, truth, rtol=0, atol=tol)
    assert backend.info().versions["attention"].count("runs") >= 1


def test_full_cache_refuses_and_changes_nothing(backend: O.OpenVinoBackend) -> None:
    spec = SMALL.replace(max_positions=40)
    cache = backend.open_cache(spec)
    assert isinstance(cache, KVCache)
    check_refuses_when_full(cache)


def test_bad_calls_are_value_errors(backend: O.OpenVinoBackend) -> None:
    cache = backend.open_cache(SMALL)
    k, v = _kv(SMALL, 20)
    cache.append(0, k, v)
    with pytest.raises(ValueError, match="layer=2"):
        cache.append(2, k, v)
    with pytest.raises(ValueError, match="shape"):
        cache.append(0, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="read"):
        cache.read(0, 0, 21)
    with pytest.raises(ValueError, match="n_q=21"):
        cache.attend(0, np.zeros((21, SMALL.n_heads, SMALL.head_dim), np.float32))
    cache.close()
    assert cache.nbytes() == 0
    with pytest.raises(ValueError, match="closed"):
        cache.append(0, k, v)


def test_nbytes_is_what_each_form_holds() -> None:
    spec = SMALL.replace(kv_dtype="float16")
    k, v = _kv(spec, 100)
    state = O.OpenVinoBackend(form="state").open_cache(spec)
    state.append(0, k, v)
    assert state.nbytes() == spec.kv_bytes(100) // spec.n_layers  # the state grows with what it holds
    static = O.OpenVinoBackend(form="static").open_cache(spec)
    assert static.nbytes() == spec.kv_bytes(spec.max_positions)  # every layer at the compiled size, from open


# --- the static form: the compiled size is the limit ---

def test_static_form_is_compiled_for_its_size_and_refuses_more() -> None:
    backend = O.OpenVinoBackend(form="static", max_positions=64, chunk=16, align=16)
    assert backend.info().max_positions == 64
    with pytest.raises(NotSupported, match="compiled for 64 positions .*not 100"):
        backend.open_cache(SMALL.replace(max_positions=100))
    spec = SMALL.replace(max_positions=64)
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 65)
    cache.append(1, k[:50], v[:50])  # four store calls, the last one padded
    cache.append(1, k[50:64], v[50:64])
    before = cache.read(1, 0, 64)
    with pytest.raises(ContextLimitExceeded, match="max_positions=64"):
        cache.append(1, k[64:], v[64:])
    assert cache.length(1) == 64 and all(np.array_equal(a, b) for a, b in zip(before, cache.read(1, 0, 64)))
    np.testing.assert_allclose(before[0], ref.apply_rope(k[:64], np.arange(64), spec), **K_TOL["float32"])
    with pytest.raises(NotSupported, match="static size 40 is not a multiple of align=16"):
        O.OpenVinoBackend(form="static", align=16).open_cache(SMALL.replace(max_positions=40))


def test_static_padding_is_masked_out_entirely() -> None:
    """Positions past the length are never visible: large stale values there change nothing
    (NaN would: 0 x NaN is NaN, which is why the tensors are zero-filled at open)."""
    spec = SMALL.replace(max_positions=64)
    cache = O.OpenVinoBackend(form="static").open_cache(spec)
    k, v = _kv(spec, 10)
    cache.append(0, k, v)
    q = np.random.default_rng(2).standard_normal((3, spec.n_heads, spec.head_dim)).astype(np.float32)
    clean = cache.attend(0, q)
    for tensor in cache._tensors[0]:
        tensor.data[0, :, 10:] = 1e6
    np.testing.assert_array_equal(cache.attend(0, q), clean)


# --- the suite on this backend ---

def _suite(pytester: pytest.Pytester, backend: str, *args: str, positions: str = "1024") -> pytest.RunResult:
    return run_suite(pytester, backend, "-rfEs", *args, positions=positions)


def test_the_default_form_is_static() -> None:
    """The NPU's form, and the one whose figures are the plugin's kernels (not a concatenating
    state); the default does not depend on the device (only CPU can be constructed here)."""
    assert O.OpenVinoBackend().form == "static"


def test_the_suite_passes_in_the_default_static_form(pytester: pytest.Pytester) -> None:
    """Every group, float16 (the type an NPU holds); the done-when runs in the docs cover all three."""
    result = _suite(pytester, "openvino", "--longctx-kv-dtype=float16", *FLOORS_OFF, positions="512")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-4000:]
    assert outcomes.get("passed", 0) >= 20 and outcomes.get("skipped", 0) == 0, outcomes
    result.stdout.fnmatch_lines(["*longctx: backend openvino*on cpu*"])


def test_the_state_form_passes_equivalence_and_limits(pytester: pytest.Pytester) -> None:
    """Its throughput and memory are the plugin's concatenating state's (docs/backends/openvino.md)."""
    result = _suite(pytester, "openvino[form=state]", "-m", "longctx_equivalence or longctx_limits",
                    "--longctx-kv-dtype=float32", positions="512")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-4000:]
    assert outcomes.get("passed", 0) >= 15 and outcomes.get("skipped", 0) == 0, outcomes


def test_an_absent_npu_skips_every_case_with_one_line(pytester: pytest.Pytester) -> None:
    _absent("NPU")
    result = run_suite(pytester, "openvino[device=NPU]", "-rs", module="test_limits.py", positions="256")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 1 and "passed" not in outcomes and "failed" not in outcomes
    result.stdout.fnmatch_lines(["*unavailable: openvino * has no NPU device (available: CPU*cannot load library*"])


def test_top_left_causal_mask_fails_equivalence(pytester: pytest.Pytester) -> None:
    """SDPA's causal=True for a query chunk at the end of the cache: the attention case fails."""
    result = _suite(pytester, "broken_openvino:TopLeftCausal", "-m", "longctx_equivalence",
                    "--longctx-kv-dtype=float32", "-k", "attention_matches_reference", positions="512")
    assert result.parseoutcomes().get("failed", 0) >= 1, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["FAILED *test_attention_matches_reference*"])


def test_implicit_precision_hint_fails_equivalence(pytester: pytest.Pytester) -> None:
    import openvino

    if openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name() == "f32":
        pytest.skip("this CPU's default inference precision is f32: leaving it implicit changes nothing here")
    result = _suite(pytester, "broken_openvino:ImplicitPrecision[form=static]", "-m", "longctx_equivalence",
                    "--longctx-kv-dtype=float32", "-k", "attention_matches_reference", positions="512")
    assert result.parseoutcomes().get("failed", 0) >= 1, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["FAILED *test_attention_matches_reference*"])
