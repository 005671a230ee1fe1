"""The transformers backend against the runtime contract, on a tiny random-weight model it writes.

The model is written once per session with transformers' own config class (LlamaConfig: 2
layers, hidden 64, 4 heads over 2 KV heads, vocab 256, 2048 positions; nothing is downloaded).
Its weights are drawn with std 0.2, not transformers' 0.02, so that logits depend on the context:
at 0.02 the logits of a 1024-token prompt move by a KL of 1e-4 when half its tokens change, too
little for the equivalence group to tell a bug from rounding. One torch thread: on a shared
2-core machine two threads wait on each other (30x slower prefill measured here).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[transformers]'")

from pytest_longctx.access.registry import load_backend  # noqa: E402
from pytest_longctx.backends import transformers_backend as T  # noqa: E402
from pytest_longctx.errors import (  # noqa: E402
    BackendUnavailable, ContextClamped, ContextLimitExceeded, NotSupported, RuntimeFailure, SpecError,
)
from pytest_longctx.measure.metrics import compare_logits  # noqa: E402
from pytest_longctx.protocol import ModelRuntime, RuntimeBackend  # noqa: E402

from _suite_runs import failed_tests, failing_import, run_suite  # noqa: E402

TESTS_DIR = Path(__file__).parent
CONTEXT, VOCAB = 2048, 256
POSITIONS = "512,1024,2048"


def write_tiny_model(path: Path, context: int = CONTEXT, seed: int = 0) -> Path:
    """A 2-layer random-weight Llama saved as a Hugging Face model directory."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.2,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            logging.enable_progress_bar()
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def backend() -> T.TransformersBackend:
    return T.TransformersBackend(threads=1)


@pytest.fixture
def rt(backend: T.TransformersBackend, model_dir: Path) -> Iterator[T.TransformersRuntime]:
    runtime = backend.open_runtime(str(model_dir), 1024)
    yield runtime
    runtime.close()


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


# --- options and availability ---

