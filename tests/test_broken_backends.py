"""The suite must catch every defect in ``broken_backends`` and pass the correct backend.

Each broken backend is run through the installed conformance suite (the plugin
runs it when no path is given) in a pytester run, narrowed with ``-m``/``-k``
to the group that certifies its requirement. The test checks that the right
group fails, that the failure reads as one line with the key phrase of its
diagnosis, and that the rest of the run still ran. The correct backend, one
override away from each broken one, passes the same selections, and the whole
suite at several seeds.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Set, Tuple

import pytest

import _suite_runs as suite_runs

TESTS_DIR = Path(__file__).parent
SHAPE = "n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"
WINDOW_SHAPE = SHAPE + ",sliding_window=512"
# The memory bound has a fixed 16 MiB slack: the cache must be large enough that
# twice its size cannot hide in it (8 layers x 4096 positions x float32 = 32 MiB).
MEMORY_SHAPE = "n_layers=8,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"
POSITIONS = "4096"  # past 2048, where float16 stops holding every integer position

EQUIVALENCE = ("-m", "longctx_equivalence")
# The shape's own cases, and RoPE with no rotation (pairing and angles cannot matter)
# beside the default RoPE in both pairings.
ROPE_SELECTION = (*EQUIVALENCE, "-k", "4096 or none-neox or default-neox or default-gptj")
_FAILED = re.compile(r"^(FAILED|ERROR) (?P<module>[\w/.]+?)::(?P<test>\w+)(?:\[(?P<params>[^\]]*)\])?")


def run_suite(pytester: pytest.Pytester, backend: str, *args: str, shape: str = SHAPE,
              positions: str = POSITIONS) -> pytest.RunResult:
    """Run the installed suite on ``broken_backends:<backend>`` (or ``module:Name``), in process."""
    return suite_runs.run_suite(pytester, backend if ":" in backend else f"broken_backends:{backend}", "-rfE", *args,
                                shape=shape, positions=positions, module=None)


def not_passed(result: pytest.RunResult) -> Set[Tuple[str, str]]:
    """(module file, test[param tail]) of every failed or erroring case in the short summary."""
    cases = set()
    for line in result.outlines:
        match = _FAILED.match(line)
        if match:
            params = (match["params"] or "").split("-", 1)[-1]  # drop the backend id
            name = f"{match['test']}[{params}]" if match["params"] else match["test"]
            cases.add((Path(match["module"]).name, name))
    return cases


@dataclass(frozen=True)
class Defect:
    """A broken backend, the selection that certifies its requirement, and what must fail."""

    backend: str
    select: Sequence[str]
    failing: Sequence[Tuple[str, str]]  # (module, test[params after the backend]) that must fail
    message: Sequence[str]  # fnmatch patterns of the one-line diagnosis, in order
    shape: str = SHAPE
    outcomes: Dict[str, int] = field(default_factory=dict)  # at least this many of each outcome
    absent: Sequence[str] = ()  # fnmatch patterns no line may match
    positions: str = POSITIONS


CASE = "[[]{name} float32 @ 4096 positions, *]"  # fnmatch: "[" must be escaped

DEFECTS = [
    Defect(
        "Float16Angles", ROPE_SELECTION,
        [("test_equivalence.py", "test_read_matches_reference[float32-4096]"),
         ("test_equivalence.py", "test_attention_matches_reference[float32-4096]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-default-neox]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-default-gptj]")],
        ["read K at positions 0..4095: max|error|=*, but should be <= 3 x plain * "
         + CASE.format(name="float16-angles"),
         "read K at positions 4095..4095: max|error|=*, but should be <= *"],
        outcomes={"passed": 1, "failed": 4},
    ),
    Defect(
        "SwappedPairing", ROPE_SELECTION,
        [("test_equivalence.py", "test_read_matches_reference[float32-4096]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-default-neox]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-default-gptj]")],
        ["read K at positions 0..4095: max|error|=*, but should be <= * " + CASE.format(name="swapped-pairing"),
         "*rope=default/gptj]"],
        outcomes={"passed": 1, "failed": 4},
    ),
    Defect(
        "DynamicBasePerAppend", (*EQUIVALENCE, "-k", "dynamic"),
        [("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-dynamic-neox]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-dynamic-gptj]")],
        ["attend with 1 query at positions ..1023, worst at *: max|error|=*, but should be <= * "
         + CASE.format(name="dynamic-base-per-append")],
        outcomes={"failed": 2},
    ),
    Defect(  # a model degrades only from ~80K tokens; the angles are wrong at 2048 already
        "Llama3WrongFactor", (*EQUIVALENCE, "-k", "llama3"),
        [("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-llama3-neox]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-llama3-gptj]")],
        ["read K at positions 2047..2048: max|error|=*, but should be <= * " + CASE.format(name="llama3-wrong-factor")],
        outcomes={"failed": 2},
    ),
    # The long-length probes, each at the first length where its defect exists.
    Defect(
        "Int16Positions", (*EQUIVALENCE, "-k", "index_boundaries"),
        [("test_equivalence.py", "test_positions_at_index_boundaries_read_and_attend_right[float32-32769]")],
        ["attend with 1 query at positions ..32768, worst at *: max|error|=*, but should be <= * "
         "[[]int16-positions float32 @ 32769 positions, *]",
         "read K at positions 32768..32768: max|error|=*, but should be <= * [[]int16-positions float32 @ 32769 *]"],
        positions="32769", outcomes={"failed": 1},
        absent=["read K at positions 32767..32767:*", "attend with 1 query at positions ..16384*"],
    ),
    Defect(
        "Float16OutputAccumulator", (*EQUIVALENCE, "-k", "flat_attention"),
        [("test_equivalence.py", "test_flat_attention_over_large_values_is_exact[float16-32760]")],
        ["attend with a flat query over 32760 keys of v=2 (a float16 sum of them overflows 65520 at 32760 keys): "
         "NaN/Inf values=* (the first at index (0, 0, 0)), but should be 0 "
         "[[]float16-accumulator float16 @ 32760 positions, *]"],
        positions="32760", outcomes={"passed": 1, "failed": 1},  # float32 caches accumulate in float32
    ),
    Defect(
        "LongRopeFactorsPerAppend", (*EQUIVALENCE, "-k", "longrope-neox or longrope-gptj or dynamic-neox"),
        [("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-longrope-neox]"),
         ("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-longrope-gptj]")],
        # The chunks that ended within the original context (1024) got the short factors.
        ["read K at positions 1023..1023: max|error|=*, but should be <= * "
         "[[]longrope-factors-per-append float32 @ 4096 positions, * rope=longrope/neox]"],
        outcomes={"passed": 1, "failed": 2},
        absent=["read K at positions 2047..2048:*", "read K at positions 4095..4095:*"],
    ),
    Defect(
        "WrongGQAMapping", (*EQUIVALENCE, "-k", "4096"),
        [("test_equivalence.py", "test_attention_matches_reference[float32-4096]")],
        ["attend with 1 query at positions ..127, worst at query 0 head *: max|error|=*, but should be <= * "
         + CASE.format(name="wrong-gqa")],
        outcomes={"passed": 1, "failed": 1},  # read() is right: the keys are stored correctly
    ),
    Defect(
        "CausalOffByOne", (*EQUIVALENCE, "-k", "4096"),
        [("test_equivalence.py", "test_attention_matches_reference[float32-4096]")],
        ["attend with 16 queries at positions ..127, worst at query * (decoy-future): max|error|=*, "
         "but should be <= * " + CASE.format(name="causal-off-by-one")],
        outcomes={"passed": 1, "failed": 1},
        absent=["attend with 1 query*"],  # a single query has no next position to see
    ),
    Defect(
        "WindowOffByOne", (*EQUIVALENCE, "-k", "4096"),
        [("test_equivalence.py", "test_attention_matches_reference[float32-4096]")],
        ["attend with 1 query at positions ..4095, worst at query 0 head * (window-outside): max|error|=*, "
         "but should be <= * [[]window-off-by-one float32 @ 4096 positions, * window=512]"],
        shape=WINDOW_SHAPE,
        outcomes={"passed": 1, "failed": 1},
        absent=["attend with * at positions ..127,*"],  # 128 positions fit in the window
    ),
    Defect(
        "NoMaxSubtraction", (*EQUIVALENCE, "-k", "4096 or softcap"),
        [("test_equivalence.py", "test_attention_matches_reference[float32-4096]")],
        ["attend with 1 query at positions ..127, worst at query 0 head * (loud): NaN/Inf values=* "
         "(the first at index (0, *)), but should be 0 " + CASE.format(name="no-max-subtraction")],
        outcomes={"passed": 2, "failed": 1},  # read, and softcap (which caps the logits at 30)
    ),
    Defect(
        "RingBuffer", ("-m", "longctx_limits"),
        [("test_limits.py", "test_one_more_position_raises_and_changes_nothing[float32-4096]"),
         ("test_limits.py", "test_chunk_crossing_the_limit_is_rejected_whole[float32-4096]")],
        ["append of 1 position at max_positions=accepted (length now 4096); position 0 was overwritten: "
         "the cache wraps around (ring buffer), but should be a ContextLimitExceeded error "
         + CASE.format(name="ring-buffer")],
        outcomes={"passed": 2, "failed": 2},
    ),
    Defect(
        "HalfAppliedChunk", ("-m", "longctx_limits"),
        [("test_limits.py", "test_chunk_crossing_the_limit_is_rejected_whole[float32-4096]")],
        ["length after the rejected chunk=4096, but should be 3840: 256 of its 512 positions were applied "
         "(half-applied chunk) " + CASE.format(name="half-applied")],
        outcomes={"passed": 3, "failed": 1},
    ),
    Defect(
        "DoubleAllocation", ("-m", "longctx_memory"),
        [("test_memory.py", "test_memory_within_analytic_bound[float32-4096]")],
        ["KV memory after 4096 positions (tracemalloc)=6*.* MiB (2.0*x analytic), but should be <= 51.2 MiB "
         "(analytic 32.0 MiB x 1.10 + 16.0 MiB working memory) "
         "[[]double-allocation float32 @ 4096 positions, 8L 8h/2kv d64 *]",
         "*:*DoubleAllocation *float32 *KV memory / analytic *MiB (2.*x, tracemalloc) FAIL"],
        shape=MEMORY_SHAPE,
        outcomes={"passed": 1, "failed": 1},  # a preallocated cache stays flat while it fills
    ),
    Defect(
        "KeepsEveryInput", ("-m", "longctx_memory"),
        [("test_memory.py", "test_memory_grows_linearly_or_stays_flat[float32-4096]")],
        ["KV memory growth from 1024 to 4096 positions (tracemalloc)=+3.0 MiB*, but should be flat "
         "(preallocated at open: 8.0 MiB), <= 1.8 MiB*"],
        # 2 layers, 8 MiB of KV: 1.5x of it hid in the 16 MiB working-memory slack at one checkpoint.
        outcomes={"passed": 2, "failed": 1},
    ),
    Defect(
        "WrongShape", (*EQUIVALENCE, "-k", "4096 or default-neox"),
        [("test_equivalence.py", "test_rope_matches_reference_at_long_positions[float32-default-neox]"),
         ("test_equivalence.py", "test_attention_matches_reference[float32-4096]")],
        ["attend output of layer 1 shape=(8, 1, 64), but should be (1, 8, 64)*"],
        outcomes={"failed": 3},  # a malformed result while the shared fixture fills is each test's failure
    ),
    Defect(
        "CopyOnAppend", ("-m", "longctx_throughput"),
        [("test_throughput.py", "test_fill_cost_per_position_stays_flat[float32-4096]")],
        ["decode-style append cost per position at the last positions / at the first positions=*x (* us / * us, "
         "medians), but should be <= *x: an append costs more the longer the cache (copy on append?) "
         + CASE.format(name="copy-on-append")],
        outcomes={"passed": 4, "failed": 1},  # its absolute fill floors still pass at 4096
    ),
    Defect(
        "DeferredAttend", ("-m", "longctx_throughput"),
        [("test_throughput.py", "test_decode_attention_rate_meets_floor[float32-4096]")],
        ["to_numpy of a timed attend result=* ms more than of a materialized one (* ms per timed call), but should "
         "be <= 50% of a timed call: deferred work runs after the timed region (synchronize waits for nothing), "
         "so the rate figures measure nothing " + CASE.format(name="deferred-attend"),
         "*decode attention  * tok/s UNTRUSTED: deferred work FAIL"],
        outcomes={"passed": 6, "failed": 1},  # its answers are right and not remembered
    ),
]

# Every defect on CorrectCache; the numerical ones (the equivalence group, whose yardstick spans
# float32 frequencies and float16 activations) also on the float32-RoPE engine and, with a
# float16 cache, on the float16-activation engine.
_NUMERICAL = [d for d in DEFECTS if {module for module, _ in d.failing} == {"test_equivalence.py"}]
ENGINE_CASES = ([(d, "correct") for d in DEFECTS] + [(d, "float32-rope") for d in _NUMERICAL]
                + [(d, "half") for d in _NUMERICAL])
ENGINE_PREFIX = {"float32-rope": "Float32", "half": "Half"}


def on_half_engine(defect: Defect) -> Defect:
    """The same expectations for a float16 cache: its cases carry float16 in their ids, and
    the float32 cases that pass beside the failing ones do not run."""
    swap = lambda text: text.replace("[float32-", "[float16-").replace("float32 @", "float16 @")
    return dataclasses.replace(defect, failing=[(module, swap(test)) for module, test in defect.failing],
                               message=[swap(m) for m in defect.message],
                               outcomes={k: n for k, n in defect.outcomes.items() if k != "passed"})


def test_deferred_attend_results_are_right(pytester: pytest.Pytester) -> None:
    """Deferred work is a timing defect only: the equivalence group passes its results."""
    result = run_suite(pytester, "DeferredAttend", *EQUIVALENCE, "-k", "4096")
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed", "deselected"} and outcomes["passed"] >= 2, result.stdout.str()


def test_queued_work_that_synchronize_waits_for_is_not_deferred(pytester: pytest.Pytester) -> None:
    """A GPU-like backend that queues attend and whose synchronize joins it passes the throughput group."""
    result = run_suite(pytester, "QueuedAttend", "-m", "longctx_throughput")
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed", "deselected"} and outcomes["passed"] >= 5, result.stdout.str()
    result.stdout.no_fnmatch_line("*UNTRUSTED*")


@pytest.mark.parametrize(("defect", "engine"), ENGINE_CASES, ids=[f"{d.backend}-{e}" for d, e in ENGINE_CASES])
def test_suite_catches_defect(pytester: pytest.Pytester, defect: Defect, engine: str) -> None:
    """The group certifying the requirement fails, with a one-line diagnosis, and the run completes;
    for the numerical defects also on the float32 engine (foreign_backends.Float32Cache, RoPE
    computed as transformers does): the yardstick widened for float32 RoPE must still catch them."""
    if engine == "half":
        defect = on_half_engine(defect)
    backend = defect.backend if engine == "correct" else f"foreign_backends:{ENGINE_PREFIX[engine]}{defect.backend}"
    result = run_suite(pytester, backend, *defect.select, shape=defect.shape, positions=defect.positions)
    caught = not_passed(result)
    missing = set(defect.failing) - caught
    assert not missing, f"{defect.backend} slipped through {sorted(missing)}:\n{result.stdout.str()}"
    group = {module for module, _ in defect.failing}
    assert {module for module, _ in caught} == group, f"failures outside the certifying group: {sorted(caught)}"
    outcomes = result.parseoutcomes()
    for key, count in defect.outcomes.items():  # the other cases of the group still ran
        assert outcomes.get(key, 0) >= count, f"outcomes {outcomes}, expected {key} >= {count}"
    result.stdout.fnmatch_lines(list(defect.message))
    for pattern in defect.absent:
        result.stdout.no_fnmatch_line(pattern)
    # The diagnosis is the failure's first line: no traceback into the suite.
    result.stdout.no_fnmatch_line("*conformance/_check.py:*")
    result.stdout.no_fnmatch_line("E   *")


@pytest.mark.parametrize(("backend", "select", "positions"), [
    ("Int16Positions", "index_boundaries", "32768"),  # positions 0..32767 fit in int16
    ("Float16OutputAccumulator", "flat_attention", "32752"),  # 2 x 32752 = 65504, float16's largest
], ids=["Int16Positions", "Float16OutputAccumulator"])
def test_long_length_defect_passes_below_its_length(pytester: pytest.Pytester, backend: str, select: str,
                                                    positions: str) -> None:
    """A defect that starts at a length is invisible below it: the probe that catches it one
    step later (see DEFECTS) passes there, so it blames the length, not the backend at large."""
    result = run_suite(pytester, backend, *EQUIVALENCE, "-k", select, positions=positions)
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed", "deselected"} and outcomes["passed"] >= 1, result.stdout.str()


@pytest.mark.parametrize(("backend", "select"), [
    ("CorrectFloat16Backend", "flat_attention"),  # float32 sums of a float16 cache
    ("foreign_backends:Float32RopeBackend", "index_boundaries"),  # float32 angles past 32768
], ids=["CorrectFloat16Backend", "Float32RopeBackend"])
def test_correct_backends_pass_the_long_length_probes(pytester: pytest.Pytester, backend: str, select: str) -> None:
    """Past the lengths where the defects above start (32768 positions, 32760 flat keys),
    correct backends pass the probes; the chunked RoPE fills pass in the whole-suite runs."""
    result = run_suite(pytester, backend, *EQUIVALENCE, "-k", select, positions="32769")
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed", "deselected"} and outcomes["passed"] >= 1, result.stdout.str()


def test_correct_float16_backend_passes_at_float16(pytester: pytest.Pytester) -> None:
    """The float16 cache the accumulator defect departs from is right: the shape's own
    attention and read at float16, and the flat probe."""
    result = run_suite(pytester, "CorrectFloat16Backend", *EQUIVALENCE, "-k", "float16-4096 or flat_attention")
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed", "deselected"} and outcomes["passed"] >= 4, result.stdout.str()
    result.stdout.fnmatch_lines(["*CorrectFloat16Backend*float16*attention error*",
                                 "*CorrectFloat16Backend*float16*flat attention*0 <= *"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_correct_backend_passes_the_whole_suite(pytester: pytest.Pytester, seed: int) -> None:
    """The backend every defect departs from passes everything, whatever the inputs."""
    result = run_suite(pytester, "CorrectBackend", f"--longctx-seed={seed}")
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "deselected"} and outcomes.get("passed"), result.stdout.str()
    assert outcomes["passed"] >= 20
    result.stdout.fnmatch_lines(["*= longctx figures =*", f"shape {SHAPE} (*), seed {seed}"])
    result.stdout.no_fnmatch_line("* FAIL")


@pytest.mark.parametrize("seed", [1, 2])
def test_backend_with_foreign_arrays_passes_the_whole_suite(pytester: pytest.Pytester, seed: int) -> None:
    """Arrays that are not NumPy's (torch tensors, CuPy arrays: here ``foreign_backends.Opaque``,
    with only a shape and slicing) are never blamed for the suite's own use of them: the
    correct backend behind them passes every case."""
    pytester.syspathinsert(TESTS_DIR)
    result = pytester.runpytest("--longctx-backend=foreign_backends:ForeignArrayBackend",
                                f"--longctx-shape={SHAPE}", f"--longctx-positions={POSITIONS}",
                                f"--longctx-seed={seed}", "-rfE")
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "deselected"} and outcomes.get("passed", 0) >= 20, result.stdout.str()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_engine_with_float32_rope_passes_the_whole_suite(pytester: pytest.Pytester, seed: int) -> None:
    """RoPE computed the way engines do (float32 frequencies off by up to 3 ulp, as
    transformers' float32 pow leaves them; float32 angles, cos and sin) is right: no rope
    kind may fail it, at power-of-two positions either (the yardstick's frequency envelope)."""
    pytester.syspathinsert(TESTS_DIR)
    result = pytester.runpytest("--longctx-backend=foreign_backends:Float32RopeBackend", f"--longctx-shape={SHAPE}",
                                f"--longctx-positions={POSITIONS}", f"--longctx-seed={seed}", "-rfE")
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "deselected"} and outcomes.get("passed", 0) >= 30, result.stdout.str()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_engine_with_float16_activations_passes_the_whole_suite(pytester: pytest.Pytester, seed: int) -> None:
    """A model exported in float16 (Q, K, rotary tables and output in float16 beside a float16
    cache, as ONNX Runtime runs one) is right; before the yardstick spanned float16
    activations it failed seeds 1, 2, 3 and 5 of these (seed 1: ``read K at positions 1024..1024:
    max|error|=2.0e-03 ... <= 3 x plain 6.4e-04 + 3.0e-06 = 1.9e-03``)."""
    pytester.syspathinsert(TESTS_DIR)
    result = pytester.runpytest("--longctx-backend=foreign_backends:HalfPrecisionBackend", f"--longctx-shape={SHAPE}",
                                f"--longctx-positions={POSITIONS}", "--longctx-kv-dtype=float16",
                                f"--longctx-seed={seed}", "-m", "longctx_equivalence", "-rfE")
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "deselected"} and outcomes.get("passed", 0) >= 15, result.stdout.str()


