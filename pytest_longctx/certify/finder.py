"""``--longctx-find-context``: the largest context at which every selected group passes.

The position axis is searched in steps of ``--longctx-context-step`` up to a
maximum (``--longctx-max-positions``, else the backend's claimed
``max_positions``, else 131072), cut to what the memory preflight says fits.
A probe at length L runs every selected case parametrized at L; it passes when
each passed (or failed as the profile expects). The search doubles the length
from one step until a probe does not pass (or the maximum passes), then
bisects between the last pass and the first failure, so it costs about
2 log2(maximum / step) probes instead of maximum / step.

Design: pytest collects statically, the search is adaptive. The collection is
parametrized at every step length (the ladder), and this plugin's
``pytest_runtestloop`` runs only the cases of the lengths the search asks for,
through the ordinary ``pytest_runtest_protocol``. Why not one subprocess per
probe: every probe would pay start-up, imports, backend construction and the
bandwidth probe again, and reports would have to be carried back. Why not
items made on the fly: pytest's fixtures, parametrization and node ids are
built at collection and every reporter keys on them; items made later would
need all of that by hand. A ladder of 128 lengths only multiplies the number
of collected items (7168 cases of a small shape over 128 lengths collect in 6.2 s
on the loaded 2-core host, against 3.2 s for the default three lengths), and the cases still run one
length at a time, so the session-scoped fill of one length is torn down before
the next length's is made. Because cases keep their ordinary protocol,
``--longctx-isolate`` and the deadline work unchanged: a crash (under
``--longctx-isolate``) or a hang at a length fails that length's case,
which becomes the first failure, named as such; the record that a backend
hung is cleared between probes, since a shorter length is a different
question, and the search goes on below it and ends cleanly. A crash without
``--longctx-isolate`` ends the process, as it ends any run.

pytest-xdist (``-n``) is refused: each probe depends on the one before, so
there is nothing to spread over workers, and a worker holds only its own share
of each length's cases. Work is reused where the contract allows: the backend
is built and the host's bandwidth probed once for the whole search, no length
is probed twice, and within a probe the limits and memory groups read the one
filled cache (``conformance/conftest.py``). A cache cannot be carried from
one length to another: its ``max_positions`` is what the limits group checks.

``-x``/``--maxfail`` do not end the search: a failing probe is its answer, not a reason to
stop. Cases that do not depend on length (no ``longctx_positions`` parameter) are
deselected: the finder answers a question about length only.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from ..access.guard import close_warned
from ..access.runcontrol import captured, raised
from ..isolation import deadline as dl
from ..measure.preflight import cache_preflight, preflight
from ..session.fixtures import get_state, most_precise, searched_positions_key
from ..session.options import settings_key, usage_error
from ..session.settings import MAX_POSITIONS, Settings
from .certificate import question_of

plan_key = pytest.StashKey[Dict[str, "Plan"]]()
searches_key = pytest.StashKey[List["Search"]]()
asked_key = pytest.StashKey[set]()
REASON_CHARS = 240  # a failure's reason as the summary line quotes it


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """The lengths one backend's search may probe: multiples of the step up to its maximum."""

    backend: str
    step: int
    maximum: int
    rungs: Tuple[int, ...]
    note: str = ""  # why the maximum is lower than asked (memory), or empty


def ladder(step: int, maximum: int) -> Tuple[int, ...]:
    """Multiples of ``step`` below ``maximum``, then ``maximum`` itself (the length asked for)."""
    return tuple(range(step, maximum, step)) + (maximum,)


def _fits(backend: Any, settings: Settings, dtype: str, n: int) -> Optional[str]:
    """None when a cache of ``n`` positions and the float64 reference beside it fit; else why not."""
    spec = settings.spec_for(dtype, n)
    reference = 2 * settings.spec_for("float32", n).kv_bytes(n)
    if callable(getattr(backend, "memory_in_use", None)):
        return cache_preflight(backend, spec, reference)
    return preflight(spec.kv_bytes(n) + reference)


def _runtime_context(backend: Any, settings: Settings) -> Tuple[Optional[int], Optional[Any], str]:
    """A whole-model runtime's context limit and KV geometry, read by opening its model once
    (the search's maximum cannot be known before): (limit, kv_spec, "") or (None, None, why)."""
    if settings.model is None:
        return None, None, "no --longctx-model"
    with captured() as caught:  # the cases say it again, each in its own line
        runtime = backend.open_runtime(settings.model, settings.context)
    if caught.error is not None:
        return None, None, raised("open_runtime", caught.error)
    try:
        return int(runtime.context_limit), runtime.kv_spec, ""
    finally:
        close_warned(runtime, f"the {backend.name} runtime opened to read its context")


