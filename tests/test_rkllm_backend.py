"""The rkllm (NPU) backend's ctypes binding, tested for real against the RKLLM stand-in.

The stand-in (tests/rkllm_standin/rkllm_standin.c) is a C library compiled here with the
system compiler; it exports librkllmrt.so's symbols with the 1.2.1 or the 1.3.0 struct layouts
(one build each; the tests that load a model run against both) and a tiny deterministic model. It is not the RKLLM runtime: these tests certify the binding (layouts,
the callback, error states, context limits, logits extraction), not an NPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pytest

import _suite_runs as suite_runs
import rkllm_standin as S
from pytest_longctx.access.registry import load_backend
from pytest_longctx.backends import _rkllm_abi as abi
from pytest_longctx.backends import rkllm_backend as R
from pytest_longctx.errors import (
    BackendUnavailable,
    ContextClamped,
    ContextLimitExceeded,
    NotSupported,
    RuntimeFailure,
    SpecError,
)
from pytest_longctx.protocol import ModelRuntime, RuntimeBackend

MODEL = S.StandinModel()  # 4 layers, 4 KV heads, d64, float16: 4096 KV bytes a position; vocab 512; ctx 4096
SHAPE = MODEL.shape()
rng = np.random.default_rng(20240605)


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rkllm-standin")


_built: Dict[str, Path] = {}


def standin(directory: Path, variant: str = "1.2.1") -> str:
    if variant not in _built:
        try:
            _built[variant] = S.build(directory, variant)
        except S.StandinBuildError as exc:
            pytest.skip(str(exc))
    return str(_built[variant])


ABIS = ("1.2.1", "1.3.0")  # one stand-in build per RKLLM ABI


@pytest.fixture(scope="session", params=ABIS, ids=lambda v: f"abi{v[:3]}")
def library(standin_dir: Path, request: pytest.FixtureRequest) -> str:
    return standin(standin_dir, request.param)


@pytest.fixture(scope="session")
def model(standin_dir: Path) -> str:
    return str(S.write_model(standin_dir))


@pytest.fixture(scope="session")
def backend(library: str) -> R.RkllmBackend:
    return R.RkllmBackend(library=library, shape=SHAPE)


@pytest.fixture
def runtime(backend: R.RkllmBackend, model: str) -> Iterator[R.RkllmRuntime]:
    with backend.open_runtime(model) as rt:
        yield rt


def tokens(n: int) -> np.ndarray:
    return rng.integers(0, MODEL.vocab_size, n)


def faulty(monkeypatch: pytest.MonkeyPatch, backend: R.RkllmBackend, model: str, faults: str, **options):
    """A runtime whose stand-in was initialised with these faults (read at rkllm_init)."""
    monkeypatch.setenv("RKLLM_STANDIN_FAULTS", faults)
    return backend.open_runtime(model, **options)


# --- the ABI ---------------------------------------------------------------------------------


# Sizes and offsets (LP64) worked out by hand from the field lists of the public rkllm.h:
# airockchip/rknn-llm rkllm-runtime/Linux/librkllm_api/include/rkllm.h at v1.2.1 (commit
# d546a0f975d62469cf1306f98103c737ff933506) and at v1.3.0 (878f9361fd3afa7e167b7079918918f78d2c1c2a).
# A field out of order or of the wrong type moves one of these.
HEADER_LAYOUT = {
    "1.2.1": {
        "sizeof(RKLLMExtendParam)": 120, "offsetof(RKLLMExtendParam, n_batch)": 12,
        "sizeof(RKLLMParam)": 208, "offsetof(RKLLMParam, skip_special_token)": 56,
        "offsetof(RKLLMParam, is_async)": 57, "offsetof(RKLLMParam, img_start)": 64,
        "offsetof(RKLLMParam, img_content)": 80, "offsetof(RKLLMParam, extend_param)": 88,
        "sizeof(RKLLMMultiModalInput)": 48, "offsetof(RKLLMMultiModalInput, image_height)": 40,
        "sizeof(RKLLMInput)": 64, "offsetof(RKLLMInput, input_type)": 12, "offsetof(RKLLMInput, token_input)": 16,
        "sizeof(RKLLMInferParam)": 32, "offsetof(RKLLMInferParam, keep_history)": 24,
        "sizeof(RKLLMResult)": 72, "offsetof(RKLLMResult, logits)": 32, "offsetof(RKLLMResult, perf)": 48,
    },
    "1.3.0": {
        "sizeof(RKLLMExtendParam)": 120, "offsetof(RKLLMExtendParam, n_batch)": 12,
        "sizeof(RKLLMParam)": 184, "offsetof(RKLLMParam, skip_special_token)": 56,
        "offsetof(RKLLMParam, ignore_eos_token)": 57, "offsetof(RKLLMParam, is_async)": 58,
        "offsetof(RKLLMParam, extend_param)": 60,
        "sizeof(RKLLMMultiModalInput)": 144, "offsetof(RKLLMMultiModalInput, image.image_start)": 32,
        "offsetof(RKLLMMultiModalInput, video)": 72, "offsetof(RKLLMMultiModalInput, video.frame_height)": 136,
        "sizeof(RKLLMSamplingParam)": 36, "offsetof(RKLLMSamplingParam, mirostat_eta)": 32,
        "sizeof(RKLLMInput)": 160, "offsetof(RKLLMInput, input_type)": 12, "offsetof(RKLLMInput, token_input)": 16,
        "sizeof(RKLLMInferParam)": 40, "offsetof(RKLLMInferParam, sampling_params)": 24,
        "offsetof(RKLLMInferParam, keep_history)": 32, "offsetof(RKLLMInferParam, max_new_tokens)": 36,
        "sizeof(RKLLMCallback)": 48, "offsetof(RKLLMCallback, embed_userdata)": 40,
        "sizeof(RKLLMResult)": 72, "offsetof(RKLLMResult, logits)": 32, "offsetof(RKLLMResult, perf)": 48,
    },
}


def ctypes_layout(version: str, keys) -> Dict[str, int]:
    """The binding's ctypes figure for each "sizeof(S)" / "offsetof(S, a.b)" key."""
    layout = abi.abi_for(version)
    multimodal = abi.RKLLMMultiModalInput13 if layout is abi.ABI_1_3 else abi.RKLLMMultiModelInput12
    classes = {"RKLLMExtendParam": abi.RKLLMExtendParam, "RKLLMParam": layout.param, "RKLLMInput": layout.input,
               "RKLLMMultiModalInput": multimodal, "RKLLMSamplingParam": abi.RKLLMSamplingParam,
               "RKLLMInferParam": layout.infer, "RKLLMCallback": layout.callbacks, "RKLLMResult": abi.RKLLMResult}
    out = {}
    for key in keys:
        kind, _, inside = key.partition("(")
        names = [x.strip() for x in inside.rstrip(")").split(",")]
        cls = classes[names[0]]
        if kind == "sizeof":
            out[key] = ctypes.sizeof(cls)
            continue
        offset = 0
        if cls is layout.input and names[1] not in ("role", "enable_thinking", "input_type"):
            offset, cls = cls._u.offset, cls._fields_[-1][1]  # the anonymous union
        for part in names[1].split("."):
            field = getattr(cls, part)
            offset += field.offset
            cls = dict(cls._fields_)[part]
        out[key] = offset
    return out