@pytest.mark.parametrize("text, message", [
    ("transformers[dtype=int8]", "dtype='int8', but should be one of float32, float16, bfloat16"),
    ("transformers[attn=flash]", "attn='flash', but should be one of sdpa, eager"),
    ("transformers[threads=0]", "threads=0, but should be a positive integer"),
    ("transformers[device=cuda:x]", "device='cuda:x', but should be a torch device such as cpu, cuda or cuda:1"),
    ("transformers[device=tpu]", "device='tpu', but should be"),
])
def test_malformed_option_is_a_spec_error_naming_it(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_backend(text)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_a_device_this_torch_lacks_is_unavailable_naming_what_exists() -> None:
    with pytest.raises(BackendUnavailable, match=r"device=cuda:1 asked, but torch .* has no usable cuda device "
                                                 r"\(devices here: cpu\)"):
        T.TransformersBackend(device="cuda:1")


def test_missing_torch_or_transformers_is_unavailable_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    failing_import(monkeypatch, ImportError("No module named 'torch'"), "torch")
    with pytest.raises(BackendUnavailable, match=r"torch is not installed .*pip install torch==.*\[transformers\]"):
        T.TransformersBackend()
    monkeypatch.undo()
    failing_import(monkeypatch, ImportError("No module named 'transformers'"), "transformers")
    with pytest.raises(BackendUnavailable, match=r"transformers with StaticCache is not importable .*"
                                                 r"pip install 'pytest-longctx\[transformers\]'"):
        T.TransformersBackend()


def test_registered_as_a_runtime_and_reports_versions(backend: T.TransformersBackend) -> None:
    from pytest_longctx.access.registry import declared_kind

    assert declared_kind("transformers") == "runtime"
    loaded = load_backend("transformers[device=cpu,dtype=float32,threads=1]")
    assert isinstance(loaded, T.TransformersBackend) and isinstance(loaded, RuntimeBackend)
    info = backend.info()
    assert info.device_kind == "cpu" and info.device_name
    assert info.versions["torch"] == torch.__version__ and info.versions["transformers"] == transformers.__version__
    assert info.kv_dtypes == ("float32", "float16", "bfloat16")


# --- bad model directories ---

def test_a_path_that_is_not_a_model_directory_is_named(backend: T.TransformersBackend, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        backend.open_runtime(str(tmp_path / "missing"))
    (tmp_path / "file.gguf").write_bytes(b"GGUF")
    with pytest.raises(SpecError, match="is not a directory"):
        backend.open_runtime(str(tmp_path / "file.gguf"))
    with pytest.raises(SpecError, match="is not a Hugging Face model directory: it has no config.json"):
        backend.open_runtime(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="config.json cannot be read"):
        backend.open_runtime(str(tmp_path))


def test_a_directory_without_weights_fails_in_one_line(
        backend: T.TransformersBackend, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(SpecError) as info:
        backend.open_runtime(str(tmp_path))
    assert "transformers cannot load it as a causal LM" in str(info.value) and "\n" not in str(info.value)


def test_a_cache_larger_than_memory_is_refused_before_it_is_allocated(
        backend: T.TransformersBackend, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "_free_memory", lambda torch, device: (1 << 20, "host memory"))
    with pytest.raises(NotSupported, match=r"needs at least .* GiB .*static KV cache of 2048 positions.*but host "
                                           r"memory has 0.00 GiB free"):
        backend.open_runtime(str(model_dir))


# --- the contract ---

def test_geometry_and_limits_come_from_the_config(backend: T.TransformersBackend, model_dir: Path,
                                                   rt: T.TransformersRuntime) -> None:
    assert isinstance(rt, ModelRuntime)
    assert rt.model_context_limit == CONTEXT and rt.context_limit == 1024 and rt.vocab_size == VOCAB
    spec = rt.kv_spec
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (2, 4, 2, 16)
    assert spec.max_positions == 1024 and spec.kv_dtype == "float32" and spec.rope.kind == "default"
    # The whole static cache is allocated when the runtime opens: K and V of 1024 positions.
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in rt._cache.layers)
    assert held == spec.kv_bytes(1024)


def test_a_context_above_the_model_is_clamped_with_a_warning(backend: T.TransformersBackend,
                                                             model_dir: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = backend.open_runtime(str(model_dir), CONTEXT + 32)
    assert runtime.context_limit == CONTEXT
    assert any(isinstance(w.message, ContextClamped) and "2080 requested" in str(w.message) for w in caught)


@pytest.mark.parametrize("config, kind", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                           "rope_theta": 1e6}), "yarn"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024, "rope_theta": 5e5}), "llama3"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "linear"),
])
def test_rope_kinds_of_the_config_reach_the_spec(config: dict, kind: str) -> None:
    qwen3 = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, **config)
    spec = T.spec_of(qwen3, 4096, "bfloat16", "qwen3")
    assert spec.rope.kind == kind and spec.rope.theta == config["rope_parameters"]["rope_theta"]
    assert spec.head_dim == 32 and spec.kv_dtype == "bfloat16" and spec.sliding_window is None


def test_sliding_windows_are_read_and_a_mix_is_not_supported() -> None:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  use_sliding_window=True, sliding_window=256)
    every = transformers.Qwen2Config(max_window_layers=0, **common)
    assert T.spec_of(every, 1024, "float32", "q").sliding_window == 256
    with pytest.raises(NotSupported, match="mixes sliding-window and full-attention layers"):
        T.spec_of(transformers.Qwen2Config(max_window_layers=1, **common), 1024, "float32", "q")


def test_prefill_generate_positions_reset_and_stats(rt: T.TransformersRuntime) -> None:
    ids = _ids(300)
    logits = rt.prefill(ids)
    assert logits.shape == (VOCAB,) and logits.dtype == np.float32 and rt.positions() == 300
    tokens = rt.generate(8)
    assert tokens[0] == int(np.argmax(logits)) and rt.positions() == 308
    stats = rt.stats()
    assert stats.prefill_tokens == 300 and stats.generate_tokens == 8 and stats.prefill_seconds > 0
    # Greedy: the same prompt again gives the same tokens; reset empties the cache.
    rt.reset()
    assert rt.positions() == 0 and all(float(layer.keys.abs().max()) == 0 for layer in rt._cache.layers)
    rt.prefill(ids)
    assert rt.generate(8) == tokens
    with pytest.raises(ValueError, match="token ids span"):
        rt.prefill([VOCAB])


