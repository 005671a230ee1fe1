"""The torch backend: options and bad input, float32 RoPE as transformers makes it, attention
against the float64 truth, the suite on it, and the suite catching its broken variants.

Everything runs on the CPU build (the device tests fake torch.cuda's answers); the CUDA
path is exercised where a GPU is, by the same suite run with ``device=cuda``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pytest_longctx import reference as ref  # noqa: E402
from pytest_longctx.access.registry import load_backend  # noqa: E402
from pytest_longctx.backends import torch_backend as T  # noqa: E402
from pytest_longctx.errors import BackendUnavailable, ContextLimitExceeded, NotSupported, SpecError  # noqa: E402
from pytest_longctx.spec import RopeSpec  # noqa: E402

from _suite_runs import run_suite  # noqa: E402
from _suite_runs import kv as _kv  # noqa: E402
from _suite_runs import small_spec as _spec  # noqa: E402


@pytest.fixture(scope="module")
def backend() -> T.TorchBackend:
    return T.TorchBackend(device="cpu", threads=1)


# --- options and bad input ------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("torch[threads=0]", "threads=0, but should be a positive integer"),
    ("torch[device=tpu]", "device='tpu' is not a torch device"),
    ("torch[device=meta]", "device='meta': the meta device is not supported (cpu, cuda, xpu, mps)"),
    ("torch[bogus=1]", "unexpected keyword argument 'bogus'; accepted keys: device, threads"),
])
def test_bad_option_is_one_line_naming_what_exists(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_backend(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_torch_is_unavailable_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailable, match=r"torch is not importable .*pytest-longctx\[torch\]"):
        T.TorchBackend()


def test_cuda_on_a_cpu_build_is_unavailable_naming_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(BackendUnavailable, match=r"device 'cuda' asked, but torch .* is a CPU-only build; "
                                                  r"devices here: cpu"):
        T.TorchBackend(device="cuda")


def test_device_index_past_the_last_gpu_names_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SpecError, match=r"device='cuda:7', but this machine has 2 cuda device\(s\): cuda:0..cuda:1"):
        T.TorchBackend(device="cuda:7")


def test_threads_with_a_gpu_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SpecError, match="threads=2 applies to device=cpu, not cuda:0"):
        T.TorchBackend(device="cuda", threads=2)


def test_a_dtype_the_build_lacks_is_not_claimed_and_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")
    lacking = T.TorchBackend(device="cpu", threads=1)
    assert lacking.info().kv_dtypes == ("float32", "float16", "bfloat16")
    with pytest.raises(NotSupported) as info:
        lacking.open_cache(_spec("fp8_e4m3"))
    assert str(info.value) == (f"torch on cpu cannot store fp8_e4m3 (torch {torch.__version__} has no "
                               "float8_e4m3fn); it stores float32, float16, bfloat16")


def test_block_formats_are_not_supported(backend: T.TorchBackend) -> None:
    with pytest.raises(NotSupported, match="stores float32, float16, bfloat16, fp8_e4m3, not q8_0"):
        backend.open_cache(_spec("q8_0"))


def test_info_on_the_cpu(backend: T.TorchBackend) -> None:
    info = backend.info()
    assert info.name == "torch" and info.device_kind == "cpu" and info.kv_dtypes == T.KV_DTYPES
    assert info.versions["torch"] == torch.__version__ and info.versions["threads"] == "1"
    assert backend.memory_in_use() is None and not hasattr(backend, "bandwidth")


def test_cpu_alias_still_takes_numpy() -> None:
    assert load_backend("cpu").name == "numpy"


# --- RoPE as engines compute it ---------------------------------------------------------------


def test_cos_and_sin_are_transformers_float32_ones() -> None:
    """The default kind's frequencies, angles, cos and sin equal transformers' bit for bit."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, head_dim=64,
                                      max_position_embeddings=65536,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    theirs = LlamaRotaryEmbedding(config)
    cos, sin = theirs(torch.zeros(1, 1, 64), torch.arange(65520, 65536)[None])
    mine = T.RopeRows(torch, _spec(positions=65536, rope=RopeSpec(theta=1e6)), torch.device("cpu"))
    my_cos, my_sin = mine.rows(65520, 65536)
    assert torch.equal(mine.inv_freq, theirs.inv_freq)
    assert torch.equal(my_cos, cos[0, :, :32]) and torch.equal(my_sin, sin[0, :, :32])


