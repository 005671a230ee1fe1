"""The docs stay true: one test per page runs or checks the examples that page shows.

Examples are read from the pages themselves, so editing a page's command or quoted
output without the code (or the code without the page) fails here. Runs that need a GPU, an
NPU or minutes of llama.cpp are not repeated; their options are still checked against the
plugin's (test_every_option_the_docs_quote_exists).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import List, Set

import pytest

import pytest_longctx.conformance as conformance
from _suite_runs import FLOORS_OFF

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS_DIR = Path(__file__).parent
SUITE = os.path.dirname(conformance.__file__)
SMALL = "--longctx-shape=n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def _blocks(text: str, lang: str = "") -> List[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> List[List[str]]:
    """The `$ pytest ...` commands of a quoted session, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line[len("$ pytest "):]) for line in joined.splitlines() if line.startswith("$ pytest ")]


def _outcome(block: str) -> dict:
    """The counts of the last `=== 2 failed, 2 passed ... ===` line of a quoted session."""
    line = [ln for ln in block.splitlines() if re.match(r"=+ .*\d+ (passed|failed)", ln)][-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|deselected|xfailed|skipped)", line)}


@pytest.fixture
def plugin_options(pytester: pytest.Pytester) -> Set[str]:
    """Every --longctx-* option pytest knows, as its --help lists them."""
    return set(re.findall(r"^ +(--longctx-[a-z0-9-]+)", pytester.runpytest("--help").stdout.str(), flags=re.M))


def test_getting_started_shows_the_example_backend_and_it_passes(pytester: pytest.Pytester) -> None:
    blocks = _blocks(_page("getting-started.md"), "python")
    assert (ROOT / "examples" / "minimal_backend.py").read_text() in blocks
    pytester.syspathinsert(ROOT)
    result = pytester.runpytest(
        SUITE, "-p", "no:cacheprovider", "--longctx-backend=examples.minimal_backend:MinimalBackend",
        SMALL, "--longctx-positions=4096", *FLOORS_OFF,  # a correctness run: the timing floors are not its question
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-3000:]
    assert outcomes["passed"] >= 20


def test_getting_started_own_test_example_runs(pytester: pytest.Pytester) -> None:
    """The fixtures example, as a user would paste it into a test file of their own."""
    example = [b for b in _blocks(_page("getting-started.md"), "python") if "longctx_cache" in b]
    assert len(example) == 1, "getting-started.md should show one example test using the fixtures"
    pytester.makepyfile(test_mine=example[0])
    result = pytester.runpytest("test_mine.py", "-p", "no:cacheprovider", "--longctx-backend=cpu", SMALL,
                                "--longctx-positions=1024", "--longctx-kv-dtype=float32")
    result.assert_outcomes(passed=1)


def test_options_page_has_a_row_for_every_option_and_no_other(plugin_options: Set[str]) -> None:
    rows = set(re.findall(r"^\| `(--longctx-[a-z0-9-]+)", _page("options.md"), flags=re.M))
    assert rows == plugin_options, {"missing": plugin_options - rows, "not an option": rows - plugin_options}


def test_every_option_the_docs_quote_exists(plugin_options: Set[str]) -> None:
    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    quoted = {(p.relative_to(ROOT).as_posix(), o) for p in pages
              for o in re.findall(r"--longctx-[a-z0-9]+(?:-[a-z0-9]+)*", p.read_text())}
    unknown = sorted(f"{page}: {option}" for page, option in quoted if option not in plugin_options)
    assert not unknown, unknown


def test_questions_page_names_the_registered_markers_and_every_module(pytestconfig: pytest.Config) -> None:
    page = _page("questions.md")
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    named = set(re.findall(r"`(longctx_[a-z]+)`", page))
    assert named == {"longctx_limits", "longctx_memory", "longctx_throughput", "longctx_equivalence"}
    assert named <= registered, named - registered
    modules = {p.name for p in Path(SUITE).glob("test_*.py") if not p.name.startswith("test_runtime_")}
    assert {m for m in modules if f"(../conformance/{m})" not in page} == set()
    runtime = {p.name for p in Path(SUITE).glob("test_runtime_*.py")}
    assert {m for m in runtime if f"(../conformance/{m})" not in _page("runtimes.md")} == set()


