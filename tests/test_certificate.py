"""Certification: the JSON certificate and its schema, xdist, JUnit, bad paths, Ctrl-C,
Markdown and HTML (with and without matplotlib, in a real headless browser), coverage
and the ``longctx-report`` merge command.

One real run of the suite on a small shape (session fixture ``made``) serves the
tests that read a certificate; the others run pytest with pytester on a few cases.
"""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict

import pytest

from pytest_longctx.certify import certificate as cert
from pytest_longctx.certify import plots, render
from pytest_longctx.tools import report

try:
    import jsonschema
except ImportError:  # the dev extra brings it; without it only the schema validation is skipped
    jsonschema = None

TESTS_DIR = Path(__file__).parent
SHAPE = "n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"
CORRECT = "broken_backends:CorrectBackend"


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.syspathinsert(TESTS_DIR)
    return pytester


def small(backend: str = CORRECT, positions: str = "1024") -> list:
    return [f"--longctx-backend={backend}", f"--longctx-shape={SHAPE}", f"--longctx-positions={positions}"]


def validate(document: Dict[str, Any]) -> None:
    """Validate against the published schema where jsonschema is installed; the tests of the
    schema itself ask for it (``needs_jsonschema``), the others check the document without it."""
    if jsonschema is not None:
        jsonschema.validate(document, cert.schema())


needs_jsonschema = pytest.mark.skipif(jsonschema is None, reason="jsonschema is not installed (the dev extra)")


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real certificate: the suite on the CPU backend at 1024 and 2048 positions, float32 and float16,
    every question but the RoPE variants; JSON, Markdown and HTML."""
    out = tmp_path_factory.mktemp("made")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--longctx-backend=cpu",
               f"--longctx-shape={SHAPE}", "--longctx-positions=1024,2048", "--longctx-kv-dtype=float32,float16",
               "--longctx-repeats=2", "-k", "not rope and not features and not chunk and not lengths",
               "--longctx-report=cert.json", "--longctx-report-html=cert.html"]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- the certificate


@needs_jsonschema
def test_certificate_validates_against_the_published_schema(made: Path) -> None:
    """Real output, not a hand-made example, is what the schema must accept."""
    document = json.loads((made / "cert.json").read_text())
    validate(document)
    assert document["verdict"] == "certified", document["reasons"]
    assert document["schema_version"] == cert.SCHEMA_VERSION
    assert document["suite"]["revision"] is None or re.fullmatch(r"[0-9a-f]{40}", document["suite"]["revision"])
    env = document["environment"]
    assert env["host"] and env["cpu"] and env["memory_bytes"] > 0 and "numpy" in env["packages"]
    assert env["backends"][0]["available"] and env["backends"][0]["device_kind"] == "cpu"
    cases = document["cases"]
    assert {c["question"] for c in cases} == {"limits", "memory", "throughput", "equivalence"}
    assert all(c["seed"] == document["settings"]["seed"] and c["verdict"] == "pass" for c in cases)
    memory = next(f for c in cases for f in c["figures"] if f["check"] == "KV memory / analytic")
    assert memory["threshold"] > 1 and memory["bound"].startswith("<=") and memory["measured_bytes"] > 0


@needs_jsonschema
def test_schema_rejects_a_wrong_verdict(made: Path) -> None:
    document = json.loads((made / "cert.json").read_text())
    document["verdict"] = "mostly fine"
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


def test_failing_backend_is_not_certified_and_says_how_to_rerun(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*small("broken_backends:Float16Angles"), "-k", "test_attention_matches_reference",
                                "--longctx-report=c.json")
    document = json.loads((pytester.path / "c.json").read_text())
    validate(document)
    assert document["verdict"] == "not certified" and document["counts"]["failed"] == 1
    (case,) = document["cases"]
    assert case["outcome"] == "failed" and "but should be" in case["message"] and case["rerun"].startswith("pytest ")
    assert (pytester.path / "c.md").read_text().startswith("# pytest-longctx certificate: not certified")
    result.stdout.fnmatch_lines(["*longctx certificate*", "verdict: not certified (1 of 1 cases failed)"])


def test_unavailable_backend_is_incomplete(pytester: pytest.Pytester) -> None:
    pytester.runpytest(*small("broken_backends:Unavailable"), "-m", "longctx_memory", "--longctx-report=c.json")
    document = json.loads((pytester.path / "c.json").read_text())
    validate(document)
    assert document["verdict"] == "incomplete"
    assert {c["outcome"] for c in document["cases"]} == {"skipped"}
    assert document["environment"]["backends"][0]["available"] is False


def test_no_report_option_writes_nothing(pytester: pytest.Pytester) -> None:
    """Report writing only happens when asked for: the default run stays as fast as before."""
    result = pytester.runpytest(*small(), "-m", "longctx_memory")
    assert "passed" in result.parseoutcomes()
    assert not list(pytester.path.glob("*.json")) and not list(pytester.path.glob("*.md"))
    result.stdout.no_fnmatch_line("*longctx certificate*")


@pytest.mark.parametrize("where", ["missing-dir/c.json", "a-directory"])
def test_unwritable_report_path_fails_at_startup(pytester: pytest.Pytester, where: str) -> None:
    """Not after an hour of measurement: before the first case, as a one-line usage error."""
    pytester.mkdir("a-directory")
    result = pytester.runpytest(*small(), "--longctx-report-html", where)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1, errors
    result.stderr.fnmatch_lines([f"ERROR: longctx: --longctx-report-html=*{where}: should be a writable file path (*)"])
    assert not (pytester.path / "missing-dir").exists()


INTERRUPTS = """
    def test_a_case_the_user_stops(longctx_backend, longctx_kv_dtype, longctx_positions):
        if longctx_positions == 2048:
            raise KeyboardInterrupt
