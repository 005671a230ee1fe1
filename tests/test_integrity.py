"""Integrity of a run (issue 7): a backend that crashes, hangs, leaks, games the suite or
returns garbage ends in the right verdict, the run completes and the certificate is
written and valid against its schema.

The backends are in ``misbehaving_backends`` (and ``misbehaving_import``) beside this
file. Each test runs the installed suite with pytester on a tiny shape and a selection
of the cases that meet the misbehaviour, with ``--longctx-report``; most run in process
(a crash happens in an isolated child, never in this process), the two that let a
crash end the run use a subprocess.
"""

from __future__ import annotations

import json
import os
import time
import shlex
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from pytest_longctx.access.runcontrol import is_run_control
from pytest_longctx.certify import certificate as cert
from pytest_longctx.isolation import forked, isolate
from pytest_longctx.measure.inputs import Inputs, Pool, distinct_slices
from pytest_longctx.measure.workloads import timed_pool_positions
from pytest_longctx.session.settings import Settings
from pytest_longctx.shapes import parse_shape

try:
    import jsonschema
except ImportError:  # the dev extra brings it; without it the certificates are checked, not validated
    jsonschema = None

TESTS_DIR = Path(__file__).parent
TINY = "n_layers=2,n_heads=4,n_kv_heads=1,head_dim=32,theta=10000"
DESCRIBED = "2L 4h/1kv d32 rope=default/neox"
# The memory bound's slack is 16 MiB: a leak must be larger (8 layers x 4096 positions x float32 = 32 MiB).
MEMORY_SHAPE = "n_layers=8,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"
DEADLINE = "--longctx-deadline=8"  # 2 s at 1024 positions: a quarter of the deadline at 16384


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.syspathinsert(TESTS_DIR)
    return pytester


def run(pytester: pytest.Pytester, backend: str, *args: str, shape: str = TINY, positions: str = "1024",
        subprocess: bool = False) -> Tuple[pytest.RunResult, Dict[str, Any]]:
    """Run the installed suite on ``backend`` with a certificate; the certificate must validate."""
    argv = [f"--longctx-backend={backend}", f"--longctx-shape={shape}", f"--longctx-positions={positions}",
            "--longctx-report=cert.json", "-rfE", *args]
    if subprocess:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYTHONPATH", str(TESTS_DIR), prepend=os.pathsep)
            result = pytester.runpytest_subprocess(*argv, timeout=120)
    else:
        result = pytester.runpytest(*argv)
    document = json.loads((pytester.path / "cert.json").read_text())
    if jsonschema is not None:
        jsonschema.validate(document, cert.schema())
    return result, document


def cases(document: Dict[str, Any], fragment: str) -> List[Dict[str, Any]]:
    found = [c for c in document["cases"] if fragment in c["nodeid"]]
    assert found, [c["nodeid"] for c in document["cases"]]
    return found


def no_traceback(result: pytest.RunResult) -> None:
    """The diagnosis is the failure: no traceback into the suite, no chained exception."""
    result.stdout.no_fnmatch_line("E   *")
    result.stdout.no_fnmatch_line("*During handling of the above exception*")
    result.stdout.no_fnmatch_line("*INTERNALERROR*")


# ----------------------------------------------------------------------------- crashes


@pytest.mark.parametrize(("backend", "how", "first_line"), [
    ("Segfault", "killed by SIGSEGV (signal 11)", "Fatal Python error: Segmentation fault"),
    ("Aborts", "killed by SIGABRT (signal 6)", "Fatal Python error: Aborted"),
    ("ExitsProcess", "exited with status 3", None),
])
def test_native_crash_fails_the_case_and_the_run_goes_on(pytester: pytest.Pytester, backend: str, how: str,
                                                         first_line: str) -> None:
    """Isolated: the crashing case fails with the signal and the last output; the next case
    gets a new child process; the certificate records both."""
    result, document = run(pytester, f"misbehaving_backends:{backend}", "--longctx-isolate",
                           "-k", "decode_attention_rate or lengths", positions="1024,2048")
    result.assert_outcomes(failed=2, passed=2, deselected=result.parseoutcomes()["deselected"])
    name = {"Segfault": "segfault", "Aborts": "aborts", "ExitsProcess": "exits-process"}[backend]
    lines = [f"case call=process {how}, but should be an answer or an exception "
             f"[[]{name} float32 @ 1024 positions, {DESCRIBED}]"]
    if first_line:
        lines += ["last output of the isolated process:", f"  {first_line}",
                  '  File "*misbehaving_backends.py", line * in attend']
    result.stdout.fnmatch_lines(lines)
    no_traceback(result)
    assert document["verdict"] == "not certified"
    for case in cases(document, "decode_attention_rate"):
        assert case["outcome"] == "failed" and how in case["message"], case
        assert case["rerun"].endswith("--longctx-isolate") and f"--longctx-seed={document['settings']['seed']}" in case["rerun"]
    assert {c["outcome"] for c in cases(document, "lengths")} == {"passed"}