def test_certification_page_shows_a_shipped_profile_and_lists_all(pytester: pytest.Pytester) -> None:
    page = _page("certification.md")
    profiles = sorted((ROOT / "pytest_longctx" / "session" / "profiles").glob("*.toml"))
    assert (ROOT / "pytest_longctx" / "session" / "profiles" / "7b-sim-16k-ladder.toml").read_text() in _blocks(page, "toml")
    assert [p.stem for p in profiles if f"| `{p.stem}` |" not in page] == []


def test_certification_page_malformed_profile_example(pytester: pytest.Pytester) -> None:
    """The quoted usage error, made by a profile whose line 6 says fill-floor = 'fast'."""
    quoted = [ln for ln in _page("certification.md").splitlines() if ln.startswith("ERROR: longctx: profile ")]
    assert len(quoted) == 1
    line, key, value = re.search(r" line (\d+): bars\.([a-z-]+)='(\w+)'", quoted[0]).groups()
    header = ["[profile]", 'name = "claim"', 'claim = "a claim"', "", "[bars]"]
    text = "\n".join(header + [""] * (int(line) - len(header) - 1) + [f'{key} = "{value}"']) + "\n"
    pytester.makefile(".toml", claim=text)
    result = pytester.runpytest("--longctx-profile=claim.toml", "--co")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([quoted[0].replace("/tmp/cert-bad/", "*/")])


def _sessions(text: str) -> List[str]:
    """Each quoted `$ pytest ...` session of a page: the command and the output under it."""
    sessions = []
    for block in _blocks(text):
        starts = [m.start() for m in re.finditer(r"^\$ ", block, flags=re.M)] + [len(block)]
        sessions += [block[a:b] for a, b in zip(starts, starts[1:])]
    return sessions


@pytest.mark.parametrize("backend", ["Segfault", "Memorises"])
def test_integrity_page_examples_run_as_quoted(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                               backend: str) -> None:
    """The page's sessions with a backend that crashes, and one that answers from a cache."""
    (session,) = [s for s in _sessions(_page("integrity.md"))
                  if s.startswith(f"$ pytest --longctx-backend=misbehaving_backends:{backend} ")]
    (args,) = _commands(session)
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))  # as the page says: tests/ on PYTHONPATH
    result = pytester.runpytest_subprocess(*args, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    if re.search(r"^=+ .*\d+ (passed|failed)", session, flags=re.M):
        quoted = {k: v for k, v in _outcome(session).items() if k in ("passed", "failed")}
        assert {k: v for k, v in result.parseoutcomes().items() if k in quoted} == quoted
    messages = [ln for ln in session.splitlines() if ", but should be " in ln]
    assert messages, "the quoted session should show its failure line"
    # figures, layers and seeds differ per run: the words must match, the numbers need not
    result.stdout.fnmatch_lines(["*" + re.sub(r"\d+(\.\d+)?", "*", m.split(" [")[0]) + "*" for m in messages])


def test_every_builtin_backend_has_a_page() -> None:
    modules = {p.stem[: -len("_backend")] for p in (ROOT / "backends").glob("*_backend.py")}
    pages = {"numpy" if p.stem == "cpu" else p.stem.replace("-", "_") for p in (DOCS / "backends").glob("*.md")}
    assert modules - pages == set(), f"backends without a page in docs/backends/: {modules - pages}"


def test_readme_certificate_and_profile_commands_are_accepted(pytester: pytest.Pytester) -> None:
    """The README's two commands, collected only: the options, the profile name and the paths hold."""
    readme = (ROOT / "README.md").read_text()
    commands = [shlex.split(line)[1:] for block in _blocks(readme) for line in block.splitlines()
                if line.startswith("pytest ") and ("--longctx-report" in line or "--longctx-profile" in line)]
    assert len(commands) == 2, commands
    for args in commands:
        result = pytester.runpytest(*args, "--co", "-q", "-p", "no:cacheprovider")
        assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:] + result.stderr.str()[-2000:]
