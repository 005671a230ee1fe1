"""``--longctx-find-context``: the search, its answer on correct, broken and hanging backends, its bad input.

The runs are pytester runs of the installed suite on a tiny shape, narrowed to the
attention-equivalence group (one case per length), so that each search of up to
eight lengths takes seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

import pytest

from pytest_longctx.certify import certificate as cert
from pytest_longctx.certify import merge, render
from pytest_longctx.certify.finder import ladder, search

TESTS_DIR = Path(__file__).parent
TINY = "n_layers=1,n_heads=4,n_kv_heads=1,head_dim=32,theta=10000"
ATTENTION = ("-k", "test_attention_matches_reference")
LINE = re.compile(r"^(?P<backend>\S+): certified context: (?P<certified>\d+|none) positions? \(step (?P<step>\d+)\)"
                  r"(?:; first failure at (?P<failure>\d+): (?P<reason>.*))?")
PROBES = re.compile(r"^  (?P<n>\d+) probes in (?P<seconds>[\d.]+) s \((?P<tried>[^)]*)\)")


def find(pytester: pytest.Pytester, backend: str, *args: str) -> pytest.RunResult:
    pytester.syspathinsert(TESTS_DIR)
    return pytester.runpytest(f"--longctx-backend={backend}", f"--longctx-shape={TINY}", "--longctx-find-context",
                              *ATTENTION, "-p", "no:cacheprovider", *args)


def answer(result: pytest.RunResult) -> dict:
    """The summary's line and the probes line under it, parsed."""
    lines = result.outlines
    for i, line in enumerate(lines):
        match = LINE.match(line)
        if match:
            probes = PROBES.match(lines[i + 1])
            assert probes, lines[i + 1]
            return {**match.groupdict(), "probes": int(probes["n"]), "tried": probes["tried"],
                    "seconds": float(probes["seconds"])}
    raise AssertionError("no 'certified context' line in:\n" + "\n".join(lines[-30:]))


def test_search_doubles_then_bisects_and_asks_each_length_once() -> None:
    rungs = ladder(1024, 16384)
    assert rungs == tuple(range(1024, 16385, 1024))
    asked: List[int] = []

    def passes_up_to(limit: int):
        def probe(n: int) -> bool:
            asked.append(n)
            return n <= limit
        return probe

    lo, hi = search(rungs, passes_up_to(8192))
    assert (rungs[lo], rungs[hi]) == (8192, 9216)
    assert asked == [1024, 2048, 4096, 8192, 16384, 12288, 10240, 9216]
    asked.clear()
    assert search(rungs, passes_up_to(16384)) == (15, None)
    assert asked == [1024, 2048, 4096, 8192, 16384]
    asked.clear()
    assert search(rungs, passes_up_to(0)) == (-1, 0) and asked == [1024]
    assert ladder(1024, 2500) == (1024, 2048, 2500)  # the maximum asked for is itself a rung


def test_cpu_backend_is_certified_to_the_maximum_it_was_given(pytester: pytest.Pytester) -> None:
    result = find(pytester, "cpu", "--longctx-max-positions=4096", "--longctx-kv-dtype=float32,q8_0",
                  "--longctx-report=cert.json")
    got = answer(result)
    assert (got["certified"], got["failure"], got["step"]) == ("4096", None, "1024")
    assert got["tried"] == "1024, 2048, 4096"  # doubling reaches the maximum: no bisection
    result.stdout.fnmatch_lines(["*; no failure up to the maximum 4096"])
    document = json.loads((pytester.path / "cert.json").read_text())
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 3 * 2 and "failed" not in outcomes  # both kv dtypes at each of 3 lengths
    [context] = document["context"]
    assert context["certified_positions"] == 4096 and context["first_failure"] is None
    assert [p["positions"] for p in context["probes"]] == [1024, 2048, 4096]
    # Only the lengths probed are cases of the certificate: the ladder's other rungs never ran.
    assert {c["positions"] for c in document["cases"]} == {1024, 2048, 4096}
    assert document["verdict"] == cert.CERTIFIED