def _cut(text: str, step: int, asked: int, fits: Callable[[int], Optional[str]]) -> Plan:
    """The plan up to ``asked``, or up to the largest rung below it that ``fits`` (bisection:
    nothing is allocated to find out)."""
    why = fits(asked)
    if why is None:
        return Plan(text, step, asked, ladder(step, asked))
    rungs = [r for r in ladder(step, asked) if r < asked]
    lo, hi = -1, len(rungs)  # rungs[lo] fits, rungs[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(rungs[mid]) is None else (lo, mid)
    if lo < 0:
        return Plan(text, step, 0, (), f"--longctx-max-positions {asked} cut to nothing: even {step} "
                    f"positions do not fit ({why})")
    cut = rungs[lo]
    return Plan(text, step, cut, ladder(step, cut), f"maximum {asked} cut to {cut}, what fits: {asked} "
                f"positions {why}")


def make_plan(config: pytest.Config, text: str) -> Plan:
    """The maximum (given, claimed, the model's context or 131072), cut to the largest rung
    that fits, and the rungs."""
    settings: Settings = config.stash[settings_key]
    state = get_state(config)
    loaded = state.load(text)
    info = loaded.backend.info() if loaded.backend is not None else None
    step = settings.context_step
    granularity = int(getattr(info, "position_granularity", 1) or 1)
    if step % granularity:
        raise usage_error("context-step", step, f"is not a multiple of the position granularity "
                          f"{granularity} that backend {text!r} states")
    asked = settings.max_positions or getattr(info, "max_positions", None) or MAX_POSITIONS
    asked = min(asked, MAX_POSITIONS)
    if loaded.backend is None:  # its cases fail to load at the first probe: that is the answer
        return Plan(text, step, asked, ladder(step, asked))
    if state.kind(text) == "runtime":
        return _runtime_plan(text, step, loaded.backend, settings)
    dtypes = settings.kv_dtypes or tuple(info.kv_dtypes) or ("float32",)
    dtype = max(dtypes, key=lambda d: settings.spec_for(d, asked).kv_bytes(asked))
    return _cut(text, step, asked, lambda n: _fits(loaded.backend, settings, dtype, n))


def _runtime_plan(text: str, step: int, backend: Any, settings: Settings) -> Plan:
    """Prompt lengths up to the model's context (a runtime holds no more by contract), or up to
    --longctx-max-positions below it, cut to what its KV cache leaves room for."""
    limit, kv_spec, why = _runtime_context(backend, settings)
    asked = settings.max_positions or limit or MAX_POSITIONS
    note = ""
    if limit is not None and asked > limit:
        note = f"maximum {asked} cut to the model's context {limit}"
        asked = limit
    if limit is None:  # every case fails or skips at the first probe with its own reason
        return Plan(text, step, min(asked, step), (min(asked, step),), f"the model's context is unknown: {why}")
    plan = _cut(text, step, asked, lambda n: preflight(kv_spec.kv_bytes(n)))
    return dataclasses.replace(plan, note="; ".join(x for x in (note, plan.note) if x))


def plans(config: pytest.Config) -> Dict[str, Plan]:
    if plan_key not in config.stash:
        settings = config.stash[settings_key]
        config.stash[plan_key] = {text: make_plan(config, text) for text in settings.backends}
    return config.stash[plan_key]


def lengths(config: pytest.Config) -> Tuple[int, ...]:
    """The positions values to parametrize with: every backend's rungs."""
    return tuple(sorted({r for plan in plans(config).values() for r in plan.rungs})) or (1,)


# ----------------------------------------------------------------------------- the search


@dataclass
class Probe:
    """One length tried: passed or not, why not, how long it took, how many cases it ran."""

    positions: int
    passed: bool
    seconds: float
    cases: int
    reason: str = ""  # the first failing case's question and first line, when it did not pass
    nodeid: str = ""
    kind: str = ""  # failed, hang, crash, skipped


