"""The certificate plugin: ``--longctx-report`` (JSON), ``-md`` and ``-html`` files of a run.

Workers attach each case's parameters, host and device to its report as plain
JSON in ``user_properties``; only the controller collects, so under
pytest-xdist every worker's cases reach one certificate. Paths are checked in
``pytest_configure``: an unwritable path stops the run before an hour of
measurement, not after. The files are written in ``pytest_sessionfinish``,
which pytest runs after Ctrl-C too: such a certificate says "interrupted".
Nothing here runs unless a report is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any, Dict, List, Optional

import pytest

from ..questions import QUESTIONS
from ..session.fixtures import get_state, records_of
from ..session.options import profile_key, settings_key
from ..session.terminal import RERUN_KEY
from . import certificate as cert
from .coverage import coverage

CASE_KEY = "longctx_case"
_OPTIONS = (("report", "write the certificate as JSON to PATH (Markdown beside it, PATH with .md)"),
            ("report-md", "write the certificate as Markdown to PATH"),
            ("report-html", "write the certificate as a self-contained HTML page to PATH (plots with the "
                            "'report' extra: matplotlib)"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("longctx")
    for name, text in _OPTIONS:
        dest = "longctx_" + name.replace("-", "_")
        group.addoption(f"--longctx-{name}", dest=dest, default=None, metavar="PATH", help=text)
        parser.addini(dest, text, type="string", default=None)


def _path(config: pytest.Config, name: str) -> Optional[str]:
    dest = "longctx_" + name.replace("-", "_")
    value = config.getoption(dest) or config.getini(dest)
    if not value:
        return None
    return os.path.join(str(config.invocation_params.dir), os.path.expanduser(value))


def report_paths(config: pytest.Config) -> Dict[str, str]:
    """json, md, html → path, for the files asked for (Markdown goes beside the JSON by default)."""
    paths = {kind: _path(config, name) for kind, name in (("json", "report"), ("md", "report-md"),
                                                          ("html", "report-html"))}
    if paths["json"] and not paths["md"]:
        root, _ = os.path.splitext(paths["json"])
        paths["md"] = root + ".md"
    return {kind: path for kind, path in paths.items() if path}


def _check_writable(option: str, path: str) -> None:
    """Open for append and close (removing what it created): the only test that sees
    read-only file systems and root alike."""
    existed = os.path.exists(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "Is a directory")
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)
    except OSError as exc:
        raise pytest.UsageError(
            f"longctx: --longctx-{option}={path}: should be a writable file path ({exc.strerror})") from None


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    paths = report_paths(config)
    if not paths or hasattr(config, "workerinput"):
        return
    names = {"json": "report", "md": "report-md", "html": "report-html"}
    for kind, path in paths.items():
        _check_writable(names[kind], path)
    config.pluginmanager.register(CertificateCollector(config, paths), "longctx-certificate")


# ----------------------------------------------------------------------------- worker side


def _plain_params(item: pytest.Item) -> Dict[str, Any]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}


def question_of_item(item: pytest.Item) -> str:
    """The question a case certifies, by its ``longctx_*`` marker (its module where it has none)."""
    questions = [m.name[len("longctx_"):] for m in item.iter_markers() if m.name.startswith("longctx_")]
    return next((q for q in questions if q in QUESTIONS), "") or cert.question_of(item.nodeid)


def case_info(item: pytest.Item) -> Dict[str, Any]:
    """What the controller cannot know about a case: its parameters, markers, host and device."""
    params = _plain_params(item)
    question = question_of_item(item)
    backend = str(params.get("longctx_backend", ""))
    device = ""
    if backend:
        loaded = get_state(item.config).load(backend)
        if loaded.backend is not None:
            info = loaded.backend.info()
            device = f"{info.device_kind} {info.device_name}".strip()
    return {
        "question": question, "params": params, "host": platform.node(), "device": device,
        "worker": getattr(item.config, "workerinput", {}).get("workerid", ""),
        "seed": item.config.stash[settings_key].seed,
    }


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report_paths(item.config) and "longctx_backend" in getattr(item, "fixturenames", ()):
        report.user_properties.append((CASE_KEY, json.dumps(case_info(item))))
    return report


# ----------------------------------------------------------------------------- controller side


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if report.failed:
        text = report.longreprtext.strip()
        return text if len(text) < 4000 else text[:4000] + " …"
    return ""


class CertificateCollector:
    """Registered on the controller when a report is asked for; writes it at session end."""

    def __init__(self, config: pytest.Config, paths: Dict[str, str]) -> None:
        self.config = config
        self.paths = paths
        self.cases: Dict[str, cert.Case] = {}
        self.started = time.time()
        self.interrupted = False
        self.collect_errors = 0
        self.document: Optional[Dict[str, Any]] = None
        self.each = getattr(config.option, "dist", "no") == "each"

    def _case(self, nodeid: str, worker: str = "") -> cert.Case:
        """One case per node id; with ``--dist=each`` every worker (host) runs every case: one per worker."""
        key = f"{nodeid}@{worker}" if self.each else nodeid
        if key not in self.cases:
            self.cases[key] = cert.Case(nodeid=nodeid, question=cert.question_of(nodeid), worker=worker)
        return self.cases[key]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Without pytest-xdist the controller collects: every matrix case starts as 'not run'."""
        for item in session.items:
            if "longctx_backend" in getattr(item, "fixturenames", ()):
                self._case(item.nodeid).question = question_of_item(item)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: List[str]) -> None:
        """Under pytest-xdist: the suite's cases a worker collected start as 'not run'."""
        worker = getattr(getattr(node, "gateway", None), "id", "")
        for nodeid in ids:
            if cert.question_of(nodeid) != "other":
                self._case(nodeid, worker)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors += 1

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        infos = [json.loads(v) for k, v in report.user_properties if k == CASE_KEY]
        if not infos:
            self._unannounced(report)
            return
        info = infos[-1]
        case = self._case(report.nodeid, info["worker"])
        params = info["params"]
        case.question = info["question"] or case.question
        case.params = params
        case.backend = str(params.get("longctx_backend", ""))
        case.kv_dtype = str(params.get("longctx_kv_dtype", ""))
        case.positions = params.get("longctx_positions")
        case.seed, case.host, case.worker, case.device = info["seed"], info["host"], info["worker"], info["device"]
        case.duration_s = round(case.duration_s + report.duration, 6)
        wasxfail = hasattr(report, "wasxfail")
        if report.when == "setup":
            case.outcome = ("xfailed" if wasxfail else "skipped") if report.skipped else (
                "error" if report.failed else "running")
        elif report.when == "call":
            if report.passed:  # a non-strict xpass too: passing is not a defect
                case.outcome = "passed"
            elif report.failed:
                case.outcome = "xpassed" if "XPASS(strict)" in report.longreprtext else "failed"
            else:
                case.outcome = "xfailed" if wasxfail else "skipped"
        elif report.failed and case.outcome not in ("failed", "xpassed"):
            case.outcome = "error"
        if wasxfail and not case.message:
            case.message = f"expected failure: {report.wasxfail}"
        message = _message(report)
        if message:
            case.message = message if not case.message.startswith("expected failure") else \
                f"{case.message}\n{message}"
        records = records_of(report)  # the item's figures so far: each phase's report holds the earlier ones
        if len(records) >= len(case.figures):
            case.figures = records
        case.rerun = next((v for k, v in report.user_properties if k == RERUN_KEY), case.rerun)

    def _unannounced(self, report: pytest.TestReport) -> None:
        """A failure of a known case that no worker made: pytest-xdist's report of a worker that
        crashed while running it (the worker died before it could report)."""
        worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", "")
        key = f"{report.nodeid}@{worker}" if self.each else report.nodeid
        if not report.failed or key not in self.cases:
            return
        case = self.cases[key]
        case.outcome = "failed"
        case.message = _message(report) or case.message

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        """Where this process runs the cases itself, a crash or a native hang in the backend
        ends the run before ``pytest_sessionfinish``: a checkpoint of the JSON certificate,
        written as each case starts, names the case that was running."""
        runs_here = get_state(self.config).runs_cases and getattr(self.config.option, "dist", "no") == "no"
        if runs_here and nodeid in self.cases:
            self.write_json(self.build(pytest.ExitCode.INTERNAL_ERROR, unfinished=nodeid))

    def write_json(self, document: Dict[str, Any]) -> None:
        """Replace the JSON file whole (a reader never sees half a document)."""
        path = self.paths.get("json")
        if path:
            cert.write_json(path + ".tmp", document)
            os.replace(path + ".tmp", path)

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    def environment(self) -> Dict[str, Any]:
        state = get_state(self.config)
        backends = []
        for text in self.config.stash[settings_key].backends:
            loaded = state.load(text)
            backends.append(cert.backend_environment(text, loaded.backend, loaded.error))
        return {**cert.host_environment(), "backends": backends,
                "workers": sorted({f"{c.worker or 'main'}@{c.host}" for c in self.cases.values() if c.host})}

    def build(self, exitstatus: int, unfinished: Optional[str] = None) -> Dict[str, Any]:
        settings = self.config.stash[settings_key]
        profile = self.config.stash.get(profile_key, None)
        cases = [dataclasses.replace(case) for case in self.cases.values()]
        for case in cases:
            if case.nodeid == unfinished and case.outcome in ("not run", "running"):
                case.message = "the run ended while this case was running: no result was reported"
            if case.outcome == "running":  # setup passed, the call never reported
                case.outcome = "not run"
        from . import finder  # not at import: the plugin modules are imported in plugin.py's order

        searches = self.config.stash.get(finder.searches_key, None)
        if searches is not None:  # the finder ran: a length it never asked for is no case of this run
            asked = self.config.stash.get(finder.asked_key, set())
            cases = [c for c in cases if c.nodeid in asked or c.outcome not in ("not run",)]
        environment = self.environment()
        claimed = {b["backend"]: b["kv_dtypes"] for b in environment["backends"] if b.get("available")}
        return cert.build(
            settings=settings, profile=profile.as_dict() if profile else None, cases=cases,
            environment=environment, interrupted=self.interrupted, collect_errors=self.collect_errors,
            started=self.started, finished=time.time(), exitstatus=exitstatus,
            coverage=coverage(cases, settings, claimed), unfinished=unfinished,
            context=None if searches is None else [search.as_dict() for search in searches],
        )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            self.interrupted = True
        document = self.build(exitstatus)
        self.config.hook.pytest_longctx_certificate(config=self.config, certificate=document)
        self.document = document
        from . import render

        for kind, path in self.paths.items():
            if kind == "json":
                self.write_json(document)
            elif kind == "md":
                with open(path, "w") as handle:
                    handle.write(render.markdown(document))
            else:
                with open(path, "w") as handle:
                    handle.write(render.html(document))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.document is None:
            return
        terminalreporter.write_sep("-", "longctx certificate")
        terminalreporter.write_line(
            f"verdict: {self.document['verdict']} ({'; '.join(self.document['reasons'])})")
        for kind, path in self.paths.items():
            terminalreporter.write_line(f"{kind}: {path}")