"""


def test_interrupted_run_still_writes_an_incomplete_certificate(pytester: pytest.Pytester) -> None:
    """Ctrl-C in the middle: what ran is kept, what did not is listed, the verdict says incomplete."""
    pytester.makepyfile(test_stop=INTERRUPTS)
    result = pytester.runpytest("test_stop.py", *small(positions="1024,2048,4096"), "--longctx-report=c.json",
                                no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    document = json.loads((pytester.path / "c.json").read_text())
    validate(document)
    assert document["verdict"] == "incomplete" and document["interrupted"] and not document["complete"]
    assert "the run was interrupted" in document["reasons"]
    outcomes = {c["positions"] or c["nodeid"].split("-")[-1].rstrip("]"): c["outcome"] for c in document["cases"]}
    assert outcomes[1024] == "passed" and "4096" in outcomes and outcomes["4096"] == "not run", outcomes


def test_xdist_every_workers_cases_reach_the_certificate(pytester: pytest.Pytester,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``-n 2``: the certificate holds every case that ran, from both workers, none twice."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    result = pytester.runpytest_subprocess(*small(), "-n", "2", "-v", "-m", "longctx_memory or longctx_equivalence",
                                           "-k", "not rope", "--longctx-report=c.json", timeout=120)
    ran = sorted(set(re.findall(r"\] PASSED (\S+)", result.stdout.str())))
    assert set(result.parseoutcomes()) == {"passed"}, result.stdout.str()
    document = json.loads((pytester.path / "c.json").read_text())
    validate(document)
    ids = [c["nodeid"] for c in document["cases"]]
    assert sorted(ids) == ran and len(ids) == len(set(ids)) == result.parseoutcomes()["passed"]
    assert {c["worker"] for c in document["cases"]} == {"gw0", "gw1"}
    assert document["verdict"] == "certified"


def test_junitxml_carries_every_figure(pytester: pytest.Pytester) -> None:
    """Each figure is a JUnit property whose value is JSON, for CI tools that read JUnit."""
    pytester.runpytest(*small(), "-m", "longctx_memory", "--junitxml=j.xml")
    tree = ET.parse(pytester.path / "j.xml")
    figures = [json.loads(p.get("value")) for p in tree.iter("property") if p.get("name") == "longctx"]
    assert {f["check"] for f in figures} == {"KV memory / analytic", "KV memory growth", "memory after close"}
    memory = next(f for f in figures if f["check"] == "KV memory / analytic")
    assert memory["positions"] == 1024 and memory["passed"] is True and memory["analytic_bytes"] > 0


def test_certificate_hook_lets_a_plugin_add_fields(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        def pytest_longctx_certificate(config, certificate):
            certificate["lab"] = {"rack": 7}
    """)
    pytester.runpytest(*small(), "-m", "longctx_memory", "--longctx-report=c.json")
    document = json.loads((pytester.path / "c.json").read_text())
    validate(document)
    assert document["lab"] == {"rack": 7}


# ----------------------------------------------------------------------------- coverage


def test_coverage_says_what_was_not_exercised(made: Path) -> None:
    document = json.loads((made / "cert.json").read_text())
    dims = document["coverage"]["cpu"]["dimensions"]
    assert dims["kv dtype"]["float32"] == "passed" and dims["kv dtype"]["bfloat16"] == "not exercised"
    assert dims["positions"]["2048"] == "passed" and dims["positions"]["131072"] == "not exercised"
    assert dims["rope kind"]["default"] == "passed" and dims["rope kind"]["yarn"] == "not exercised"
    assert dims["rope pairing"] == {"neox": "passed", "gptj": "not exercised"}
    assert dims["attention feature"]["window"] == "not exercised"
    assert "Coverage: what was and was not exercised" in (made / "cert.md").read_text()


