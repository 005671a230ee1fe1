"""``--longctx-isolate``: cases run in a forked child process, replaced when it crashes or hangs.

A backend is native code: it can segfault, abort, or hang in a call no signal
interrupts. Only a process boundary survives that. With ``--longctx-isolate``
the process pytest runs in (the parent) forks a child that runs the cases of
the matrix one after the other, as pytest-xdist's workers do, and sends each
report back as it is made. When the child dies (a signal, ``exit()``) the case
it was running fails with the signal and the last lines it wrote, its
remaining phases are reported, and the next case gets a new child. When a case
is still running at its deadline plus grace (``deadline.py``; the child's own
timer ends hangs in Python before that), the parent dumps the child's stack
(``faulthandler`` on SIGUSR1), ends its process group, and fails the case with
"no answer in N s" and where it hung. When host memory runs out while the
child holds most of it, the parent ends it before the host does. Every such
failure goes through the ordinary report hooks, so the terminal, JUnit and the
certificate see it like any other.

Why fork and not pytest-xdist's worker replacement: xdist reports a crashed
worker without the signal or its output, cannot end a worker that hangs in
native code, and is a separate choice of the user (``-n`` and
``--longctx-isolate`` combine: each worker forks its own child). Why one child
for many cases: session fixtures (the full cache that the limits and memory
groups share) are set up once per child, not once per case.

The parent never runs backend code, so that forking it is safe (a CUDA context
or a runtime's thread pool does not survive a fork): it learns each backend's
``info()`` (kv dtypes for the matrix, device for the header and certificate)
from a short-lived forked child, which also turns a backend that crashes or
hangs while loading into a load error reported on each of its cases. A
child's crash and hang stacks (``faulthandler``) go to files the parent reads;
what a case prints is captured by pytest as usual, and with fd capture (the
default) the parent also reads what a dead child had printed, from the capture
files they share. Warnings raised in a child are not shown. A profile's
expected failure does not excuse a crash or a hang. POSIX only (``os.fork``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Pipe
from typing import Dict, List, Optional, Tuple

import psutil
import pytest

from ..access.registry import BackendLoadError, backend_kind, load_backend
from ..protocol import BackendInfo
from ..session.fixtures import _Loaded, get_state
from ..session.options import settings_key
from . import deadline as dl
from . import forked

runner_key = pytest.StashKey["IsolatedRunner"]()

def host_reserve_bytes() -> int:
    """What the parent keeps free for the host: it ends a child that holds more than this while
    the host has less than this free. 2% of the host's memory, at least 256 MiB; asked when a
    run starts, not when the module is imported."""
    return max(256 << 20, psutil.virtual_memory().total // 50)


def host_free() -> int:
    """Bytes of host memory available now."""
    return int(psutil.virtual_memory().available)


@dataclass
class Described:
    """A backend as the parent of isolated cases knows it: its ``info()``, read in a child."""

    name: str
    described: BackendInfo

    def info(self) -> BackendInfo:
        return self.described


# ----------------------------------------------------------------------------- a child's output


# ----------------------------------------------------------------------------- loading, in a child


def probe(config: pytest.Config, text: str) -> _Loaded:
    """Construct the backend in a forked child and bring back its ``info()`` or its error."""
    state = get_state(config)
    settings = config.stash[settings_key]
    limit = dl.seconds_for(config, min(settings.positions))
    limit = None if limit is None else limit + dl.grace(limit)
    output = forked.Output()
    parent_end, child_end = Pipe()
    pid = forked.fork_child()
    if pid == 0:  # the child: load, answer, leave
        code = 0
        try:
            parent_end.close()
            output.redirect()
            try:
                backend = load_backend(text, state.factories)
                info = backend.info()
                child_end.send(("info", BackendInfo(**{k: getattr(info, k) for k in BackendInfo.__dataclass_fields__}),
                                backend_kind(backend)))
            except BaseException as exc:  # everything, SystemExit included, is the backend's
                child_end.send(("error", forked.portable(exc)))
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    child_end.close()
    try:
        message = forked.wait_one(parent_end, pid, limit)
    finally:
        parent_end.close()
    if message is not None and message[0] == "info":
        info, kind = message[1], message[2]
        forked.reap(pid, 10)
        output.close()
        return _Loaded(Described(info.name, info), None, tuple(info.kv_dtypes), kind)
    if message is not None and message[0] == "error":
        forked.reap(pid, 10)
        output.close()
        return _Loaded(None, message[1])
    if message is None:  # no answer in time: take its stack, end it
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        forked.kill_group(pid)
        how = f"gave no answer in {limit:.3g} s while loading"
    else:
        how = f"was {forked.ended(forked.reap(pid, 10))} while loading"
    out, err = output.since((0, 0))
    output.close()
    shown = forked.last_output(out, err, None)
    detail = f"; last output: {' | '.join(shown[:4])}" if shown else ""
    return _Loaded(None, BackendLoadError(f"backend {text!r} {how}{detail}"))


# ----------------------------------------------------------------------------- the parent


class IsolatedRunner:
    """Registered in the parent: runs each case of the matrix in the child, replacing it as needed."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.child: Optional[forked.Child] = None
        self.index: Dict[int, int] = {}
        self.reserve = host_reserve_bytes()

    def run(self, item: pytest.Item, nextitem: Optional[pytest.Item]) -> bool:
        if not self.index:
            self.index = {id(it): i for i, it in enumerate(item.session.items)}
        if id(item) not in self.index:
            return False
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        earlier = dl.hung_before(item)
        if earlier is not None:  # not asked again: no child is started for it
            self._fail_rest(item, [], (earlier, ""), "", 0.0)
            ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            return True
        if self.child is None:
            self.child = forked.Child.start(item.session)
        child = self.child
        mark = child.output.mark()
        nextindex = self.index.get(id(nextitem)) if nextitem is not None else None
        deadline = dl.deadline_of(item)
        limit = None if deadline is None else deadline + dl.grace(deadline)
        started = checked = time.monotonic()
        phases: List[str] = []  # phases reported so far, and the next one due
        problem: Optional[Tuple[str, str]] = None  # (measured, expected)
        try:
            try:
                child.conn.send(("run", self.index[id(item)], nextindex))
            except OSError:  # it died while idle
                problem = self._died(child)
            while problem is None:
                if time.monotonic() - checked >= forked.POLL_S or checked == started:
                    checked = time.monotonic()
                    problem = self._memory_low(child)
                    if problem is not None:
                        break
                if child.conn.poll(forked.POLL_S):
                    try:
                        message = child.conn.recv()
                    except (EOFError, OSError):
                        problem = self._died(child)
                        break
                    if message[0] == "report":
                        report = self.config.hook.pytest_report_from_serializable(config=self.config, data=message[1])
                        phases.append(report.when if report.when != "setup" or report.passed else "call")
                        ihook.pytest_runtest_logreport(report=report)
                    elif message[0] == "done":
                        break
                    continue
                elapsed = time.monotonic() - started
                if limit is not None and elapsed >= limit:
                    problem = self._hung(child, item, deadline, elapsed, _phase(phases))
                    break
                if not forked.alive(child.pid):
                    problem = self._died(child) if not child.conn.poll(0) else None
                    if problem is not None:
                        break
        except BaseException:
            self.child = None
            child.end()
            child.output.close()
            raise
        if problem is not None:
            out, err = child.output.since(mark)
            self.child = None
            child.output.close()
            shown = forked.indented("last output of the isolated process", forked.last_output(out, err, child.thread))
            shown += forked.indented("what the case printed before", forked.captured(self.config))
            self._fail_rest(item, phases, problem, shown, time.monotonic() - started)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _died(self, child: forked.Child) -> Tuple[str, str]:
        return f"process {forked.ended(forked.reap(child.pid, 10))}", "an answer or an exception"

    def _hung(self, child: forked.Child, item: pytest.Item, deadline: float, elapsed: float, phase: str) -> Tuple[str, str]:
        """Dump its stack (faulthandler on SIGUSR1), then end its process group."""
        try:
            os.kill(child.pid, signal.SIGUSR1)
            time.sleep(0.5)
        except ProcessLookupError:
            pass
        child.end()
        dl.record_hang(item, deadline)
        return (dl.no_answer(item, deadline, phase, f"still running after {elapsed:.3g} s: the process was ended"),
                "")

    def _memory_low(self, child: forked.Child) -> Optional[Tuple[str, str]]:
        free = host_free()
        if free >= self.reserve:
            return None
        try:
            process = psutil.Process(child.pid)
            held = sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
        except psutil.Error:
            return None
        if held < self.reserve:
            return None  # someone else is using the memory
        child.end()
        gib = 1 << 30
        return (f"process ended holding {held / gib:.1f} GiB while the host had {free / gib:.2f} GiB free",
                f"leaving the host at least {self.reserve / gib:.2f} GiB")

    def _fail_rest(self, item: pytest.Item, phases: List[str], problem: Tuple[str, str], shown: str,
                   elapsed: float) -> None:
        """Report the phase that was running as failed, and the phases that never ran, through
        the ordinary hooks (so the rerun command and the certificate's case info come along)."""
        measured, expected = problem
        phase = _phase(phases)
        if expected:
            text = f"case {phase}={measured}, but should be {expected} [{dl.case_of(item)}]"
        else:
            text = measured  # already a whole line (no answer in time)
        text += shown
        todo = ["setup", "call", "teardown"][["setup", "call", "teardown"].index(phase):]
        if phase == "setup":
            todo = ["setup", "teardown"]
        for when in todo:
            if when == phase:
                call = pytest.CallInfo.from_call(lambda: pytest.fail(text, pytrace=False), when=when)  # type: ignore
                call.duration = elapsed
            else:
                call = pytest.CallInfo.from_call(lambda: None, when=when)  # type: ignore
            report = item.ihook.pytest_runtest_makereport(item=item, call=call)
            item.ihook.pytest_runtest_logreport(report=report)

    def stop(self) -> None:
        if self.child is not None:
            child, self.child = self.child, None
            deadline = dl.seconds_for(self.config, None)
            child.stop(60.0 if deadline is None else deadline)


def _phase(phases: List[str]) -> str:
    """The phase running after the reported ones (a setup that did not pass counts as its call:
    pytest goes on to teardown)."""
    if not phases:
        return "setup"
    return {"setup": "call", "call": "teardown"}.get(phases[-1], "teardown")


# ----------------------------------------------------------------------------- hooks


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.stash[settings_key].isolate:
        return
    state = get_state(config)
    state.loader = lambda text: probe(config, text)
    state.runs_cases = False
    config.stash[runner_key] = IsolatedRunner(config)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Optional[bool]:
    if forked.in_child():
        forked.run_here(item, nextitem)
        return True
    runner = item.config.stash.get(runner_key, None)
    if runner is None or not dl.is_case(item):
        return None
    return True if runner.run(item, nextitem) else None


def pytest_sessionfinish(session: pytest.Session) -> None:
    runner = session.config.stash.get(runner_key, None)
    if runner is not None:
        runner.stop()


def pytest_unconfigure(config: pytest.Config) -> None:
    runner = config.stash.get(runner_key, None)
    if runner is not None and runner.child is not None:
        runner.child.end()
        runner.child = None