@pytest.mark.parametrize(("backend", "verdict"), [("NativeAllocBackend", "passed"), ("NativeTwoCopies", "failed")])
def test_memory_outside_tracemalloc_is_judged_whatever_the_heap_holds(pytester: pytest.Pytester, backend: str,
                                                                     verdict: str) -> None:
    """A cache in the C heap (torch on a CPU, native engines), opened right after 192 MiB of
    freed heap was left resident: RSS would not see it reuse those pages. The figure is its
    size, named as RSS's, and twice its KV fails."""
    pytester.syspathinsert(TESTS_DIR)
    result = pytester.runpytest(f"--longctx-backend=foreign_backends:{backend}", f"--longctx-shape={SHAPE}",
                                "--longctx-positions=16384", "-m", "longctx_memory", "-rfE")
    within = [line for line in result.outlines if "KV memory / analytic" in line]
    assert within and "RSS)" in within[0], result.stdout.str()
    ratio = float(re.search(r"\((\d+\.\d+)x, RSS\)", within[0])[1])
    assert (1.0 <= ratio <= 1.2) if verdict == "passed" else ratio >= 1.9, within[0]
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == (verdict == "failed"), result.stdout.str()


@pytest.mark.parametrize(
    ("shape", "select"),
    [(WINDOW_SHAPE, (*EQUIVALENCE, "-k", "4096")), (MEMORY_SHAPE, ("-m", "longctx_memory"))],
    ids=["window-shape", "memory-shape"],
)
def test_correct_backend_passes_the_defects_shapes(pytester: pytest.Pytester, shape: str,
                                                    select: Tuple[str, ...]) -> None:
    """The extra shapes used to expose a defect do not fail a correct backend on their own."""
    result = run_suite(pytester, "CorrectBackend", *select, shape=shape)
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed", "deselected"}, result.stdout.str()


def test_wrong_shape_diagnosis_names_the_case(pytester: pytest.Pytester) -> None:
    """Every failure should read '{what}={measured}, but should be {expected} [{case}]'."""
    result = run_suite(pytester, "WrongShape", *EQUIVALENCE, "-k", "default-neox")
    result.assert_outcomes(failed=1, deselected=result.parseoutcomes()["deselected"])
    result.stdout.fnmatch_lines(["attend output of layer 0 shape=(4, 1, 64), but should be (1, 4, 64) "
                                 "[[]wrong-shape float32 @ 4096 positions, 1L *]"])


def test_broken_backends_differ_from_the_correct_one_by_one_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each defect is one override of CorrectCache, so a failure points at one cause."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    bb = importlib.import_module("broken_backends")

    for name in bb.CACHE_DEFECTS:
        backend = getattr(bb, name)
        assert backend.__doc__ and backend.Cache is not bb.CorrectCache, name
        overridden = set(vars(backend.Cache)) - {"__module__", "__qualname__", "__doc__", "__firstlineno__",
                                                 "__static_attributes__"}
        assert len(overridden) == 1, f"{name} overrides {sorted(overridden)}"
    assert {d.backend for d in DEFECTS} == set(bb.CACHE_DEFECTS)