# ----------------------------------------------------------------------------- Markdown and HTML


def test_markdown_has_verdict_claim_figures_and_environment(made: Path) -> None:
    text = (made / "cert.md").read_text()
    assert text.startswith("# pytest-longctx certificate: certified")
    for heading in ("## Claim and bars", "## Measured figures", "## Cases", "## Environment"):
        assert heading in text
    assert re.search(r"^\| cpu \| float16 \| KV memory / analytic \| .* \| .* \|$", text, re.M)


def test_cases_read_by_question_then_case_whatever_order_they_finished_in(made: Path) -> None:
    """Under xdist cases finish out of order; the certificate's tables must not follow that order."""
    document = json.loads((made / "cert.json").read_text())
    failing = copy.deepcopy(document)
    for case in failing["cases"][::3]:  # some not-passed cases, so that the case table is drawn
        case["outcome"], case["message"] = "failed", "x=1, but should be 0"
    shuffled = copy.deepcopy(failing)
    shuffled["cases"].reverse()
    assert render.markdown(shuffled) == render.markdown(failing)
    text = render.markdown(failing)
    counts = text[text.index("| question |"):].split("\n\n")[0]
    rows = [line.split("|")[1].strip() for line in counts.splitlines()[2:]]
    assert rows == [q for q in ("limits", "memory", "throughput", "equivalence") if q in rows], rows