def test_a_prompt_past_the_context_is_refused_and_the_context_kept(rt: T.TransformersRuntime) -> None:
    ids = _ids(1030, seed=1)
    rt.prefill(ids[:1000])
    expected = rt.prefill(ids[1000:1001])
    rt.reset()
    rt.prefill(ids[:1000])
    with pytest.raises(ContextLimitExceeded, match="a prompt of 30 tokens to a context holding 1000 would pass "
                                                   "max_positions=1024"):
        rt.prefill(ids[1000:1030])
    assert rt.positions() == 1000
    np.testing.assert_array_equal(rt.prefill(ids[1000:1001]), expected)


def test_a_failure_inside_the_model_puts_every_layer_back(rt: T.TransformersRuntime,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 0 has stored the tokens when layer 1 fails: the context must still hold what it held."""
    ids = _ids(200, seed=2)
    rt.prefill(ids[:100])
    expected = rt.prefill(ids[100:200])
    rt.reset()
    rt.prefill(ids[:100])

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(rt._cache.layers[1], "update", broken)
    with pytest.raises(RuntimeFailure) as info:
        rt.prefill(ids[100:200])
    assert "RuntimeError: out of memory (simulated)" in str(info.value) and "holds 100 positions (+0" in str(info.value)
    monkeypatch.undo()
    assert [int(layer.get_seq_length()) for layer in rt._cache.layers] == [100, 100]
    np.testing.assert_array_equal(rt.prefill(ids[100:200]), expected)


def test_batched_prefill_gives_the_one_pass_logits(backend: T.TransformersBackend, model_dir: Path,
                                                   rt: T.TransformersRuntime) -> None:
    ids = _ids(700, seed=3)
    one = rt.prefill(ids)
    batched = backend.open_runtime(str(model_dir), 1024, n_batch=256)
    assert compare_logits(batched.prefill(ids), one).kl < 1e-9 and batched.positions() == 700


# --- the suite on it ---

def _run(pytester: pytest.Pytester, backend: str, model: Path, *args: str) -> pytest.RunResult:
    return run_suite(pytester, backend, "--longctx-seed=3", "-rfEs", *args, model=model, shape=None, module=None,
                     positions=POSITIONS)


def test_the_runtime_groups_pass_the_transformers_runtime(pytester: pytest.Pytester, model_dir: Path) -> None:
    result = _run(pytester, "transformers[threads=1]", model_dir)
    outcomes = result.parseoutcomes()
    # 5 limits tests, 3 depths x (memory, prefill, decode, greedy, chunked, reset); the
    # reference-logits test skips at each depth without a reference file.
    assert outcomes.get("passed") == 23 and outcomes.get("skipped") == 3, result.stdout.str()
    assert "failed" not in outcomes and "errors" not in outcomes
    result.stdout.fnmatch_lines(["*model tiny-llama (2L 4h/2kv d16 rope=default/neox)*"])


BROKEN = [
    ("SilentlyTruncatesBackend", "longctx_limits",
     ["test_one_token_more_is_rejected_and_changes_nothing", "test_prompt_crossing_the_limit_is_rejected_whole"],
     "*prefill of 1 token at the limit 2048=accepted (positions 2048), but should be ContextLimitExceeded*"),
    ("ChunkPositionsRestartBackend", "longctx_equivalence",
     ["test_chunked_prefill_gives_the_one_shot_logits"] * 3,
     "*tokens in chunks of 512 then 16 single tokens, against one prefill=KL * nats*"),
]


@pytest.mark.parametrize(("backend", "group", "failing", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_the_runtime_groups_catch_a_broken_variant(pytester: pytest.Pytester, model_dir: Path, backend: str,
                                                   group: str, failing: list, message: str) -> None:
    monkey = pytest.MonkeyPatch()
    monkey.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    try:
        result = _run(pytester, f"broken_transformers:{backend}[threads=1]", model_dir, "-m", group)
    finally:
        monkey.undo()
    assert sorted(failed_tests(result)) == sorted(failing), result.stdout.str()
    result.stdout.fnmatch_lines([message])
    result.stdout.no_fnmatch_line("E   *")  # one-line diagnoses
    assert "errors" not in result.parseoutcomes()


def test_a_transformers_older_than_the_static_cache_api_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The module the backend imports now: an in-process pytester run before may have replaced it.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.55.4")
    with pytest.raises(BackendUnavailable, match=r"transformers 4.55.4 is older than 4.56, .*"
                                                 r"pip install -U 'transformers>=4.56'"):
        T.TransformersBackend()
    assert T._release("5.0.0rc1") == (5, 0) and T._release("4.57.6") == (4, 57)