@dataclass
class Search:
    """A finished search for one backend."""

    plan: Plan
    probes: List[Probe] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # the run was stopped before the search ended (-x, an interrupt)

    @property
    def certified(self) -> Optional[int]:
        """The largest length probed that passed with every probe below it that was asked passing."""
        passed = [p.positions for p in self.probes if p.passed]
        failed = [p.positions for p in self.probes if not p.passed]
        below = [n for n in passed if not any(f < n for f in failed)]
        return max(below) if below else None

    @property
    def first_failure(self) -> Optional[Probe]:
        failed = [p for p in self.probes if not p.passed]
        return min(failed, key=lambda p: p.positions) if failed else None

    def line(self) -> str:
        """``certified context: 8192 positions (step 1024); first failure at 9216: equivalence, ...``"""
        certified = self.certified
        head = (f"certified context: {certified} positions" if certified is not None
                else "certified context: none")
        head += f" (step {self.plan.step})"
        failure = self.first_failure
        if failure is not None:
            head += f"; first failure at {failure.positions}: {failure.reason}"
        elif certified == self.plan.maximum:
            head += f"; no failure up to the maximum {self.plan.maximum}"
        if self.stopped:  # a lower bound only: the search did not finish
            head += f"; {self.stopped} (at least this much)"
        return head

    def detail(self) -> str:
        tried = ", ".join(f"{p.positions}{'' if p.passed else ' x'}" for p in self.probes)
        return (f"{len(self.probes)} probes in {self.seconds:.1f} s ({tried})"
                + (f"; {self.plan.note}" if self.plan.note else ""))

    def as_dict(self) -> Dict[str, Any]:
        failure = self.first_failure
        return {
            "backend": self.plan.backend, "step": self.plan.step, "maximum": self.plan.maximum,
            "maximum_note": self.plan.note, "certified_positions": self.certified,
            "first_failure": None if failure is None else {
                "positions": failure.positions, "kind": failure.kind, "reason": failure.reason,
                "case": failure.nodeid},
            "probes": [{"positions": p.positions, "passed": p.passed, "seconds": round(p.seconds, 3),
                        "cases": p.cases, "reason": p.reason} for p in self.probes],
            "seconds": round(self.seconds, 3), "stopped": self.stopped, "line": self.line(),
        }


def search(rungs: Sequence[int], probe: Callable[[int], bool]) -> Tuple[int, Optional[int]]:
    """Doubling then bisection over ``rungs`` (ascending); assumes that a length that fails
    fails above too. Returns the indices of the last pass (-1: none) and the first failure
    (None: none up to the last rung). ``probe`` may raise StopIteration to end the search."""
    if not rungs:
        return -1, None
    lo, hi, k = -1, None, 1
    while hi is None:
        i = min(k - 1, len(rungs) - 1)
        if probe(rungs[i]):
            lo = i
            if i == len(rungs) - 1:
                return lo, None
            k *= 2
        else:
            hi = i
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(rungs[mid]):
            lo = mid
        else:
            hi = mid
    return lo, hi


# ----------------------------------------------------------------------------- running a probe


def _first_line(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return f"skipped: {report.longrepr[2].removeprefix('Skipped: ')}"
    text = getattr(report, "longreprtext", "") or ""
    lines = [line.strip().removeprefix("Failed: ") for line in text.splitlines() if line.strip()]
    if not lines:
        return report.outcome
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:  # "2 of 6 comparisons failed:" heads the first of them
        line = f"{line} {lines[1]}"
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 4].rstrip() + " ..."


def _kind(line: str) -> str:
    """hang (the deadline's "no answer in N s"), crash (an isolated child's "process killed by
    SIGSEGV", "process exited with status 1", ...) or failed."""
    if "no answer in" in line:
        return "hang"
    if re.search(r"=process (killed|exited|ended)", line):
        return "crash"
    return "failed"


