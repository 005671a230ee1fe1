"""The runtime groups must pass a correct whole-model runtime and catch every defect.

Each run goes through the installed suite in a pytester run on the toy runtime
of ``runtime_backends`` (a real attention layer with RoPE and a KV cache that
grows in NumPy memory), as tests/test_broken_backends.py does for KV caches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import pytest

from pytest_longctx.measure import golden as golden_logits
from pytest_longctx.measure import prefill
from pytest_longctx.measure.metrics import compare_logits
from pytest_longctx.tools import logits

from _suite_runs import failed_tests, run_suite

TESTS_DIR = Path(__file__).parent
POSITIONS = "1024,2048,4096"


@pytest.fixture
def toy(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytester.syspathinsert(TESTS_DIR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    import runtime_backends

    return Path(runtime_backends.write_model(str(pytester.path / "toy-ctx4096.toy")))


def run(pytester: pytest.Pytester, backend: str, model: Path, *args: str,
        subprocess: bool = False) -> pytest.RunResult:
    """The suite on a toy runtime; in a subprocess where memory is measured, so that the
    allocator's state left by earlier in-process runs cannot hide growth."""
    return run_suite(pytester, f"runtime_backends:{backend}", "-rfEs", "--longctx-seed=3", *args, model=model,
                     shape=None, module=None, positions=POSITIONS, subprocess=subprocess)


def test_correct_runtime_passes_every_runtime_group(pytester: pytest.Pytester, toy: Path) -> None:
    result = run(pytester, "ToyRuntimeBackend", toy, subprocess=True)
    outcomes = result.parseoutcomes()
    # 5 limits tests, 3 depths x (memory, prefill, decode, greedy, chunked, reset),
    # and the reference-logits test skipped at each depth without a reference file.
    assert outcomes.get("passed") == 23 and outcomes.get("skipped") == 3, result.stdout.str()
    assert "failed" not in outcomes and "errors" not in outcomes
    result.stdout.fnmatch_lines(["*no --longctx-reference-logits: accuracy against a float reference is not judged*"])
    # The KV-cache groups do not apply to a whole-model runtime: deselected, not skipped.
    assert outcomes.get("deselected", 0) > 0


DEFECTS = [
    ("HalfAppliesBackend", ["test_prompt_crossing_the_limit_is_rejected_whole"],
     "*half-applied: took 512 of 520 tokens before raising ContextLimitExceeded*"),
    ("SilentlyTakesMoreContextBackend", ["test_context_above_the_model_limit_is_clamped_or_refused"],
     "*context_limit when 4128 is asked of a model holding 4096=4128, but should be <= 4096 (clamped) or a refusal*"),
    ("ChunkPositionsRestartBackend", ["test_chunked_prefill_gives_the_one_shot_logits"] * 3,
     "*last logits of * tokens in chunks of 512 then 16 single tokens, against one prefill=KL * nats (max|Δlogit|*"
     "but should be KL <= 0.000143 nats (10 x the KL 1.43e-05 a correct llama.cpp showed with a float32 cache*"),
    ("LongRopeFactorsPerChunkBackend", ["test_chunked_prefill_gives_the_one_shot_logits"],
     "*last logits of 4096 tokens in chunks of 512 then 16 single tokens, against one prefill=KL * nats*"),
    ("ResetKeepsStaleKeysBackend", ["test_same_prompt_after_reset_gives_the_same_logits"] * 3,
     "*after reset(), against the first run=KL * nats (max|Δlogit|*"),
    ("KeepsTwoCopiesBackend", ["test_memory_growth_within_kv_bound"] * 3,
     "*peak memory growth from 0 to 1024 positions=*, but should be <= 51.2 MiB (analytic KV 32.0 MiB*"),
    ("NotGreedyBackend", ["test_timed_generation_is_greedy_at_depth"] * 3,  # a correctness failure, not a speed
     "*first generated token of repeat * at depth *=*, but should be the arg-max * of the logits before it (greedy)*"),
    ("WrapsAroundBackend", ["test_one_token_more_is_rejected_and_changes_nothing",
                            "test_prompt_crossing_the_limit_is_rejected_whole"],
     "*prefill of 1 token at the limit 4096=accepted (positions 4096), but should be ContextLimitExceeded*"),
    ("NanAfter2048Backend", None, "*NaN/Inf values (first at token 0), but should be finite*"),
]


