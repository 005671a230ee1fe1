"""The deadline of a case: a backend that gives no answer in time fails it, "no answer in N s".

Every case of the matrix (setup, call and teardown together) gets
``Settings.deadline_for(positions)`` seconds. Where the case runs, a SIGALRM
timer interrupts it at the deadline: the handler raises ``DeadlineExceeded`` (a
pytest failure, so guards let it through), which ends a hang in Python code or
in a system call that returns on a signal (``time.sleep``, libc ``sleep``), and
the run goes on in the same process.

A backend that hung once is not asked again in that run (in that process, under
pytest-xdist): its remaining cases fail at once, naming the case where it hung,
so one hang costs one deadline, not one per case.

What a signal cannot end is native code that never returns to Python (a spin
loop, a futex or mutex wait, a device wait): the handler runs only once the
call returns. Without ``--longctx-isolate`` such a hang keeps the run waiting;
``faulthandler`` then prints every thread's stack to stderr at the deadline plus
a grace period, so the log says where it hangs. With ``--longctx-isolate`` the
parent process ends the child at the deadline plus the same grace (see
``isolate.py``): the case fails and the run goes on.

The timer is armed around the innermost phase hooks only, never while pytest
reports, so that it cannot fire inside pytest's own bookkeeping. It is not
armed where SIGALRM is missing (Windows), off the main thread, or when another
plugin (pytest-timeout's signal method) owns SIGALRM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Dict, Optional

import pytest

from ..session.fixtures import get_state
from ..session.options import settings_key
from ..session.settings import AUTO, AUTO_DEADLINE_FLOOR_S, AUTO_DEADLINE_MARGIN

started_key = pytest.StashKey[float]()
hung_key = pytest.StashKey[Dict[str, str]]()  # backend text -> the failure line of the case where it hung
_copy_gbps_key = pytest.StashKey[float]()
_stderr_key = pytest.StashKey[int]()
# True in a forked child that runs isolated cases: its parent watches the deadline there.
isolated_child_key = pytest.StashKey[bool]()


class DeadlineExceeded(pytest.fail.Exception):  # type: ignore[misc,name-defined]
    """A case that gave no answer in time; a pytest failure whose message is one line."""


def grace(deadline: float) -> float:
    """How long past the deadline a process is given before it is ended (isolate) or its
    stack is dumped (in process): a Python-level interrupt needs a moment to unwind."""
    return max(2.0, 0.1 * deadline)


def is_case(item: pytest.Item) -> bool:
    return "longctx_backend" in getattr(item, "fixturenames", ())


def copy_gbps(config: pytest.Config) -> Optional[float]:
    """The host's copy bandwidth, measured once per process, for the "auto" deadline."""
    if config.stash[settings_key].deadline != AUTO:
        return None
    if _copy_gbps_key not in config.stash:
        from ..measure.bandwidth import host_bandwidth

        config.stash[_copy_gbps_key] = host_bandwidth(64 << 20, 3).copy_gbps
    return config.stash[_copy_gbps_key]


def seconds_for(config: pytest.Config, positions: Optional[int]) -> Optional[float]:
    """The deadline of a case at ``positions`` (None: the largest), with the measured bandwidth."""
    return config.stash[settings_key].deadline_for(positions, copy_gbps(config))


def deadline_of(item: pytest.Item) -> Optional[float]:
    """Seconds allowed to this case, or None (no deadline, or not a case of the matrix)."""
    if not is_case(item):
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    return seconds_for(item.config, params.get("longctx_positions"))