@pytest.mark.parametrize("version", ABIS)
def test_ctypes_layouts_are_the_headers(version: str) -> None:
    expected = HEADER_LAYOUT[version]
    assert ctypes_layout(version, expected) == expected


@pytest.mark.parametrize("version", ABIS)
def test_ctypes_layouts_match_the_c_compiler(standin_dir: Path, version: str) -> None:
    lib = ctypes.CDLL(standin(standin_dir, version))
    names, values = (ctypes.c_char_p * 64)(), (ctypes.c_long * 64)()
    count = lib.rkllm_standin_layout(names, values, 64)  # stand-in only: the binding never calls it
    c_side = {names[i].decode(): values[i] for i in range(count)}
    assert c_side == HEADER_LAYOUT[version] == ctypes_layout(version, c_side)


def test_each_version_gets_its_abi_and_no_other() -> None:
    assert [abi.abi_for(v) for v in ("1.2.1", "1.2.3", "1.3.0", "1.3.7")] == [abi.ABI_1_2] * 2 + [abi.ABI_1_3] * 2
    assert [abi.abi_for(v) for v in ("1.2.0", "1.1.4", "1.4.0", "2.0.0")] == [None] * 4
    assert abi.ABI_1_2.param is not abi.ABI_1_3.param and abi.ABI_1_2.infer is not abi.ABI_1_3.infer


def test_a_struct_of_the_other_abi_is_refused_by_ctypes(standin_dir: Path) -> None:
    """Functions are declared with their ABI's structs: passing the other ABI's is a TypeError, no call."""
    lib = abi.open_library(standin(standin_dir, "1.3.0")).lib
    wrong = abi.RKLLMParam12()
    with pytest.raises(ctypes.ArgumentError):
        lib.rkllm_init(ctypes.byref(abi.LLMHandle()), ctypes.byref(wrong), None)
    with pytest.raises(ctypes.ArgumentError):
        lib.rkllm_run(None, ctypes.byref(abi.RKLLMInput12()), ctypes.byref(abi.RKLLMInferParam12()), None)