def test_html_has_plots_with_matplotlib(made: Path) -> None:
    pytest.importorskip("matplotlib")
    page = (made / "cert.html").read_text()
    for name in ("memory", "fill", "attention", "error"):
        assert f'id="plot-{name}"><svg' in page
    assert "<table>" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)|<link|<script|url\((?!#)""", page), "must not load anything"


def test_runtime_figures_are_drawn_against_depth() -> None:
    """A runtime's prefill and decode rates and its memory growth per stretch are curves over the
    depths probed (a cost growing faster than linear shows), like the KV-cache groups' figures."""
    pytest.importorskip("matplotlib")
    tag = {"backend": "toy", "kv_dtype": "float32"}
    figures = [{"check": "prefill", "positions": n, "value": 4e5 / n, **tag} for n in (256, 1024, 4096)]
    figures += [{"check": "decode", "positions": n, "value": 900 - n / 10, **tag} for n in (256, 1024, 4096)]
    figures += [{"check": "peak memory growth / analytic KV", "positions": n, "value": 1.0, "measured_bytes": n << 10,
                 "analytic_bytes": n << 10, "bound_bytes": n << 11, **tag} for n in (256, 1024, 4096)]
    drawn = dict(plots.all_plots(figures))
    assert set(drawn) == {"memory", "runtime"}
    assert "toy float32 prefill positions/s" in drawn["runtime"]
    assert "toy float32 (growth per stretch) measured" in drawn["memory"]


def test_html_without_matplotlib_still_has_the_tables(made: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "available", lambda: False)
    page = render.html(json.loads((made / "cert.json").read_text()))
    assert "<svg" not in page and html.escape(render.PLOTS_MISSING) in page
    assert page.count("<table>") >= 4 and "KV memory / analytic" in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no chromium on PATH (apt-get install chromium): the HTML is not checked in a browser")
    return found


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                 "--no-first-run", "--disable-extensions"]


def test_html_opens_offline_in_a_headless_browser(made: Path, tmp_path: Path) -> None:
    """The page renders with no network: the DOM the browser built has the verdict, tables and plots."""
    browser = chromium()
    url = (made / "cert.html").as_uri()
    dom = subprocess.run([browser, *BROWSER_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<p class="verdict certified" id="verdict">certified</p>' in dom.stdout
    assert dom.stdout.count("<table>") >= 4 and "KV memory / analytic" in dom.stdout
    if plots.available():
        assert all(f'id="plot-{n}"><svg' in dom.stdout for n in ("memory", "fill", "attention", "error"))
    shot = tmp_path / "cert.png"
    subprocess.run([browser, *BROWSER_FLAGS, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000


# ----------------------------------------------------------------------------- merging


def on_host(document: Dict[str, Any], host: str) -> Dict[str, Any]:
    other = copy.deepcopy(document)
    other["environment"]["host"] = host
    for case in other["cases"]:
        case["host"] = host
    return other


def test_merge_makes_one_matrix_from_two_hosts(made: Path, tmp_path: Path) -> None:
    document = json.loads((made / "cert.json").read_text())
    (tmp_path / "b.json").write_text(json.dumps(on_host(document, "other-host")))
    outputs = [str(tmp_path / f"matrix.{kind}") for kind in ("json", "md", "html")]
    assert report.main(["merge", str(made / "cert.json"), str(tmp_path / "b.json"), "-o", *outputs]) == 0
    matrix = json.loads((tmp_path / "matrix.json").read_text())
    columns = {f["column"] for f in matrix["figures"]}
    assert len(columns) == 2 and any(c.endswith("@ other-host") for c in columns)
    assert len(matrix["cases"]) == 2 * len(document["cases"])
    text = (tmp_path / "matrix.md").read_text()
    assert "## Backend × device × check × positions" in text
    assert f"@ other-host | {SHAPE} | float16 | prefill fill" in text
    assert "<table>" in (tmp_path / "matrix.html").read_text()


def test_merge_refuses_the_same_case_twice(made: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = str(made / "cert.json")
    assert report.main(["merge", path, path, "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(
        r"longctx-report: error: case \S+ on cpu on cpu .* \(shape .*\) is in .* and .*, but should be in one "
        r"certificate only", err)
    assert not (tmp_path / "m.json").exists()


def test_merge_refuses_another_schema_version(made: Path, tmp_path: Path) -> None:
    """Through the installed console script: one line on stderr, exit status 2."""
    document = json.loads((made / "cert.json").read_text())
    document["schema_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(on_host(document, "newer")))
    script = Path(sys.executable).with_name("longctx-report")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pytest_longctx.tools.report"]
    done = subprocess.run([*command, "merge", str(made / "cert.json"), str(tmp_path / "v2.json"),
                           "-o", str(tmp_path / "m.md")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"longctx-report: error: {tmp_path / 'v2.json'}: schema_version=2, but should be 1"


def test_record_hook_sees_each_figure_once(pytester: pytest.Pytester) -> None:
    """Every phase's report carries the item's properties so far; a figure must still count once."""
    pytester.makeconftest("""
        seen = []

        def pytest_longctx_record(config, nodeid, record):
            seen.append((nodeid, record["check"]))

        def pytest_terminal_summary(terminalreporter):
            terminalreporter.write_line(f"RECORDS {len(seen)} UNIQUE {len(set(seen))}")
    """)
    result = pytester.runpytest(*small(), "-m", "longctx_memory", "--longctx-report=c.json")
    result.stdout.fnmatch_lines(["RECORDS 3 UNIQUE 3"])  # KV memory, its growth, memory after close
    document = json.loads((pytester.path / "c.json").read_text())
    assert sum(len(c["figures"]) for c in document["cases"]) == 3


def test_xdist_dist_each_keeps_every_workers_run_of_a_case(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dist=each`` (one worker per host, every case on each): one entry per case and worker."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    result = pytester.runpytest_subprocess(*small(), "-n", "2", "--dist=each", "-k", "test_memory_within",
                                           "--longctx-report=c.json", timeout=120)
    assert result.parseoutcomes()["passed"] == 2, result.stdout.str()
    document = json.loads((pytester.path / "c.json").read_text())
    validate(document)
    assert sorted(c["worker"] for c in document["cases"]) == ["gw0", "gw1"]
    assert len({c["nodeid"] for c in document["cases"]}) == 1 and document["verdict"] == "certified"


@pytest.mark.parametrize(("exitstatus", "verdict"), [(0, "certified"), (1, "not certified"), (3, "incomplete")])
def test_a_certificate_never_says_certified_past_a_non_zero_exit(exitstatus: int, verdict: str) -> None:
    """Every case it holds passed, yet pytest counted a failure (a worker that died outside any
    case) or stopped on an internal error: the certificate may not say certified."""
    cases = [cert.Case(nodeid=f"test_limits.py::t[{i}]", question="limits", outcome="passed") for i in range(3)]
    result = cert.verdict_of(cases, interrupted=False, collect_errors=0, exitstatus=exitstatus)
    assert result["verdict"] == verdict, result["reasons"]
    if exitstatus:
        assert any(f"exit status {exitstatus}" in reason for reason in result["reasons"]), result["reasons"]


def test_the_schema_names_the_questions_of_questions_py() -> None:
    """The JSON schema is data and cannot import the list: it is checked against it instead."""
    from pytest_longctx.questions import QUESTIONS

    schema = json.loads(Path(cert.SCHEMA_FILE).read_text())
    enum = schema["properties"]["cases"]["items"]["properties"]["question"]["enum"]
    assert enum == [*QUESTIONS, "other"]