def test_rerun_command_of_a_crashed_case_reproduces_it(pytester: pytest.Pytester) -> None:
    first, document = run(pytester, "misbehaving_backends:Segfault", "--longctx-isolate", "-k", "decode_attention_rate")
    (case,) = cases(document, "decode_attention_rate")
    argv = shlex.split(case["rerun"])
    assert argv[0] == "pytest"
    again = pytester.runpytest(*argv[1:])
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["case call=process killed by SIGSEGV (signal 11), *"])


def test_crash_without_isolation_leaves_a_checkpoint_certificate(pytester: pytest.Pytester) -> None:
    """Without --longctx-isolate a segfault ends the run, but not the certificate: the JSON
    written as each case starts names the case that was running."""
    result, document = run(pytester, "misbehaving_backends:Segfault", "-k", "decode_attention_rate or lengths",
                           subprocess=True)
    assert result.ret not in (0, 1)  # the process died
    assert document["verdict"] == "incomplete" and not document["complete"]
    assert any("the run did not finish" in r and "decode_attention_rate" in r for r in document["reasons"])
    (crashed,) = cases(document, "decode_attention_rate")
    assert crashed["outcome"] == "not run" and "the run ended while this case was running" in crashed["message"]
    assert {c["outcome"] for c in cases(document, "lengths")} == {"passed"}


def test_crashed_xdist_worker_is_a_failed_case_in_the_certificate(pytester: pytest.Pytester) -> None:
    """pytest-xdist replaces a crashed worker; its report of the crash reaches the certificate."""
    result, document = run(pytester, "misbehaving_backends:Segfault", "-n", "1", "-k", "decode_attention_rate or lengths",
                           subprocess=True)
    assert result.ret == 1
    (crashed,) = cases(document, "decode_attention_rate")
    assert crashed["outcome"] == "failed" and "crashed while running" in crashed["message"]
    assert document["verdict"] == "not certified"


# ----------------------------------------------------------------------------- hangs


@pytest.mark.parametrize("backend", ["SleepsInPython", "SleepsInC"])
def test_hang_a_signal_interrupts_fails_in_process(pytester: pytest.Pytester, backend: str) -> None:
    """Without isolation: a hang in Python or in a call a signal interrupts fails the case at
    its deadline, and the run goes on in the same process."""
    result, document = run(pytester, f"misbehaving_backends:{backend}", DEADLINE, "-k", "softcap or lengths")
    result.assert_outcomes(failed=1, passed=1, deselected=result.parseoutcomes()["deselected"])
    name = {"SleepsInPython": "sleeps-in-python", "SleepsInC": "sleeps-in-c"}[backend]
    result.stdout.fnmatch_lines([
        "case call=no answer in 2 s (interrupted in attend, misbehaving_backends.py:*), but should finish within "
        f"its deadline (--longctx-deadline=8 s at 16384 positions, 2 s at 1024) [[]{name} float32 @ 1024 positions, *]"])
    no_traceback(result)
    (hung,) = cases(document, "softcap")
    assert hung["outcome"] == "failed" and "no answer in 2 s" in hung["message"]