def case_key(item: pytest.Item) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
    """A case apart from its length: the test and every parameter but ``longctx_positions``."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return item.nodeid.split("[")[0], tuple(sorted((k, repr(v)) for k, v in params.items()
                                                   if k != "longctx_positions"))


class ProbeRunner:
    """Runs the cases of one length through the ordinary protocol and judges them.

    A skipped case is a failure of its length only when the same case passed at a shorter
    length (it no longer fits, or the runtime stopped holding the depth); a case skipped at
    every length so far (no --longctx-reference-logits, a kv dtype the backend lacks) says
    nothing about length and is not judged. A length where nothing passed is not passed."""

    def __init__(self, session: pytest.Session) -> None:
        self.session = session
        self.config = session.config
        self.reports: Dict[str, List[pytest.TestReport]] = {}
        self.passed_cases: set = set()  # case_key of every case that passed at some length

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.setdefault(report.nodeid, []).append(report)

    def run(self, items: List[pytest.Item], positions: int) -> Probe:
        self.config.stash.get(dl.hung_key, {}).clear()  # a shorter length is a new question
        started = time.monotonic()
        self.reports.clear()
        asked = self.config.stash.setdefault(asked_key, set())
        for i, item in enumerate(items):
            asked.add(item.nodeid)
            nextitem = items[i + 1] if i + 1 < len(items) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if self.session.shouldstop:
                break
        probe = Probe(positions, True, time.monotonic() - started, len(items))
        failures = []  # (kind, item, line) of every case that did not pass, in the order they ran
        unjudged = []  # (item, line) of cases skipped at this length and never passed below it
        passed_here = set()
        for item in items:
            reports = self.reports.get(item.nodeid, [])
            bad = next((r for r in reports if r.failed or (r.skipped and not hasattr(r, "wasxfail"))), None)
            if bad is None and reports:
                passed_here.add(case_key(item))
                continue
            line = "not run" if bad is None else _first_line(bad)
            if bad is not None and not bad.failed and case_key(item) not in self.passed_cases:
                unjudged.append((item, line))
                continue
            failures.append(("skipped" if bad is not None and bad.skipped else _kind(line), item, line))
        if not failures and not passed_here and unjudged:  # nothing was judged at this length
            failures.append(("skipped", unjudged[0][0], unjudged[0][1]))
        self.passed_cases |= passed_here
        if failures:
            # A hang or a crash names the length before an ordinary failure beside it: the case
            # where it happened ran first of those that name it ("not asked" comes after).
            kind, item, line = next((f for f in failures if f[0] in ("hang", "crash")), failures[0])
            probe.passed = False
            probe.reason = f"{question_of(item.nodeid)}, {line}"
            probe.nodeid, probe.kind = item.nodeid, kind
        return probe


def _positions_of(item: pytest.Item) -> Optional[int]:
    return getattr(getattr(item, "callspec", None), "params", {}).get("longctx_positions")


def _backend_of(item: pytest.Item) -> Optional[str]:
    return getattr(getattr(item, "callspec", None), "params", {}).get("longctx_backend")


def run_search(session: pytest.Session, plan: Plan, runner: ProbeRunner, result: Search) -> Search:
    by_length: Dict[int, List[pytest.Item]] = {}
    for item in session.items:
        if _backend_of(item) == plan.backend and _positions_of(item) in plan.rungs:
            by_length.setdefault(_positions_of(item), []).append(item)
    started = time.monotonic()

    def probe(n: int) -> bool:
        if session.shouldstop:
            result.stopped = f"the run was stopped: {session.shouldstop}"
            raise StopIteration
        items = by_length.get(n, [])
        if not items:
            result.probes.append(Probe(n, False, 0.0, 0, "no selected case at this length", kind="skipped"))
            return False
        result.probes.append(runner.run(items, n))
        return result.probes[-1].passed

    try:
        search([r for r in plan.rungs if r in by_length] or list(plan.rungs), probe)
    except StopIteration:
        pass
    except BaseException:  # Ctrl-C: the probes made so far still stand in the summary and certificate
        result.stopped = result.stopped or "the search was interrupted"
        raise
    finally:
        result.seconds = time.monotonic() - started
    return result


# ----------------------------------------------------------------------------- hooks


def finding(config: pytest.Config) -> bool:
    settings = config.stash.get(settings_key, None)
    return bool(settings is not None and settings.find_context)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not finding(config):
        return
    workers = getattr(config.option, "numprocesses", None)
    if workers and not hasattr(config, "workerinput"):
        raise pytest.UsageError(
            f"longctx: --longctx-find-context with -n {workers}: each probe's length depends on the last "
            "result, so the search runs in one process; drop -n (use --longctx-isolate to survive crashes)")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Plan before collection, so that a step the backend cannot hold is a usage error, not a
    collection error in every module."""
    if finding(session.config) and not hasattr(session.config, "workerinput"):
        session.config.stash[searched_positions_key] = lengths(session.config)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Leave out the cases that do not depend on length: the finder answers about length only."""
    if not finding(config):
        return
    fixed = [item for item in items if "longctx_backend" in getattr(item, "fixturenames", ())
             and _positions_of(item) is None]
    if fixed:
        config.hook.pytest_deselected(items=fixed)
        items[:] = [item for item in items if item not in fixed]


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> Optional[bool]:
    config = session.config
    if not finding(config) or hasattr(config, "workerinput"):
        return None
    if session.testsfailed and not config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error{'s' if session.testsfailed != 1 else ''} "
                                  "during collection")
    if config.option.collectonly:
        return True
    runner = ProbeRunner(session)
    config.pluginmanager.register(runner, "longctx-finder-probe")
    try:
        searches = config.stash[searches_key] = []
        for plan in plans(config).values():
            searches.append(Search(plan))
            run_search(session, plan, runner, searches[-1])
            config.hook.pytest_longctx_context(config=config, search=searches[-1].as_dict())
    finally:
        config.pluginmanager.unregister(runner)
    return True


def pytest_report_header(config: pytest.Config) -> Optional[List[str]]:
    """What each backend's search will cover, and why its maximum was cut."""
    if not finding(config) or hasattr(config, "workerinput"):
        return None
    return [f"longctx finder: {plan.backend}: step {plan.step}, up to {plan.maximum} positions"
            + (f" ({plan.note})" if plan.note else "") for plan in plans(config).values()]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    searches = config.stash.get(searches_key, None)
    if not searches:
        return
    terminalreporter.write_sep("=", "longctx context finder")
    for result in searches:
        terminalreporter.write_line(f"{result.plan.backend}: {result.line()}")
        terminalreporter.write_line(f"  {result.detail()}")