def test_scaled_kinds_are_within_the_yardsticks_frequency_envelope() -> None:
    """Every kind's float32 frequencies lie within FREQ_ULPS of the normative ones."""
    kinds = [
        RopeSpec(kind="linear", theta=10000.0, factor=4.0),
        RopeSpec(kind="dynamic", theta=10000.0, factor=2.0, original_max_positions=256),
        RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=256),
        RopeSpec(kind="llama3", theta=500000.0, factor=8.0, original_max_positions=256, low_freq_factor=1.0,
                 high_freq_factor=4.0),
    ]
    for rope in kinds:
        spec = _spec(positions=1024, rope=rope)
        got = T.inv_freq32(torch, spec, torch.device("cpu")).numpy()
        exact = T.rope_frequencies(spec).inv_freq
        ulps = np.abs(got.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32))
        assert got.dtype == np.float32 and ulps.max() <= max(ref.FREQ_ULPS), (rope.kind, ulps.max())


# --- storage and attention against the float64 truth --------------------------------------------


STEP = {"float32": 2.0 ** -20, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "fp8_e4m3": 2.0 ** -3}


@pytest.mark.parametrize("kv_dtype", T.KV_DTYPES)
def test_read_holds_the_stored_values(backend: T.TorchBackend, kv_dtype: str) -> None:
    """V reads back as the dtype stores it; K as RoPE'd in float32, then stored."""
    spec = _spec(kv_dtype)
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 1000)
    k[0, 0, :4] = [500.0, -500.0, 1e-3, 0.0]  # fp8 saturates at 448 (torch's own cast gives NaN)
    for a in range(0, 1000, 300):
        cache.append(1, backend.asarray(k[a:a + 300]), backend.asarray(v[a:a + 300]))
    got_k, got_v = (backend.to_numpy(x) for x in cache.read(1, 0, 1000))
    assert got_k.dtype == np.float32 and got_k.shape == (1000, 2, 64)
    np.testing.assert_array_equal(got_v, ref.roundtrip(v, kv_dtype))
    # Engines' float32 cos/sin may differ from NumPy's by an ulp: a stored value may round the
    # other way, by at most one step of the storage type.
    want_k = ref.stored_k(k, np.arange(1000), spec)
    assert np.abs(got_k - want_k).max() <= np.abs(want_k).max() * STEP[kv_dtype]
    assert cache.nbytes() >= spec.kv_bytes(spec.max_positions)


FEATURES = {
    "gqa": {},
    "mha": dict(n_heads=4, n_kv_heads=4),
    "window": dict(sliding_window=300),
    "softcap": dict(softcap=30.0),
    "window-softcap": dict(sliding_window=300, softcap=20.0),
    "scale": dict(softmax_scale=0.05),
    "partial-gptj": dict(rope=RopeSpec(theta=10000.0, rotary_dim=32, style="gptj")),
}


@pytest.mark.parametrize("path", ["sdpa", "matmul"])
@pytest.mark.parametrize("n_q", [1, 8, 16, 200])
@pytest.mark.parametrize("feature", FEATURES)
def test_attention_matches_the_float64_truth(backend: T.TorchBackend, feature: str, n_q: int, path: str) -> None:
    """Both attention paths: SDPA (the CPU's) and the matmul path accelerators take for few
    rows (_matmul_attention), forced here so that it is checked without a GPU."""
    spec = _spec("float16", **FEATURES[feature])
    cache = backend.open_cache(spec)
    cache._decode_by_matmul = path == "matmul"
    k, v = _kv(spec, 1100)
    cache.append(0, backend.asarray(k), backend.asarray(v))
    q = np.random.default_rng(1).standard_normal((n_q, spec.n_heads, spec.head_dim)).astype(np.float32)
    got = backend.to_numpy(cache.attend(0, backend.asarray(q)))
    stored_k, stored_v = (backend.to_numpy(x).astype(np.float64) for x in cache.read(0, 0, 1100))
    want = ref.attention(ref.apply_rope(q, np.arange(1100 - n_q, 1100), spec), stored_k, stored_v, spec)
    assert got.shape == (n_q, spec.n_heads, spec.head_dim) and got.dtype == np.float32
    error = np.abs(got - want).max()
    assert error <= 2e-5 * max(1.0, np.abs(want).max()), f"max error {error:.3g} ({feature}, n_q={n_q})"


def test_one_position_past_the_limit_raises_and_changes_nothing(backend: T.TorchBackend) -> None:
    spec = _spec("bfloat16", positions=500)
    cache = backend.open_cache(spec)
    k, v = _kv(spec, 501)
    cache.append(0, backend.asarray(k[:500]), backend.asarray(v[:500]))
    before = [backend.to_numpy(x) for x in cache.read(0, 0, 500)]
    with pytest.raises(ContextLimitExceeded):
        cache.append(0, backend.asarray(k[500:]), backend.asarray(v[500:]))
    assert cache.length(0) == 500 and cache.length(1) == 0
    for got, want in zip(cache.read(0, 0, 500), before):
        np.testing.assert_array_equal(backend.to_numpy(got), want)