def test_nan_past_8192_is_certified_to_8192_with_the_first_failure_at_9216(pytester: pytest.Pytester) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    result = find(pytester, "misbehaving_backends:NaNAfter8K", "--longctx-max-positions=12288",
                  "--longctx-report=cert.json", "--longctx-report-html=cert.html")
    got = answer(result)
    assert (got["certified"], got["failure"]) == ("8192", "9216")
    assert got["reason"].startswith("equivalence, ") and "NaN" in got["reason"]
    assert got["tried"] == "1024, 2048, 4096, 8192, 12288 x, 10240 x, 9216 x"
    document = json.loads((pytester.path / "cert.json").read_text())
    jsonschema.validate(document, cert.schema())
    [context] = document["context"]
    assert context["certified_positions"] == 8192 and context["step"] == 1024
    failure = context["first_failure"]
    assert (failure["positions"], failure["kind"]) == (9216, "failed")
    assert failure["case"].endswith("test_attention_matches_reference[misbehaving_backends:NaNAfter8K-float32-9216]")
    assert document["verdict"] == cert.NOT_CERTIFIED
    assert any("certified context: 8192 positions" in reason for reason in document["reasons"])
    page = (pytester.path / "cert.html").read_text()
    assert "Certified context" in page and 'id="plot-context"' in page
    matrix = merge.merge([str(pytester.path / "cert.json")])  # the merged matrix carries the search
    assert matrix["certificates"][0]["context"][0]["certified_positions"] == 8192
    assert "certified context: 8192 positions (step 1024); first failure at 9216" in render.markdown(matrix)


def test_positions_kept_in_16_bits_are_certified_to_32768(pytester: pytest.Pytester) -> None:
    """The long-length probes are searched like every case: positions kept in int16 wrap at
    32768, so the finder certifies 32768 and names 33792, the next step, as the first failure."""
    result = find(pytester, "broken_backends:Int16Positions", "--longctx-max-positions=34816",
                  "-k", "index_boundaries")
    got = answer(result)
    assert (got["certified"], got["failure"]) == ("32768", "33792"), result.stdout.str()
    assert "33792 x" in got["tried"] and "32768 x" not in got["tried"]