def backend_of(item: pytest.Item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return str(params.get("longctx_backend", item.config.stash[settings_key].backends[0]))


def record_hang(item: pytest.Item, seconds: float) -> None:
    """Remember that this case's backend gave no answer in ``seconds``: it is not asked again
    in this run, and its later cases name this one."""
    where = f"no answer in {seconds:.3g} s in {item.nodeid.split('::')[-1]}"
    item.config.stash.setdefault(hung_key, {}).setdefault(backend_of(item), where)


def hung_before(item: pytest.Item) -> Optional[str]:
    """The one-line failure of a case whose backend already hung in this run, or None."""
    where = item.config.stash.get(hung_key, {}).get(backend_of(item))
    if where is None:
        return None
    return (f"case=not asked: its backend hung earlier in this run ({where}), but should be a backend "
            f"that answers; a backend that hung is not asked again [{case_of(item)}]")


def case_of(item: pytest.Item) -> str:
    """The case as the suite's failure lines name it: backend, kv dtype, positions, shape."""
    settings = item.config.stash[settings_key]
    params = getattr(getattr(item, "callspec", None), "params", {})
    text = params.get("longctx_backend", settings.backends[0])
    loaded = get_state(item.config).loaded.get(text)
    name = getattr(getattr(loaded, "backend", None), "name", None) or text
    dtype = params.get("longctx_kv_dtype", "")
    positions = params.get("longctx_positions", max(settings.positions))
    return f"{name} {dtype} @ {positions} positions, {settings.shape.describe()}".replace("  ", " ")


def no_answer(item: pytest.Item, seconds: float, phase: str, detail: str = "") -> str:
    """The one-line failure of a case past its deadline: "case call=no answer in 2 s ..."."""
    settings = item.config.stash[settings_key]
    params = getattr(getattr(item, "callspec", None), "params", {})
    positions = params.get("longctx_positions", max(settings.positions))
    scaled = seconds_for(item.config, positions) or 0.0
    detail = f" ({detail})" if detail else ""
    if settings.deadline == AUTO:
        how = (f"auto: {scaled:.3g} s at {positions} positions, {AUTO_DEADLINE_MARGIN:g} x the time to stream "
               f"its float64 KV at {copy_gbps(item.config):.3g} GB/s, at least {AUTO_DEADLINE_FLOOR_S:g} s")
    else:
        how = f"--longctx-deadline={float(settings.deadline):g} s at 16384 positions, {scaled:.3g} s at {positions}"
    return f"case {phase}=no answer in {seconds:.3g} s{detail}, but should finish within its deadline ({how}) [{case_of(item)}]"


def _where(frame: Optional[FrameType]) -> str:
    """Where the case was when interrupted."""
    if frame is None:
        return ""
    return f"interrupted in {frame.f_code.co_name}, {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def _can_arm() -> bool:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGALRM)
    return current in (signal.SIG_DFL, signal.SIG_IGN, None) or getattr(current, "_longctx", False)


def _phase(item: pytest.Item, phase: str) -> Any:
    """Run one phase under the rest of the case's deadline."""
    deadline = deadline_of(item)
    if deadline is None or not _can_arm():
        return (yield)
    if phase == "setup":
        item.stash[started_key] = time.monotonic()
        earlier = hung_before(item)
        if earlier is not None:
            raise DeadlineExceeded(earlier, pytrace=False)
    used = time.monotonic() - item.stash.get(started_key, time.monotonic())
    left = deadline - used
    if phase == "teardown":  # cleanup runs even after an overrun, within the grace
        left = max(left, grace(deadline))
    elif left <= 0:
        raise DeadlineExceeded(no_answer(item, used, phase), pytrace=False)
    given = left if phase == "teardown" else deadline

    def expired(signum: int, frame: Optional[FrameType]) -> None:
        line = no_answer(item, given, phase, _where(frame))
        record_hang(item, given)
        raise DeadlineExceeded(line, pytrace=False)

    expired._longctx = True  # type: ignore[attr-defined]
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    return (yield from _phase(item, "setup"))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    return (yield from _phase(item, "call"))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    return (yield from _phase(item, "teardown"))


# ----------------------------------------------------------------------------- native hangs, in process


def pytest_configure(config: pytest.Config) -> None:
    if config.stash[settings_key].deadline:
        config.stash[_stderr_key] = os.dup(_stderr_fileno())


def _stderr_fileno() -> int:
    """The terminal's stderr, as pytest's faulthandler plugin finds it (sys.stderr may be a
    capture object without a file descriptor, as in pytester's in-process runs)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            fileno = stream.fileno()
            if fileno >= 0:
                return fileno
        except (AttributeError, ValueError, OSError):
            continue
    return 2


def pytest_unconfigure(config: pytest.Config) -> None:
    fd = config.stash.get(_stderr_key, None)
    if fd is not None:
        os.close(fd)
        del config.stash[_stderr_key]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    """Where cases run in this process: dump every thread's stack to stderr if the case is
    still running at the deadline plus grace (a native hang no signal ends). Not in an
    isolated child, whose parent dumps its stack and ends it; not over pytest's own
    ``faulthandler_timeout``, which uses the same single timer."""
    deadline = deadline_of(item)
    fd = item.config.stash.get(_stderr_key, None)
    if (deadline is None or fd is None or item.config.stash.get(isolated_child_key, False) or not get_state(item.config).runs_cases
            or float(item.config.getini("faulthandler_timeout") or 0)):
        return (yield)
    import faulthandler

    faulthandler.dump_traceback_later(deadline + grace(deadline), repeat=False, file=fd)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


def mark_isolated_child(config: pytest.Config) -> None:
    """Called by ``forked.py`` in a forked child: the child's copy of the config says so."""
    config.stash[isolated_child_key] = True