def test_wrong_input_shape_is_a_one_line_value_error(backend: T.TorchBackend) -> None:
    cache = backend.open_cache(_spec())
    with pytest.raises(ValueError, match=r"k has shape \(4, 3, 64\), but should be \('n', 2, 64\)"):
        cache.append(0, backend.asarray(np.zeros((4, 3, 64), np.float32)),
                     backend.asarray(np.zeros((4, 2, 64), np.float32)))


# --- the suite on it, and on its broken variants ---------------------------------------------


def test_the_suite_passes_on_the_cpu(pytester: pytest.Pytester) -> None:
    """What `pytest --longctx-backend=torch` runs: every group, at float32 and a small size to
    stay fast (each storage dtype's own path is checked above, and at 4K..16K in docs/backends/torch.md)."""
    result = run_suite(pytester, "torch[device=cpu]", "--longctx-kv-dtype=float32", module=None)
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "deselected", "warnings"}, result.stdout.str()[-4000:]
    assert outcomes["passed"] >= 30, outcomes
    result.stdout.fnmatch_lines(["*longctx: backend torch[[]device=cpu] on cpu*"])


# Each broken step is independent of the storage dtype: the shape's own equivalence cases at float32.
BROKEN = {
    "TorchFloat16Angles": (
        # The position probe reads K at the power-of-two boundaries: float16 angles fail there too.
        {"test_attention_matches_reference", "test_read_matches_reference",
         "test_positions_at_index_boundaries_read_and_attend_right"},
        "read K at positions 0..1023: max|error|=*, but should be <= 3 x plain * "
        "[[]torch-float16-angles float32 @ 1024 positions, *]"),
    "TorchCausalOffByOne": (
        {"test_attention_matches_reference"},
        "attend with 16 queries at positions ..*, worst at query *: max|error|=*, "
        "but should be <= * [[]torch-causal-off-by-one float32 @ 1024 positions, *]"),
    "TorchStaleSlot": (
        # The position probe attends on caches of b+1 positions after reading past them.
        {"test_attention_matches_reference", "test_positions_at_index_boundaries_read_and_attend_right"},
        # what the stale slot holds is whatever torch.empty left there: a wrong value or a NaN
        "attend with 1 query at positions ..*, worst at query 0 head *: *, but should * "
        "[[]torch-stale-slot float32 @ 1024 positions, *]"),
}


def test_the_suite_catches_each_broken_torch_backend(pytester: pytest.Pytester) -> None:
    """One run over the three broken variants and the shipped backend (the control): each variant
    fails exactly the tests its defect breaks, with its diagnosis; the shipped one passes. A fixed
    seed: which stage shows a defect worst depends on where the inputs put needles and decoys."""
    first, *rest = [f"broken_torch_backends:{name}" for name in BROKEN]
    result = run_suite(pytester, first, *[f"--longctx-backend={b}" for b in rest], "--longctx-backend=torch[device=cpu]",
                       "--longctx-kv-dtype=float32", "--longctx-seed=1", "-rf", "-m", "longctx_equivalence",
                       "-k", "float32-1024", module=None)
    failed: dict = {}
    for line in result.outlines:
        if line.startswith("FAILED "):
            test, _, params = line.split("::")[1].partition("[")
            failed.setdefault(params.split("-float32")[0], set()).add(test)
    expected = {f"broken_torch_backends:{name}": tests for name, (tests, _) in BROKEN.items()}
    assert failed == expected, result.stdout.str()[-4000:]
    outcomes = result.parseoutcomes()
    # 4 backends x (read, attention, position probe, flat probe): 6 fail; the control passes its 4.
    assert outcomes.get("failed") == 6 and outcomes.get("passed") == 10, outcomes
    result.stdout.fnmatch_lines([message for _, message in BROKEN.values()], consecutive=False)


def test_two_backends_in_one_process_each_run_at_their_threads() -> None:
    """torch's thread count is per process: each backend's cache sets its own before working."""
    one, two = T.TorchBackend(device="cpu", threads=1), T.TorchBackend(device="cpu", threads=2)
    cache = one.open_cache(_spec())
    k, v = _kv(cache.spec, 8)
    cache.append(0, one.asarray(k), one.asarray(v))
    assert torch.get_num_threads() == 1 and one.info().versions["threads"] == "1"
    two.open_cache(_spec()).append(0, two.asarray(k), two.asarray(v))
    assert torch.get_num_threads() == 2 and two.info().versions["threads"] == "2"