def test_a_hang_at_a_probe_length_is_the_first_failure_and_the_search_ends(pytester: pytest.Pytester) -> None:
    # HangsPast4096 never returns from attend past 4096 positions; the deadline ends each hang.
    # Deadline 12 s at 16384 positions: 3 s at 4096, 3.75 s at 5120, 4.5 s at 6144.
    result = find(pytester, "misbehaving_backends:HangsPast4096", "--longctx-max-positions=6144",
                  "--longctx-deadline=12")
    got = answer(result)
    assert (got["certified"], got["failure"]) == ("4096", "5120")
    assert "no answer in" in got["reason"]
    assert got["tried"] == "1024, 2048, 4096, 6144 x, 5120 x"
    # Each hang cost one deadline: the record that the backend hung is cleared between probes,
    # so the shorter lengths were asked, and the case at 5120 names its own hang.
    result.stdout.fnmatch_lines(["*first failure at 5120: equivalence, case *=no answer in *, but should finish "
                                 "within its deadline (*3.75 s at 5120)*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # the search ended; the failures are reported


def test_a_crash_at_a_probe_length_is_the_first_failure_under_isolation(pytester: pytest.Pytester) -> None:
    # The maximum is one step past the last good length: the doubling reaches it, and it crashes.
    result = find(pytester, "misbehaving_backends:SegfaultPast4096", "--longctx-max-positions=5120",
                  "--longctx-isolate", "--longctx-report=cert.json")
    got = answer(result)
    assert (got["certified"], got["failure"]) == ("4096", "5120")
    assert "process killed by SIGSEGV" in got["reason"]
    assert got["tried"] == "1024, 2048, 4096, 5120 x"
    [context] = json.loads((pytester.path / "cert.json").read_text())["context"]
    assert context["first_failure"]["kind"] == "crash" and context["certified_positions"] == 4096


def test_certificate_withdraws_a_certified_length_no_passing_case_backs() -> None:
    search_result = {"backend": "b", "step": 1024, "maximum": 4096, "certified_positions": 4096,
                     "first_failure": None, "probes": [], "seconds": 0.0, "line": "certified context: 4096"}
    failed = cert.Case(nodeid="x[b-float32-4096]", backend="b", positions=4096, outcome="failed")
    passed = cert.Case(nodeid="y[b-float32-4096]", backend="b", positions=4096, outcome="passed")
    assert cert.checked_context(search_result, [passed])["certified_positions"] == 4096
    withdrawn = cert.checked_context(search_result, [passed, failed])
    assert withdrawn["certified_positions"] is None and "withdrawn" in withdrawn["line"]
    assert cert.checked_context(search_result, [])["certified_positions"] is None


@pytest.mark.parametrize(("args", "message"), [
    (("--longctx-context-step=0",), "ERROR: longctx: --longctx-context-step=0: should be >= 1"),
    (("--longctx-context-step=abc",), "ERROR: longctx: --longctx-context-step='abc': *"),
    (("--longctx-max-positions=200k",), "ERROR: longctx: --longctx-max-positions='200k': positions 204800 is "
                                        "outside 1..131072"),
    (("--longctx-backend=broken_backends:Paged256", "--longctx-context-step=1000"),
     "ERROR: longctx: --longctx-context-step=1000: is not a multiple of the position granularity 256 that "
     "backend 'broken_backends:Paged256' states"),
])
def test_bad_finder_options_are_one_line_usage_errors(pytester: pytest.Pytester, args, message) -> None:
    pytester.syspathinsert(TESTS_DIR)
    backend = () if any(a.startswith("--longctx-backend") for a in args) else ("--longctx-backend=cpu",)
    result = pytester.runpytest(*backend, "--longctx-find-context", *args, "--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_finder_refuses_xdist_and_cuts_a_maximum_that_does_not_fit(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.syspathinsert(TESTS_DIR)
    result = pytester.runpytest("--longctx-backend=cpu", "--longctx-find-context", "-n", "2", "--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: longctx: --longctx-find-context with -n 2: *runs in one process*"])
    # 7b-sim in float32 needs 1 MiB per position, 128 GiB at 131072: no host here holds it all.
    result = pytester.runpytest("--longctx-backend=broken_backends:CorrectBackend", "--longctx-shape=7b-sim",
                                "--longctx-find-context", "--co", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["longctx finder: broken_backends:CorrectBackend: step 1024, up to * positions "
                                 "(maximum 131072 cut to *, what fits: 131072 positions needs * of host memory, "
                                 "* free)"])


# ----------------------------------------------------------------------------- whole-model runtimes


def find_runtime(pytester: pytest.Pytester, backend: str, *args: str, context: int = 4096) -> pytest.RunResult:
    import runtime_backends

    pytester.syspathinsert(TESTS_DIR)
    model = runtime_backends.write_model(str(pytester.path / "toy.model"), context)
    return pytester.runpytest(f"--longctx-backend=runtime_backends:{backend}", f"--longctx-model={model}",
                              "--longctx-find-context", "--longctx-context-step=256", "-p", "no:cacheprovider",
                              *args)


def test_runtime_is_searched_over_prompt_length_up_to_its_context(pytester: pytest.Pytester) -> None:
    """The maximum is the model's context (read by opening it), not the kernel groups' 131072;
    the reference-logits case, skipped at every length without --longctx-reference-logits,
    says nothing about length and fails no probe."""
    result = find_runtime(pytester, "ToyRuntimeBackend", "--longctx-max-positions=8192", context=2048)
    found = answer(result)
    assert (found["certified"], found["failure"]) == ("2048", None), result.stdout.str()
    result.stdout.fnmatch_lines(["*no failure up to the maximum 2048*", "*maximum 8192 cut to the model's context 2048*"])


def test_runtime_that_turns_nan_past_2048_is_certified_to_2048(pytester: pytest.Pytester) -> None:
    result = find_runtime(pytester, "NanAfter2048Backend")
    found = answer(result)
    assert (found["certified"], found["failure"]) == ("2048", "2304"), result.stdout.str()
    assert "NaN/Inf values" in found["reason"] and found["probes"] == 8, found