# --- finding and refusing libraries ------------------------------------------------------------


def test_no_library_is_unavailable_naming_every_place_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(abi.ENV_LIBRARY, raising=False)
    default = str(tmp_path / "usr-lib" / "librkllmrt.so")
    monkeypatch.setattr(abi, "DEFAULT_LIBRARY", default)
    with pytest.raises(BackendUnavailable) as info:
        R.RkllmBackend()
    message = str(info.value)
    assert "library=" in message and abi.ENV_LIBRARY in message and default in message, message
    assert "expected librkllmrt.so 1.2.1-1.2.x or 1.3.x" in message and "\n" not in message
    # Through the registry and the npu alias, as the suite loads it: a skip reason, not a crash.
    with pytest.raises(BackendUnavailable, match="no npu backend is available .*rkllm: no RKLLM runtime library"):
        load_backend("npu")


def test_environment_variable_names_the_library(monkeypatch: pytest.MonkeyPatch, library: str,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv(abi.ENV_LIBRARY, library)
    assert R.RkllmBackend().library.path == library
    missing = str(tmp_path / "nowhere" / "librkllmrt.so")
    monkeypatch.setenv(abi.ENV_LIBRARY, missing)
    with pytest.raises(BackendUnavailable, match=re.escape(missing)):
        R.RkllmBackend()


@pytest.mark.parametrize("variant, stated, reason", [
    ("1.4.0", None, r"is RKLLM runtime 1\.4\.0 \(\"rkllm-runtime version: 1\.4\.0 .*\), expected 1\.2\.1-1\.2\.x or "
                    r"1\.3\.x: refused, no rkllm\.h of that version was checked"),
    ("1.3.0-split-version", None, r"no \"rkllm-runtime version: X\.Y\.Z\" text in the binary.*runtime_version="),
    ("1.3.0-split-version", "1.4.0", r"is RKLLM runtime 1\.4\.0 \(stated by runtime_version=.*expected .*refused"),
    ("1.3.0", "1.2.1", r"runtime_version=1\.2\.1 was given, but .* says \"rkllm-runtime version: 1\.3\.0"),
    ("1.2.0", None, r"is RKLLM runtime 1\.2\.0 .*expected .*refused, 1\.2\.0 has no rkllm_get_kv_cache_size"),
    ("1.2.0-split-version", "1.2.1", r"has no rkllm_get_kv_cache_size, so it is RKLLM 1\.2\.0 or older"),
    ("1.2.1-split-version", None, r"no \"rkllm-runtime version: X\.Y\.Z\" text"),
    ("1.2.1", "1.2.2", r"runtime_version=1\.2\.2 was given, but .* says \"rkllm-runtime version: 1\.2\.1"),
])
def test_a_library_of_another_abi_is_refused_before_any_call(standin_dir: Path, variant: str, stated, reason) -> None:
    path = standin(standin_dir, variant)
    with pytest.raises(BackendUnavailable, match=reason) as info:
        R.RkllmBackend(library=path, runtime_version=stated, shape=SHAPE)
    assert path in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("version", ABIS)
def test_a_banner_of_a_supported_version_picks_its_abi(standin_dir: Path, model: str, version: str) -> None:
    backend = R.RkllmBackend(library=standin(standin_dir, version), shape=SHAPE)
    versions = backend.info().versions
    assert (versions["rkllm-runtime"], versions["rkllm-abi"]) == (version, version[:3])
    assert backend.library.abi is abi.abi_for(version)
    with backend.open_runtime(model, vocab_size=MODEL.vocab_size) as rt:
        assert rt.runtime_said_version == version and rt.positions() == 0


def test_a_stated_version_is_checked_against_what_rkllm_init_prints(standin_dir: Path, model: str) -> None:
    for version in ABIS:
        path = standin(standin_dir, f"{version}-split-version")
        backend = R.RkllmBackend(library=path, runtime_version=version, shape=SHAPE)
        assert backend.info().versions["version evidence"].startswith("stated by runtime_version=")
        with backend.open_runtime(model, vocab_size=MODEL.vocab_size) as rt:
            assert rt.runtime_said_version == version and rt.library.abi is abi.abi_for(version)
    path = standin(standin_dir, "1.2.1-split-version")
    wrong = R.RkllmBackend(library=path, runtime_version="1.2.2", shape=SHAPE)
    with pytest.raises(BackendUnavailable, match=r"rkllm_init printed rkllm-runtime version 1\.2\.1, but the binding "
                                                 r"took it for 1\.2\.2"):
        wrong.open_runtime(model)


def test_a_file_that_is_not_a_library_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "librkllmrt.so"
    fake.write_text("rkllm-runtime version: 1.2.1\n")  # says the right thing, but is no ELF
    with pytest.raises(BackendUnavailable, match=f"cannot load {re.escape(str(fake))}"):
        R.RkllmBackend(library=str(fake))


def test_the_backend_through_the_registry_with_options(library: str) -> None:
    backend = load_backend(f"rkllm[library={library},shape={SHAPE},kv_dtype=float16]")
    assert isinstance(backend, RuntimeBackend)
    info = backend.info()
    assert info.name == "rkllm" and info.device_kind == "npu" and info.kv_dtypes == ("float16",)
    assert info.versions["rkllm-runtime"] in ABIS and "stand-in" in info.versions["version evidence"]


def test_bad_options_are_refused_with_the_field(library: str) -> None:
    with pytest.raises(SpecError, match="kv_dtype='int3'"):
        R.RkllmBackend(library=library, kv_dtype="int3")
    with pytest.raises(SpecError, match="generate='beam'"):
        R.RkllmBackend(library=library, generate="beam")
    with pytest.raises(SpecError, match="unknown key 'layers'"):
        R.RkllmBackend(library=library, shape="layers=2")


# --- models, context and shape -------------------------------------------------------------------


@pytest.mark.parametrize("name, context", [
    ("Qwen3-0.6B-rk3588-w8a8-ctx16384.rkllm", 16384),
    ("gemma3-1b-rk3588-w8a8.rkllm", 4096),
    ("model_ctx16k.rkllm", 16384),
    ("/models/ctx8192/qwen3-0.6b-ctx-2048.rkllm", 2048),
])
def test_context_comes_from_the_file_name(name: str, context: int) -> None:
    assert R.context_from_name(name)[0] == context


def test_shape_comes_from_the_file_name_or_an_option(backend: R.RkllmBackend, library: str, standin_dir: Path) -> None:
    assert R.shape_from_name("Qwen3-0.6B-rk3588-w8a8-ctx16384.rkllm") == "qwen3-0.6b"
    assert R.shape_from_name("DeepSeek-R1-Distill-Qwen-1.5B.rkllm") is None
    named = S.write_model(standin_dir, "Qwen3-0.6B-standin-ctx4096.rkllm")
    plain = R.RkllmBackend(library=library)
    with plain.open_runtime(str(named), vocab_size=MODEL.vocab_size) as rt:
        assert rt.kv_spec.describe() == "28L 16h/8kv d128 rope=default/neox" and rt.kv_spec.max_positions == 4096
    unnamed = S.write_model(standin_dir, "standin-ctx4096.rkllm")
    with pytest.raises(SpecError, match=r"standin-ctx4096\.rkllm: RKLLM does not report the KV geometry.*shape="):
        plain.open_runtime(str(unnamed))
    with plain.open_runtime(str(unnamed), shape=str(S.write_shape(standin_dir)), kv_dtype="q8_0") as rt:
        assert (rt.kv_spec.n_layers, rt.kv_spec.kv_dtype) == (4, "q8_0")


def test_a_missing_model_is_a_spec_error_naming_it(backend: R.RkllmBackend, tmp_path: Path) -> None:
    missing = str(tmp_path / "Qwen3-0.6B-ctx16384.rkllm")
    with pytest.raises(SpecError, match=f"model file {re.escape(missing)}: no such file"):
        backend.open_runtime(missing)


def test_a_file_that_is_not_a_model_is_refused_by_the_runtime(backend: R.RkllmBackend, tmp_path: Path) -> None:
    junk = tmp_path / "notes-ctx4096.rkllm"
    junk.write_text("not a model\n")
    with pytest.raises(SpecError, match=rf"model file {re.escape(str(junk))}: rkllm_init returned -1 .*"
                                        r"the runtime said \"E rkllm-standin: invalid stand-in model magic"):
        backend.open_runtime(str(junk))


def test_the_runtime_reports_its_contract(runtime: R.RkllmRuntime) -> None:
    assert isinstance(runtime, ModelRuntime)
    assert (runtime.model_context_limit, runtime.context_limit, runtime.vocab_size) == (4096, 4096, 512)
    assert "confirmed by the runtime's max_context_limit" in runtime.context_source
    spec = runtime.kv_spec
    assert (spec.n_layers, spec.n_kv_heads, spec.head_dim, spec.kv_dtype, spec.max_positions) == (4, 4, 64, "float16", 4096)
    assert spec.position_bytes() == MODEL.position_bytes()
    assert runtime.positions() == 0  # the vocabulary probe was reset
    assert runtime.stats().prefill_tokens == 0  # and not counted


def test_a_context_above_the_model_is_clamped_quoting_the_runtime(backend: R.RkllmBackend, model: str) -> None:
    with pytest.warns(ContextClamped, match=r"context 4128 requested, but the model holds 4096: clamped to 4096 "
                                            r"\(rkllm_init refused max_context_len=4128: .*max_context_limit\[4096\]"):
        rt = backend.open_runtime(model, 4128)
    with rt:
        assert (rt.context_limit, rt.kv_spec.max_positions) == (4096, 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with backend.open_runtime(model, 1024) as small:  # below the model's: taken as asked
            assert (small.model_context_limit, small.context_limit) == (4096, 1024)


def test_a_misnamed_model_takes_the_runtimes_limit(backend: R.RkllmBackend, standin_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    named_up = S.write_model(standin_dir, "standin-misnamed-ctx8192.rkllm")  # holds 4096
    with pytest.warns(UserWarning, match="ctx8192 in the file name gives 8192, but the runtime says the model's "
                                         "max_context_limit is 4096"):
        rt = backend.open_runtime(str(named_up))
    with rt:
        assert (rt.model_context_limit, rt.context_limit) == (4096, 4096)
    named_down = S.write_model(standin_dir, "standin-misnamed-ctx2048.rkllm")  # holds 4096
    with pytest.warns(UserWarning, match="gives 2048, but the runtime says .* is 4096"):
        rt = backend.open_runtime(str(named_down))
    with rt:
        assert rt.context_limit == 4096
    # A runtime that does not print its limit: the name decides, and a context above it is clamped.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with faulty(monkeypatch, backend, str(named_down), "no-limit-log") as rt:
            assert (rt.model_context_limit, rt.context_limit) == (2048, 2048)
    with pytest.warns(ContextClamped, match=r"rkllm_init accepted max_context_len=3000 too"):
        rt = backend.open_runtime(str(named_down), 3000)  # RKLLM_STANDIN_FAULTS=no-limit-log still set
    with rt:
        assert rt.context_limit == 2048


# --- prefill, logits, generate -------------------------------------------------------------------


def test_prefill_returns_a_copy_of_the_last_logits(runtime: R.RkllmRuntime) -> None:
    prompt = tokens(300)
    logits = runtime.prefill(prompt)
    assert logits.dtype == np.float32 and logits.shape == (MODEL.vocab_size,) and logits.flags.owndata
    np.testing.assert_array_equal(logits, S.reference_logits(prompt))  # the last of 300 rows, bit for bit
    assert runtime.positions() == 300
    logits[:] = 0  # the caller's copy: the runtime's next token does not change
    assert runtime.generate(1) == S.greedy(prompt, 1)


def test_successive_prefills_extend_the_context(runtime: R.RkllmRuntime, backend: R.RkllmBackend,
                                                model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = tokens(700)
    whole = runtime.prefill(prompt)
    runtime.reset()
    assert runtime.positions() == 0
    for part in (prompt[:512], prompt[512:600], prompt[600:]):
        chunked = runtime.prefill(part)
    np.testing.assert_array_equal(chunked, whole)
    runtime.reset()
    np.testing.assert_array_equal(runtime.prefill(prompt), whole)  # same prompt after a reset
    with faulty(monkeypatch, backend, model, "logits-last-row") as last_row_only:
        np.testing.assert_array_equal(last_row_only.prefill(prompt), whole)


@pytest.mark.parametrize("mode", ["logits", "native"])
def test_generate_is_greedy_and_extends_the_context_by_n(backend: R.RkllmBackend, model: str, mode: str) -> None:
    prompt = tokens(64)
    with backend.open_runtime(model, generate=mode) as rt:
        rt.prefill(prompt)
        first = rt.generate(7)
        assert first == S.greedy(prompt, 7) and rt.positions() == 71
        second = rt.generate(5)  # continues where the first stopped
        assert second == S.greedy(list(prompt) + first, 5) and rt.positions() == 76
        assert rt.generate(0) == [] and rt.positions() == 76
        np.testing.assert_array_equal(rt.prefill([3]), S.reference_logits(list(prompt) + first + second + [3]))
        stats = rt.stats()
        assert (stats.prefill_tokens, stats.generate_tokens) == (65, 12) and stats.generate_seconds > 0
        rt.reset()
        with pytest.raises(ValueError, match="prefill first"):
            rt.generate(1)


def test_native_generate_pauses_through_the_callback(backend: R.RkllmBackend, model: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in shows token n+1 to the callback, which returns 1: the run stops there."""
    calls = []
    original = R.RkllmRuntime._on_result

    def spy(self, result, userdata, state):
        status = original(self, result, userdata, state)
        calls.append((state, status))
        return status

    monkeypatch.setattr(R.RkllmRuntime, "_on_result", spy)  # bound into the callback at rkllm_init
    with backend.open_runtime(model, generate="native", vocab_size=MODEL.vocab_size) as rt:
        rt.prefill(tokens(10))
        calls.clear()
        assert len(rt.generate(4)) == 4
    assert calls == [(abi.RUN_NORMAL, 0)] * 3 + [(abi.RUN_NORMAL, 1)]  # 3 continue, the 4th pauses; no FINISH


# --- positions, reset, stats, memory ---------------------------------------------------------------


def test_stats_are_the_runtimes_and_cumulative(runtime: R.RkllmRuntime) -> None:
    runtime.prefill(tokens(256))
    runtime.reset()  # reset does not clear the statistics
    runtime.prefill(tokens(256))
    runtime.generate(3)
    stats = runtime.stats()
    assert (stats.prefill_tokens, stats.generate_tokens) == (512, 3)
    assert 0 < stats.prefill_seconds < 5 and 0 < stats.generate_seconds < 5
    with open("/proc/self/status") as status:
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024
    assert 0 < stats.peak_memory_bytes <= hwm  # the runtime's VmHWM, in bytes


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_grows_by_the_kv_size_and_reset_gives_it_back(runtime: R.RkllmRuntime) -> None:
    runtime.prefill(tokens(256))  # the logits buffer for 256 rows is allocated once
    before = _rss()
    for _ in range(12):
        runtime.prefill(tokens(256))
    grown = _rss() - before
    expected = runtime.kv_spec.kv_bytes(12 * 256)  # 12 MiB
    assert expected * 0.95 <= grown <= expected * 1.10 + (1 << 20), (grown, expected)
    runtime.reset()
    assert _rss() < before + expected * 0.10


# --- errors and limits -----------------------------------------------------------------------------


def test_an_error_state_mid_run_is_a_runtime_failure_and_the_run_goes_on(
        backend: R.RkllmBackend, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with faulty(monkeypatch, backend, model, "error-state@2", vocab_size=MODEL.vocab_size) as rt:
        rt.prefill(tokens(100))  # run 1
        with pytest.raises(RuntimeFailure) as info:
            rt.prefill(tokens(100))  # run 2: takes 50, then ERROR through the callback, returns 0
        message = str(info.value)
        assert "rkllm_run(RKLLM_INPUT_TOKEN, RKLLM_INFER_GET_LOGITS, keep_history=1) of 100 tokens at position 100" \
            in message and "the callback got state RKLLM_RUN_ERROR" in message, message
        assert "the context holds 150 (was 100)" in message and "injected error state" in message
        rt.prefill(tokens(10))  # run 3
        assert rt.positions() == 160


def test_a_failing_rkllm_run_is_a_runtime_failure(backend: R.RkllmBackend, model: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with faulty(monkeypatch, backend, model, "error-return@2", vocab_size=MODEL.vocab_size) as rt:
        rt.prefill(tokens(10))
        with pytest.raises(RuntimeFailure, match=r"of 5 tokens at position 10: .* returned -1; the runtime said "
                                                 r"\"E rkllm-standin: run 2: injected failure"):
            rt.prefill(tokens(5))
        assert rt.positions() == 10
    monkeypatch.delenv("RKLLM_STANDIN_FAULTS")
    with backend.open_runtime(model) as rt:  # a token outside the vocabulary: the runtime's error
        with pytest.raises(RuntimeFailure, match="token id 512 at 1 is outside the vocabulary"):
            rt.prefill([1, 512])
        assert rt.positions() == 0


def test_a_prompt_of_exactly_the_limit_fits_and_one_more_is_refused_whole(backend: R.RkllmBackend,
                                                                          model: str) -> None:
    with backend.open_runtime(model, 1024) as rt:
        for _ in range(2):
            rt.prefill(tokens(512))
        assert rt.positions() == 1024
        with pytest.raises(ContextLimitExceeded) as info:
            rt.prefill(tokens(1))
        error = info.value
        assert (error.layer, error.length, error.requested, error.max_positions) == (None, 1024, 1, 1024)
        assert "the runtime refused it" in str(error) and "the context still holds 1024" in str(error)
        assert rt.positions() == 1024


def test_a_prompt_crossing_the_limit_is_rejected_whole_and_changes_nothing(backend: R.RkllmBackend,
                                                                           model: str) -> None:
    with backend.open_runtime(model, 1024) as rt:
        head, crossing, after = tokens(512), tokens(520), tokens(8)
        rt.prefill(head)
        with pytest.raises(ContextLimitExceeded, match=r"a prompt of 520 tokens to a context holding 512 would pass "
                                                        r"max_positions=1024 \(the runtime refused it"):
            rt.prefill(crossing)
        assert rt.positions() == 512
        np.testing.assert_array_equal(rt.prefill(after), S.reference_logits(list(head) + list(after)))


def test_generate_past_the_limit_is_refused(backend: R.RkllmBackend, model: str) -> None:
    with backend.open_runtime(model, 64) as rt:
        rt.prefill(tokens(60))
        with pytest.raises(ContextLimitExceeded, match=r"generate, token 5 of 8: the runtime refused it"):
            rt.generate(8)
        assert rt.positions() == 64


@pytest.mark.parametrize("fault, said", [
    ("limit-half", r"the runtime took 512 of the 520 tokens before failing .*: the context now holds 1024, not 512"),
    ("limit-shift", r"the runtime accepted it without an error and now holds 520 positions, not 1032: it dropped 512 "
                    r"to make room \(a context shift\)"),
])
def test_what_the_runtime_did_with_a_crossing_prompt_is_reported(backend: R.RkllmBackend, model: str, fault: str,
                                                                 said: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_FAULTS", fault)
    with backend.open_runtime(model, 1024) as rt:
        rt.prefill(tokens(512))
        with pytest.raises(ContextLimitExceeded, match=said):
            rt.prefill(tokens(520))


def test_a_closed_runtime_says_so(backend: R.RkllmBackend, model: str) -> None:
    rt = backend.open_runtime(model)
    rt.close()
    rt.close()  # twice is fine
    with pytest.raises(RuntimeFailure, match="is closed"):
        rt.prefill([1])


# --- the runtime conformance groups, unchanged, on the stand-in -------------------------------


def run_suite(pytester: pytest.Pytester, library: str, model: str, *args: str, options: str = "") -> pytest.RunResult:
    shape = S.write_shape(pytester.path)
    return suite_runs.run_suite(pytester, f"rkllm[library={library},shape={shape}{options}]", "--longctx-seed=5",
                                "-rfEs", *args, model=model, shape=None, module=None, positions="1024,2048,4096")


def test_runtime_suite_passes_on_the_standin(pytester: pytest.Pytester, library: str, model: str) -> None:
    """The same suite that runs on a board runs here through ctypes on the stand-in."""
    result = run_suite(pytester, library, model)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 23 and "failed" not in outcomes and "errors" not in outcomes, \
        result.stdout.str()


def test_runtime_suite_passes_with_13s_own_greedy_decode(pytester: pytest.Pytester, standin_dir: Path,
                                                        model: str) -> None:
    """On 1.3 the runtime's decode loop is exact (per-run greedy sampling, max_new_tokens,
    ignore_eos_token), so the rate and limit groups can time the runtime's own decode."""
    result = run_suite(pytester, standin(standin_dir, "1.3.0"), model, options=",generate=native")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 23 and "failed" not in outcomes and "errors" not in outcomes, \
        result.stdout.str()


# The suite's verdicts on faults, run once on the current release's ABI: the binding's handling
# of the same faults is tested on both ABIs above.
def test_runtime_suite_reports_a_half_applied_prompt(pytester: pytest.Pytester, standin_dir: Path, model: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_FAULTS", "limit-half")
    result = run_suite(pytester, standin(standin_dir, "1.3.0"), model, "-m", "longctx_limits")
    result.assert_outcomes(passed=4, failed=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["*prefill of 520 tokens at position 3584 (limit 4096)=half-applied: took * of 520 "
                                 "tokens before raising ContextLimitExceeded*"])


def test_runtime_suite_fails_an_error_state_in_one_line_and_goes_on(pytester: pytest.Pytester, standin_dir: Path,
                                                                    model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_FAULTS", "error-state@7")
    result = run_suite(pytester, standin(standin_dir, "1.3.0"), model, "-m", "longctx_memory")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and outcomes.get("failed", 0) >= 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*raised RuntimeFailure: *ERROR*"])
    result.stdout.no_fnmatch_line("E   *")


def test_a_prompt_whose_logits_would_not_fit_is_refused_before_the_run(
        backend: R.RkllmBackend, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RKLLM may return a row of logits per input token; the binding checks they fit first."""
    with backend.open_runtime(model) as rt:
        monkeypatch.setattr(R.psutil, "virtual_memory", lambda: type("vm", (), {"available": 2 << 20})())
        with pytest.raises(NotSupported, match=r"a prompt of 2048 tokens would make the RKLLM runtime return "
                                               r"2048 x 512 float logits \(0.0 GiB\), more than half"):
            rt.prefill(tokens(2048))
        assert rt.positions() == 0  # refused before anything reached the runtime
        rt.prefill(tokens(64))  # 128 KiB of logits fits in half of 2 MiB


def test_one_row_of_logits_seen_lifts_the_guard(library: str, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_STANDIN_FAULTS", "logits-last-row")
    with R.RkllmBackend(library=library, shape=SHAPE).open_runtime(model) as rt:
        rt.prefill(tokens(8))  # one row for 8 tokens: the runtime returns the last row only
        monkeypatch.setattr(R.psutil, "virtual_memory", lambda: type("vm", (), {"available": 2 << 20})())
        assert rt.prefill(tokens(2048)).shape == (MODEL.vocab_size,)


# --- 1.3's per-run sampling, max_new_tokens and ignore_eos_token; models the runtime refuses ---------


def last_run(rt: R.RkllmRuntime) -> tuple:
    out = (ctypes.c_int * 4)()
    assert ctypes.CDLL(rt.library.path).rkllm_standin_last_run(rt._live(), out) == 0  # stand-in only
    return tuple(out)


def test_native_generate_on_13_is_greedy_per_run_and_bounded(standin_dir: Path, model: str) -> None:
    backend = R.RkllmBackend(library=standin(standin_dir, "1.3.0"), shape=SHAPE)
    with backend.open_runtime(model, generate="native", vocab_size=MODEL.vocab_size) as rt:
        prompt = tokens(32)
        rt.prefill(prompt)
        assert rt.generate(6) == S.greedy(prompt, 6)
        top_k, max_new, from_run, ignore_eos = last_run(rt)
        assert (top_k, max_new, from_run, ignore_eos) == (1, 6, 1, 1)


def test_an_eos_token_ends_native_generate_on_12_but_not_on_13(standin_dir: Path) -> None:
    prompt = [int(t) for t in tokens(16)]
    decoded = S.greedy(prompt, 8)
    eos = decoded[4]  # the runtime shows it as the 5th token after the first
    assert eos not in decoded[:4]
    eos_model = S.StandinModel(eos_token=eos)
    path = str(S.write_model(standin_dir, "standin-eos-ctx4096.rkllm", eos_model))
    old = R.RkllmBackend(library=standin(standin_dir, "1.2.1"), shape=SHAPE, generate="native")
    with old.open_runtime(path, vocab_size=MODEL.vocab_size) as rt:
        rt.prefill(prompt)
        with pytest.raises(RuntimeFailure, match=r"finished after showing 3 of the 8 tokens asked for \(an end-of-"
                                                 r"sequence token: RKLLM 1\.2 has no ignore_eos_token, 1\.3 has\)"):
            rt.generate(8)
    new = R.RkllmBackend(library=standin(standin_dir, "1.3.0"), shape=SHAPE, generate="native")
    with new.open_runtime(path, vocab_size=MODEL.vocab_size) as rt:
        rt.prefill(prompt)
        assert rt.generate(8) == decoded and rt.positions() == 24


@pytest.mark.parametrize("version", ABIS)
def test_a_model_of_another_toolkit_version_is_one_line_found_vs_expected(standin_dir: Path, version: str) -> None:
    other = "1.2.1" if version.startswith("1.3") else "1.3.0"
    path = S.write_model(standin_dir, f"standin-tk{other}-ctx4096.rkllm", S.StandinModel(toolkit_version=other))
    backend = R.RkllmBackend(library=standin(standin_dir, version), shape=SHAPE)
    with pytest.raises(SpecError) as info:
        backend.open_runtime(str(path))
    message = str(info.value)
    assert message.startswith(f"model file {path}: converted by rkllm-toolkit {other}, but the runtime is RKLLM "
                              f"{version}, which expects a model converted by rkllm-toolkit {version[:3]}.x"), message
    assert "model version" in message and "\n" not in message
    same = S.write_model(standin_dir, f"standin-tk{version}-ctx4096.rkllm", S.StandinModel(toolkit_version=version))
    with backend.open_runtime(str(same), vocab_size=MODEL.vocab_size) as rt:
        assert rt.positions() == 0


def test_a_model_for_another_platform_is_one_line_found_vs_expected(standin_dir: Path) -> None:
    path = S.write_model(standin_dir, "standin-ctx4096.rkllm", S.StandinModel(target_platform="RK3576"))
    backend = R.RkllmBackend(library=standin(standin_dir, "1.3.0"), shape=SHAPE)
    with pytest.raises(SpecError) as info:
        backend.open_runtime(str(path))
    message = str(info.value)
    assert message.startswith(f"model file {path}: converted for RK3576, but this board is RK3588: convert it with "
                              "target_platform=rk3588"), message
    assert "\n" not in message