def test_native_hang_is_ended_with_isolation(pytester: pytest.Pytester) -> None:
    """A native deadlock no signal ends: the parent dumps the child's stack, ends it at the
    deadline plus grace, and the next case runs in a new child."""
    result, document = run(pytester, "misbehaving_backends:NativeDeadlock", DEADLINE, "--longctx-isolate",
                           "-k", "softcap or lengths", positions="1024,2048")
    result.assert_outcomes(failed=1, passed=2, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines([
        "case call=no answer in 2 s (still running after * s: the process was ended), but should finish within "
        "its deadline (--longctx-deadline=8 s at 16384 positions, 2 s at 2048) [[]native-deadlock float32 @ *]",
        "last output of the isolated process:",
        '  File "*misbehaving_backends.py", line * in attend'])
    (hung,) = cases(document, "softcap")
    assert hung["outcome"] == "failed" and "the process was ended" in hung["message"]
    assert document["verdict"] == "not certified"


def test_host_memory_running_out_ends_the_child(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent ends a child that holds memory while the host runs out (simulated: no memory free)."""
    monkeypatch.setattr(isolate, "host_free", lambda: 0)
    monkeypatch.setattr(isolate, "host_reserve_bytes", lambda: 1)
    result, document = run(pytester, "broken_backends:CorrectBackend", "--longctx-isolate", "-k", "softcap")
    result.stdout.fnmatch_lines(["case *=process ended holding * GiB while the host had 0.00 GiB free, but should "
                                 "be leaving the host at least 0.00 GiB [[]correct float32 @ 1024 positions, *]"])
    (case,) = cases(document, "softcap")
    assert case["verdict"] == "fail"


# ----------------------------------------------------------------------------- memory and gaming


def test_leaking_backend_fails_the_memory_group(pytester: pytest.Pytester) -> None:
    # In a subprocess: freed heap left by earlier in-process runs would let the leak reuse it unseen.
    result, document = run(pytester, "misbehaving_backends:Leaks", "-m", "longctx_memory", shape=MEMORY_SHAPE,
                           positions="4096", subprocess=True)
    result.assert_outcomes(failed=1, passed=2, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines([
        "memory kept after close() (RSS)=* MiB of the * MiB the fill took, but should be <= 19.2 MiB "
        "(analytic 32.0 MiB x 0.10 + 16.0 MiB): the backend leaks [[]leaks float32 @ 4096 positions, *]"])
    (leak,) = cases(document, "returned_after_close")
    assert leak["outcome"] == "failed"
    assert [f["passed"] for f in leak["figures"] if f["check"] == "memory after close"] == [False]


def test_correct_backend_returns_its_memory(pytester: pytest.Pytester) -> None:
    result, _ = run(pytester, "broken_backends:CorrectBackend", "-m", "longctx_memory", shape=MEMORY_SHAPE,
                    positions="4096")
    result.assert_outcomes(passed=3, deselected=result.parseoutcomes()["deselected"])


def test_memorising_backend_fails_throughput(pytester: pytest.Pytester) -> None:
    """Right answers from a cache of earlier answers: MLPerf TEST04's probe catches it."""
    result, document = run(pytester, "misbehaving_backends:Memorises", "-k", "decode_attention_is_not_answered")
    result.assert_outcomes(failed=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines([
        "attend of a repeated query on layer *=*x faster than fresh queries (median of 9 triplets, measured twice), "
        "but should be at most 3x x *.* (two fresh queries' own ratio): the backend answers from a cache of "
        "earlier answers (MLPerf TEST04) [[]memorises float32 @ 1024 positions, *]"])
    (case,) = cases(document, "decode_attention_is_not_answered")
    (figure,) = [f for f in case["figures"] if f["check"] == "repeated input"]
    assert figure["value"] > 3 * figure["noise"] and not figure["passed"]


def test_repeat_probe_rotates_its_order_and_measures_the_machines_own_noise() -> None:
    """Each kind of call (fresh, repeated, control) takes each place of a triplet equally often,
    and the bar follows the fresh-vs-fresh ratio: a machine that makes two fresh calls differ
    3x cannot pass for a cache of answers, while one 1000x faster still shows."""
    from pytest_longctx.measure.workloads import RepeatProbe, time_repeated_input

    order: List[str] = []

    class Recording:
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            order.append("r" if q[0, 0] == 0 else "f")
            return q

    queries = np.arange(19, dtype=np.float32).reshape(19, 1)
    probe = time_repeated_input(type("B", (), {"synchronize": lambda self: None})(), Recording(), 0, queries, 9)
    triplets = ["".join(order[1 + 3 * i:4 + 3 * i]) for i in range(9)]
    assert {t.index("r") for t in triplets} == {0, 1, 2} and len(probe.control) == 9
    loaded = RepeatProbe(fresh=[3.0] * 9, repeated=[1.0] * 9, control=[1.0] * 9)
    assert loaded.speedup() == 3.0 and loaded.noise() == 3.0  # bar 3 x 3: passes
    cached = RepeatProbe(fresh=[1.0] * 9, repeated=[0.001] * 9, control=[1.0] * 9)
    assert cached.speedup() == pytest.approx(1000) and cached.noise() == 1.0  # bar 3: fails


def test_fast_wrong_reads_fail_throughput_not_limits(pytester: pytest.Pytester) -> None:
    """A quick single-position read that returns zeros: the limits group reads windows and
    passes; a timed read drawn at random is checked (TEST01) and fails retrieve."""
    result, _ = run(pytester, "misbehaving_backends:FastWrongReads", "-k", "retrieve or fills_to_exactly")
    result.assert_outcomes(failed=1, passed=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["timed read of layer * at position *: V: max|error|=*, but should be <= * "
                                 "[[]fast-wrong-reads float32 @ 1024 positions, *]"])


def test_nan_after_8k_fails_only_past_8k(pytester: pytest.Pytester) -> None:
    """NaN past 8192 positions: equivalence fails there, and so does the timed attention
    sampled against the reference (TEST01: a fast wrong answer is not a speed)."""
    result, document = run(pytester, "misbehaving_backends:NaNAfter8K", "-k", "attention_matches or decode_attention_timed",
                           positions="2048,8320")
    result.assert_outcomes(failed=2, passed=2, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines([
        "timed decode attention of layer * (token *): NaN/Inf values=* (the first at index (0, 1, 0)), but should "
        "be 0 [[]nan-after-8k float32 @ 8320 positions, *]"])
    result.stdout.fnmatch_lines(["attend with * at positions ..8319*: NaN/Inf values=* (the first at index *), but should be 0*"])
    outcomes = {c["positions"]: c["outcome"] for c in document["cases"] if "decode_attention_timed" in c["nodeid"]}
    assert outcomes == {2048: "passed", 8320: "failed"}


# ----------------------------------------------------------------------------- bad results and exceptions


def test_wrong_dtype_is_a_one_line_diagnosis(pytester: pytest.Pytester) -> None:
    result, _ = run(pytester, "misbehaving_backends:WrongDtype", "-k", "softcap")
    result.assert_outcomes(failed=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["attend output of layer 0 dtype=int32, but should be a real floating type "
                                 "(float16, float32, float64) [[]wrong-dtype float32 @ 1024 positions, *]"])
    no_traceback(result)


def test_read_only_non_contiguous_results_are_legitimate(pytester: pytest.Pytester) -> None:
    """The suite only reads results: read-only strided views pass every group they reach."""
    result, document = run(pytester, "misbehaving_backends:ReadOnlyViews", "-k", "not rope and not features")
    assert set(result.parseoutcomes()) == {"passed", "deselected"}, result.stdout.str()
    assert document["verdict"] == "certified"


@pytest.mark.parametrize(("backend", "line"), [
    ("RaisesBaseException", "attend(layer 0, n_q=1) raised VendorAbort: NPU command queue reset"),
    ("CallsExit", "append(0, 3 positions) raised SystemExit: rknn_run failed: -1"),
])
def test_any_exception_is_a_one_line_failure(pytester: pytest.Pytester, backend: str, line: str) -> None:
    """BaseException subclasses of a vendor and SystemExit fail the case, never the run."""
    result, document = run(pytester, f"misbehaving_backends:{backend}", "-k", "softcap or lengths")
    assert result.parseoutcomes().get("failed", 0) >= 1 and "errors" not in result.parseoutcomes()
    result.stdout.fnmatch_lines([line])
    no_traceback(result)
    assert document["verdict"] == "not certified"


@pytest.mark.parametrize(("backend", "isolated", "message"), [
    ("misbehaving_import:Backend", False, "importing misbehaving_import:Backend raised ImportError: librkllmrt.so: "
                                          "cannot open shared object file: No such file or directory"),
    ("misbehaving_import:Backend", True, "importing misbehaving_import:Backend raised ImportError: librkllmrt.so: *"),
    ("broken_backends:RaisingFactory", True, "backend 'broken_backends:RaisingFactory' factory raised RuntimeError: "
                                             "driver crashed while initialising"),
    ("misbehaving_backends:SegfaultOnLoad", True, "backend 'misbehaving_backends:SegfaultOnLoad' was killed by "
                                                  "SIGSEGV (signal 11) while loading; last output: Fatal Python "
                                                  "error: Segmentation fault | *misbehaving_backends.py*__init__*"),
], ids=["import", "import-isolated", "construction-isolated", "segfault-on-load-isolated"])
def test_backend_that_fails_to_load_fails_every_case(pytester: pytest.Pytester, backend: str, isolated: bool,
                                                     message: str) -> None:
    result, document = run(pytester, backend, *(["--longctx-isolate"] if isolated else []))
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"errors"} and outcomes["errors"] >= 20, result.stdout.str()
    expected = f"backend '{backend}' could not be loaded: {message}"
    assert sum(pytest_fnmatch(line, expected) for line in result.outlines) == outcomes["errors"]
    assert {c["outcome"] for c in document["cases"]} == {"error"}
    (environment,) = document["environment"]["backends"]
    assert environment["available"] is False


def pytest_fnmatch(line: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(line, pattern)


# ----------------------------------------------------------------------------- units


def test_pool_never_hands_out_the_same_slice_twice() -> None:
    k = np.arange(100, dtype=np.float32)[:, None, None]
    pool = Pool((k, k), k)
    m = distinct_slices(100, 6)
    starts = [int(pool.kv(6)[0][0, 0, 0]) for _ in range(m)]
    assert len(set(starts)) == m >= 100 - 6 - 5 and pool.repeated == 0
    assert starts[:3] == [0, 6, 12]  # consecutive: fresh memory, as a model's K/V
    pool.kv(6)
    assert pool.repeated == 1


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "llama-3.1-8b", "7b-sim", TINY])
@pytest.mark.parametrize("positions", [1024, 4096, 16384, 131072])
def test_timed_pool_is_large_enough_for_distinct_inputs(shape: str, positions: int) -> None:
    """Every timed append of the throughput group (one position at a time at the start, prefill
    chunks, then one position at a time at the end, through every layer) gets an input no
    other timed append got."""
    spec = parse_shape(shape).replace(max_positions=positions)
    decode = min(128, positions // 2)
    early = min(32, decode, (positions - decode) // 4)
    size = timed_pool_positions(spec, positions, 512, decode, early)
    chunk = min(512, size)
    prefill_calls = spec.n_layers * -(-(positions - decode - early) // chunk)
    assert distinct_slices(size, chunk) >= prefill_calls
    assert distinct_slices(size, 1) >= spec.n_layers * (decode + early)


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolated"])
def test_a_backend_that_hung_is_not_asked_again(pytester: pytest.Pytester, isolate: bool) -> None:
    """One hang costs one deadline: the backend's later cases fail at once, naming where it
    hung; the cases that ran before the hang still pass."""
    started = time.monotonic()
    # 10 s at 4096 and 20 s at 8192: room for the suite's own bandwidth probe on a loaded host.
    result, document = run(pytester, "misbehaving_backends:HangsPast4096", "--longctx-deadline=40",
                           *(["--longctx-isolate"] if isolate else []), positions="4096,8192", subprocess=True)
    took = time.monotonic() - started
    failing = [c for c in document["cases"] if c["outcome"] in ("failed", "error")]
    hung = [c for c in failing if "=no answer in" in c["message"]]
    not_asked = [c for c in failing if c["message"].startswith("case=not asked: its backend hung earlier in this "
                                                               "run (no answer in ")]
    assert len(hung) == 1 and len(not_asked) == len(failing) - 1 > 0, [c["message"][:200] for c in failing]
    assert hung[0]["nodeid"].split("::")[-1] in not_asked[0]["message"]  # names the case where it hung
    # What ran before the hang passed (the suite's order puts the equivalence module's
    # longest-only cases, at 8192, third; so at least its first two cases at 4096).
    before = document["cases"][:document["cases"].index(hung[0])]
    assert len(before) >= 2 and all(c["outcome"] == "passed" for c in before), [c["nodeid"] for c in before]
    assert document["verdict"] == "not certified"
    assert took < 90, f"{took:.0f} s: a hang should cost one deadline (20 s), not one per case"


def test_auto_deadline_follows_the_work_of_the_case() -> None:
    """A tiny shape gets the floor (a hang costs a minute, not 600 s); a 7B cache at 16K gets
    far more than its slowest case needs, and a slower host a longer deadline."""
    def auto(shape: str, positions: int, gbps: float) -> float:
        settings = Settings(backends=("cpu",), shape_text=shape, shape=parse_shape(shape), positions=(positions,),
                            seed=1)
        assert settings.deadline == "auto"
        return settings.deadline_for(positions, gbps)

    tiny = "n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"
    assert auto(tiny, 8192, 11.7) == auto(tiny, 4096, 11.7) == 60.0
    # The reference's work grows with positions: the floor does too (a tiny shape's case at
    # 65536 positions took over 60 s on the loaded 2-core host).
    assert auto(tiny, 65536, 11.7) == 240.0 and auto(tiny, 131072, 11.7) == 480.0
    assert 600 < auto("llama-3.1-8b", 16384, 11.7) < 800  # 8.6 GB of float64 KV
    assert auto("7b-sim", 16384, 11.7) > 20 * 131  # 20x the 7b-sim profile's whole fill at its floor
    assert auto("llama-3.1-8b", 16384, 2.0) > 5 * auto("llama-3.1-8b", 16384, 11.7)
    assert auto("qwen3-0.6b", 131072, 11.7) == 8 * auto("qwen3-0.6b", 16384, 11.7)


def test_deadline_scales_with_positions_and_can_be_off() -> None:
    settings = Settings(backends=("cpu",), shape_text="qwen3-0.6b", shape=parse_shape("qwen3-0.6b"),
                        positions=(4096, 16384), seed=1, deadline=1200.0)
    assert settings.deadline_for(16384) == 1200 and settings.deadline_for(131072) == 9600
    assert settings.deadline_for(1024) == settings.deadline_for(4096) == 300  # fixed costs do not shrink
    assert settings.deadline_for(None) == 1200
    off = Settings(**{**settings.__dict__, "deadline": None})
    assert off.deadline_for(16384) is None


def test_rerun_command_keeps_isolation_deadline_and_probe_bar() -> None:
    settings = Settings(backends=("cpu",), shape_text="qwen3-0.6b", shape=parse_shape("qwen3-0.6b"),
                        positions=(4096,), seed=7, isolate=True, deadline=8.0, repeat_speedup=None)
    command = settings.rerun_options("cpu", "float32", 4096)
    assert command.endswith("--longctx-deadline=8.0 --longctx-repeat-speedup=none --longctx-isolate")


def test_last_output_picks_the_crash_and_the_hung_threads_stack() -> None:
    err = ("some log line\nFatal Python error: Segmentation fault\n\n"
           "Thread 0x00000000000000aa (most recent call first):\n  File \"worker.py\", line 3 in run\n\n"
           "Current thread 0x00000000000000bb (most recent call first):\n"
           "  File \"/x/ctypes/__init__.py\", line 519 in string_at\n  File \"/x/backend.py\", line 9 in attend\n"
           "  File \"/x/_pytest/python.py\", line 187 in pytest_pyfunc_call\n\nExtension modules: numpy\n")
    assert forked.last_output("", err, 0xbb) == [
        "Fatal Python error: Segmentation fault", 'File "/x/ctypes/__init__.py", line 519 in string_at',
        'File "/x/backend.py", line 9 in attend']
    assert forked.last_output("", err, 0xaa)[1:] == ['File "worker.py", line 3 in run']
    assert forked.last_output("a\nb\n", "", None) == ["a", "b"]


def test_wait_status_names_the_signal() -> None:
    assert forked.ended(11) == "killed by SIGSEGV (signal 11)"
    assert forked.ended(3 << 8) == "exited with status 3"


def test_guards_let_run_control_through() -> None:
    for exc in (KeyboardInterrupt(), GeneratorExit(), pytest.fail.Exception("x"), pytest.skip.Exception("x")):
        assert is_run_control(exc)
    for exc in (SystemExit(1), RuntimeError(), MemoryError(), type("VendorAbort", (BaseException,), {})()):
        assert not is_run_control(exc)


def test_inputs_differ_across_runs_without_a_seed(pytester: pytest.Pytester) -> None:
    """Inputs are drawn fresh per run from a recorded seed: two runs without --longctx-seed
    print different seeds, and the certificate holds the seed of its run."""
    seeds = []
    for _ in range(2):
        result, document = run(pytester, "broken_backends:CorrectBackend", "-k", "lengths")
        (line,) = [line for line in result.outlines if line.startswith("longctx: backend")]
        seeds.append(int(line.rsplit("seed ", 1)[1].split()[0]))
        assert document["settings"]["seed"] == seeds[-1]
        assert {c["seed"] for c in document["cases"]} == {seeds[-1]}
    assert seeds[0] != seeds[1]
    first, second = (Inputs(s, "k").normal(4) for s in seeds)
    assert not np.array_equal(first, second)