@pytest.mark.parametrize(("backend", "failing", "message"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_runtime_groups_catch_defect(pytester: pytest.Pytester, toy: Path, backend: str,
                                     failing: Sequence[str], message: str) -> None:
    result = run(pytester, backend, toy, subprocess=backend == "KeepsTwoCopiesBackend")
    failed = failed_tests(result)
    if failing is not None:
        assert sorted(failed) == sorted(failing), result.stdout.str()
    else:
        assert failed, result.stdout.str()
    result.stdout.fnmatch_lines([message])
    result.stdout.no_fnmatch_line("E   *")  # one-line diagnoses, no traceback into the suite
    assert "errors" not in result.parseoutcomes()


def test_a_runtime_that_exits_fails_its_cases_in_one_line(pytester: pytest.Pytester, toy: Path) -> None:
    """exit() is not an Exception: the runtime side's guard catches it as the KV side's does
    (it escaped as a SystemExit traceback when the runtime groups caught Exception)."""
    result = run(pytester, "ExitsPastTheLimitBackend", toy, "-m", "longctx_limits")
    failed = sorted(failed_tests(result))
    assert failed == ["test_one_token_more_is_rejected_and_changes_nothing",
                      "test_prompt_crossing_the_limit_is_rejected_whole"], result.stdout.str()
    result.stdout.fnmatch_lines([
        "*prefill of 1 token at the limit 4096 raised SystemExit: rkllm_run failed: -1, "
        "but should be ContextLimitExceeded [[]toy-runtime*",
        "*prefill of 520 tokens at position 3584 (limit 4096)=SystemExit: rkllm_run failed: -1, "
        "but should be ContextLimitExceeded*",
    ])
    result.stdout.no_fnmatch_line("E   *")
    assert "errors" not in result.parseoutcomes()

    opening = run(pytester, "ExitsOnOpenBackend", toy, "-m", "longctx_limits")
    assert opening.parseoutcomes().get("errors") == 5, opening.stdout.str()
    opening.stdout.fnmatch_lines(["*open_runtime('*', context=None) raised SystemExit: rkllm_init failed: -1*"])
    opening.stdout.no_fnmatch_line("E   *")


def test_a_failing_close_is_warned_not_swallowed(pytester: pytest.Pytester, toy: Path) -> None:
    result = run(pytester, "CloseRaisesBackend", toy, "-m", "longctx_limits")
    result.assert_outcomes(passed=5, warnings=2)  # the module's runtime and the one opened above the limit
    result.stdout.fnmatch_lines(["*CloseWarning: close() of the runtime opened with context 4128 raised RuntimeError: "
                                 "rkllm_destroy failed: -2",
                                 "*CloseWarning: close() of the runtime raised RuntimeError: rkllm_destroy failed: -2"])


def test_reference_logits_written_by_the_command_judge_a_runtime(pytester: pytest.Pytester, toy: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pytester.path)
    golden = pytester.path / "golden.npz"
    status = logits.main(["--backend", "runtime_backends:ToyRuntimeBackend", "--model", str(toy),
                          "--positions", POSITIONS, "--seed", "11", "-o", str(golden)])
    assert status == 0
    loaded = golden_logits.load(str(golden))
    assert loaded.depths == [1024, 2048, 4096] and loaded.logits.shape == (3, 16, 64)
    assert loaded.meta["seed"] == 11 and loaded.meta["context"] == 4096

    good = run(pytester, "ToyRuntimeBackend", toy, f"--longctx-reference-logits={golden}", "-k", "reference")
    good.assert_outcomes(passed=3)
    bad = run(pytester, "NoisyLogitsBackend", toy, f"--longctx-reference-logits={golden}", "-k", "reference")
    bad.assert_outcomes(failed=3)
    bad.stdout.fnmatch_lines(["*mean KL divergence from the reference logits over the last 16 positions=* nats, "
                              "but should be <= 0.05 nats*"])


def test_a_bad_reference_file_fails_naming_it(pytester: pytest.Pytester, toy: Path) -> None:
    junk = pytester.path / "junk.npz"
    junk.write_bytes(b"not a zip")
    result = run(pytester, "ToyRuntimeBackend", toy, f"--longctx-reference-logits={junk}", "-k", "reference")
    result.assert_outcomes(errors=3)  # the module's reference fixture fails, once per case
    result.stdout.fnmatch_lines([f"*reference logits {junk}: not a file written by longctx-logits*"])


def test_a_missing_model_fails_every_runtime_case_in_one_line(pytester: pytest.Pytester, toy: Path) -> None:
    missing = pytester.path / "missing-ctx4096.toy"
    result = run(pytester, "ToyRuntimeBackend", missing, "-m", "longctx_limits")
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors") == 5 and "passed" not in outcomes, result.stdout.str()
    result.stdout.no_fnmatch_line("*During handling*")
    result.stdout.fnmatch_lines([f"*open_runtime('{missing}', context=None) raised SpecError: model {missing}: "
                                 "no such file*"])


def test_without_a_model_the_runtime_groups_skip_saying_so(pytester: pytest.Pytester) -> None:
    pytester.syspathinsert(TESTS_DIR)
    result = pytester.runpytest("--longctx-backend=runtime_backends:ToyRuntimeBackend", "-m",
                                "longctx_limits", "-rs")
    result.assert_outcomes(skipped=5, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["*no --longctx-model: toy-runtime is a whole-model runtime and needs a model file*"])


def test_cache_backends_and_runtimes_run_side_by_side(pytester: pytest.Pytester, toy: Path) -> None:
    """A matrix of a KV-cache backend and a runtime: each group runs on the kind it certifies."""
    args = ("--longctx-backend=cpu", "--longctx-backend=runtime_backends:ToyRuntimeBackend",
            f"--longctx-model={toy}", "--longctx-positions=1024",
            "--longctx-shape=n_layers=1,n_heads=2,n_kv_heads=1,head_dim=32",
            "-m", "longctx_limits", "--collect-only", "-q")
    result = pytester.runpytest(*args)
    ids = [line for line in result.outlines if "::" in line]
    assert any("test_runtime_limits.py" in i and "ToyRuntimeBackend" in i for i in ids)
    assert any("test_limits.py" in i and "[cpu-" in i for i in ids)
    assert not any("test_runtime_limits.py" in i and "[cpu" in i for i in ids)
    assert not any("test_limits.py" in i and "ToyRuntimeBackend" in i for i in ids)
    header = pytester.runpytest(*args[:-1])  # without -q: the header names both geometries
    header.stdout.fnmatch_lines([f"longctx: backend cpu*, runtime_backends:ToyRuntimeBackend* | shape n_layers=1* | "
                                 f"model {toy} (geometry read from it) | *"])


def test_compare_logits_reads_kl_top1_and_relative_difference() -> None:
    reference = np.array([2.0, 1.0, 0.0, -1.0])
    same = compare_logits(reference, reference)
    assert same.kl == 0.0 and same.top1 and same.relative == 0.0
    swapped = compare_logits(np.array([1.0, 2.0, 0.0, -1.0]), reference)
    assert not swapped.top1 and swapped.kl > 0.1 and swapped.relative == pytest.approx(0.5)
    assert compare_logits(np.array([np.nan, 0, 0, 0]), reference).kl == float("inf")


def test_tail_logits_gives_one_row_per_single_token_prefill(toy: Path) -> None:
    import runtime_backends

    runtime = runtime_backends.ToyRuntimeBackend().open_runtime(str(toy))
    ids = prefill.token_ids(1, runtime.vocab_size, 600)
    rows = prefill.tail_logits(runtime.prefill, ids, 4, 512)
    assert rows.shape == (4, runtime.vocab_size) and runtime.positions() == 600
    runtime.reset()
    np.testing.assert_allclose(rows[-1], runtime.prefill(ids), rtol=1e-5, atol=1e-6)  # the same position


def test_figures_of_a_runtime_run_name_the_models_geometry_and_rerun_without_a_shape(
        pytester: pytest.Pytester, toy: Path) -> None:
    """The runtime's kv_spec is the geometry in play, not the run's --longctx-shape (issue 13.5)."""
    report = pytester.path / "cert.json"
    result = run(pytester, "ChunkPositionsRestartBackend", toy, "-k", "chunked", f"--longctx-report={report}")
    result.stdout.fnmatch_lines(["*longctx figures*", f"model {toy.name} (8L 8h/8kv d64 *), seed 3"])
    result.stdout.no_fnmatch_line("shape *")
    # The header and the certificate do not present the unused default shape as the geometry.
    result.stdout.fnmatch_lines([f"longctx: backend runtime_backends:ChunkPositionsRestartBackend* | "
                                 f"model {toy} (geometry read from it) | positions *"])
    result.stdout.no_fnmatch_line("longctx: backend * | shape *")
    assert json.loads(report.read_text())["settings"]["shape"]["applies"] is False
    reruns = {line for line in result.outlines if line.startswith("pytest ") and "--longctx-backend=" in line}
    assert len(reruns) == 3, result.stdout.str()
    for line in reruns:
        assert "--longctx-shape" not in line and f"--longctx-model={toy}" in line, line


def test_geometry_line_names_the_shape_for_cache_figures_and_the_model_for_runtime_figures() -> None:
    from pytest_longctx.session.terminal import geometry_line

    cache = {"check": "attend"}
    runtime = {"check": "chunked", "model": "m.gguf", "geometry": "3L 6h/2kv d32 rope=default/gptj"}
    assert geometry_line("qwen3-0.6b", "28L 16h/8kv d128", 3, [runtime, runtime]) == \
        "model m.gguf (3L 6h/2kv d32 rope=default/gptj), seed 3"
    assert geometry_line("qwen3-0.6b", "28L 16h/8kv d128", 3, [cache, runtime]) == \
        "shape qwen3-0.6b (28L 16h/8kv d128), model m.gguf (3L 6h/2kv d32 rope=default/gptj), seed 3"


# --- the consistency bound (issue 13.4) ---------------------------------------------------


def test_consistency_bound_is_measured_and_keyed_on_the_declared_kv_precision() -> None:
    from pytest_longctx.measure.consistency import FACTOR, NOISE, PRECISION_ORDER, consistency_bound

    for dtype, noise in NOISE.items():
        bound = consistency_bound(dtype)
        assert bound.noise is not None and bound.kl >= FACTOR * noise.kl
        assert f"the KL {bound.noise.kl:.3g} a correct llama.cpp showed with a {bound.noise.kv_dtype} cache" \
            in bound.describe()
    kls = [consistency_bound(d).kl for d in PRECISION_ORDER]
    assert kls == sorted(kls), "a coarser cache is held to a tighter bound than a finer one"
    assert consistency_bound("bfloat16").kl == consistency_bound("float16").kl  # not measured: the envelope
    given = consistency_bound("float16", 0.5)
    assert given.kl == 0.5 and given.noise is None and "--longctx-consistency-kl" in given.describe()


def _issue_pair() -> tuple:
    """One-shot logits of the tiny models' scale (largest 2.1) and a chunked run that differs
    as issue 13's llama.cpp run did (max|Δlogit| 2.27 % of the largest logit, KL 8.73e-05,
    same top-1): rounding noise scaled to the issue's KL."""
    rng = np.random.default_rng(13)
    one = rng.standard_normal(256)
    one *= 2.1 / np.abs(one).max()
    delta = rng.standard_normal(256)
    delta *= np.sqrt(8.73e-05 / compare_logits(one + delta, one).kl)
    return one, one + delta


def test_noise_of_the_size_issue_13_saw_passes_a_float16_runtime_and_a_chunking_bug_does_not() -> None:
    from types import SimpleNamespace

    from pytest_longctx.conformance._runtime import consistency

    one, chunked = _issue_pair()
    seen = compare_logits(chunked, one)
    assert seen.relative > 0.02 and 5e-05 < seen.kl < 1.5e-04 and seen.top1
    runtime = SimpleNamespace(kv_spec=SimpleNamespace(kv_dtype="float16"))
    judged = consistency(chunked, one, runtime, SimpleNamespace(consistency_kl=None))
    assert judged.passed, judged.record()["bound"]


@pytest.mark.parametrize("backend", ["ChunkPositionsRestartBackend", "LongRopeFactorsPerChunkBackend"])
def test_chunking_bugs_give_kl_orders_of_magnitude_above_the_bound(pytester: pytest.Pytester, toy: Path,
                                                                    backend: str) -> None:
    import json

    report = pytester.path / "report.json"
    run(pytester, backend, toy, "-k", "chunked", f"--longctx-report={report}")
    figures = [f for c in json.loads(report.read_text())["cases"] for f in c["figures"]]
    failed = [f for f in figures if not f["passed"]]
    assert failed and all(f["kl"] > 100 * f["threshold"] for f in failed), failed


@pytest.mark.parametrize("how", [("--longctx-isolate",), ("-n", "2"), ("-n", "2", "--dist=each")],
                         ids=["isolated", "xdist", "xdist-each"])
def test_runtime_that_crashes_on_load_is_never_certified(pytester: pytest.Pytester, toy: Path,
                                                         how: Tuple[str, ...]) -> None:
    """A runtime whose model load segfaults: every case of the suite is in the certificate,
    filed under its question by marker, and the verdict is not certified, never 'certified'
    beside pytest's exit status 1 nor 'incomplete' with no case in it."""
    report = pytester.path / "cert.json"
    result = run(pytester, "SegfaultsOnLoadBackend", toy, "--longctx-positions=1024", f"--longctx-report={report}",
                 *how, subprocess=True)
    document = json.loads(report.read_text())
    assert document["verdict"] != "certified", document["reasons"]
    if result.ret == pytest.ExitCode.INTERNAL_ERROR and "--dist=each" in how:
        # pytest-xdist's 'each' scheduler can fail replacing two crashed workers (KeyError in
        # each.py schedule, seen with xdist 3.8.0): the run ends early, never certified.
        assert any("exit status 3" in reason for reason in document["reasons"]) or \
            document["verdict"] == "not certified", document["reasons"]
        return
    assert result.ret == 1, result.stdout.str()
    assert document["verdict"] == "not certified", document["reasons"]
    questions = {case["question"] for case in document["cases"]}
    assert questions == {"limits", "memory", "throughput", "equivalence"}, questions
    assert len(document["cases"]) >= 8
    assert any(case["outcome"] in ("failed", "error") for case in document["cases"])
