"""Forked child processes for ``isolate.py``: starting them, waiting on them with a limit,
ending them, and reading what they left (exit status, faulthandler's stacks, output).

The child side lives here too: a child runs the cases its parent names, one after the
other, and sends each report as it is made; pytest's own capture goes on working inside
it. A child gets its own process group, so Ctrl-C reaches the parent only and ending
the group ends whatever the backend started.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import Any, Dict, List, Optional, Tuple

import pytest
from _pytest.runner import runtestprotocol  # what pytest-xdist and pytest-forked run in their children

from ..access.registry import BackendLoadError
from ..errors import BackendUnavailable
from ..session.fixtures import get_state
from . import deadline as dl

POLL_S = 0.2
TAIL_BYTES = 64 << 10
SHOWN_LINES = 12

_child_conn: List[Connection] = []  # set in a forked child: where its reports go


def in_child() -> bool:
    """True in a forked child that runs cases for its parent."""
    return bool(_child_conn)


def run_here(item: pytest.Item, nextitem: Optional[pytest.Item]) -> None:
    """In a child: run the case; the reports go to the parent as they are made."""
    runtestprotocol(item, log=False, nextitem=nextitem)


# ----------------------------------------------------------------------------- output and status


class Output:
    """A child's stdout and stderr, as files the parent reads from where a case began."""

    def __init__(self) -> None:
        self.out = tempfile.TemporaryFile(prefix="longctx-out-")
        self.err = tempfile.TemporaryFile(prefix="longctx-err-")

    def mark(self) -> Tuple[int, int]:
        return os.fstat(self.out.fileno()).st_size, os.fstat(self.err.fileno()).st_size

    def since(self, mark: Tuple[int, int]) -> Tuple[str, str]:
        return tuple(_tail(f.fileno(), start) for f, start in zip((self.out, self.err), mark))  # type: ignore

    def redirect(self) -> None:
        """In a loading child: file descriptors 1 and 2 and Python's streams go to the files."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.out.fileno(), 1)
        os.dup2(self.err.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        self.stacks()

    def stacks(self) -> None:
        """In a child: a fatal signal, or SIGUSR1 from the parent, writes every thread's stack here."""
        faulthandler.enable(file=self.err, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=self.err, all_threads=True, chain=False)

    def close(self) -> None:
        self.out.close()
        self.err.close()


def _tail(fd: int, start: int) -> str:
    end = os.fstat(fd).st_size
    start = max(start, end - TAIL_BYTES)
    return os.pread(fd, max(0, end - start), start).decode("utf-8", "replace") if end > start else ""


def ended(status: int) -> str:
    """How a process ended, from its wait status: "killed by SIGSEGV (signal 11)"."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name} (signal {number})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended (wait status {status})"


def stack(err: str, thread: Optional[int]) -> List[str]:
    """The frames of ``thread`` (innermost first) in the last faulthandler dump of ``err``."""
    lines = err.splitlines()
    wanted = f"0x{thread:016x}" if thread is not None else None
    heads = [i for i, line in enumerate(lines) if (line.startswith("Thread 0x") or line.startswith("Current thread 0x"))
             and (wanted is None or wanted in line)]
    if not heads:
        return []
    frames = []
    for line in lines[heads[-1] + 1:]:
        if not line.startswith("  File ") or any(part in line for part in _RUNNER_PATHS):
            break  # pytest's and pluggy's frames say nothing about the backend
        frames.append(line.strip())
    return frames


_RUNNER_PATHS = (f"{os.sep}_pytest{os.sep}", f"{os.sep}pluggy{os.sep}")


def last_output(out: str, err: str, thread: Optional[int]) -> List[str]:
    """What to show of a dead or hung child: a fatal error and its stack, else the last lines."""
    lines = err.splitlines()
    fatal = [line for line in lines if line.startswith("Fatal Python error")]
    frames = stack(err, thread)
    if fatal or frames:
        return (fatal[-1:] + frames)[:SHOWN_LINES]
    text = err if err.strip() else out
    return [line for line in text.splitlines() if line.strip()][-SHOWN_LINES:]


def captured(config: pytest.Config) -> List[str]:
    """The last lines the dead child wrote while pytest captured its output (fd capture: the
    capture files are shared with the parent across the fork)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return []
    try:
        out, err = capman.read_global_capture()
    except Exception:  # noqa: BLE001 - capture already stopped or not readable: nothing to show
        return []
    return [line for line in (str(err) + "\n" + str(out)).splitlines() if line.strip()][-SHOWN_LINES:]


def indented(title: str, lines: List[str]) -> str:
    return f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            return
        except (ProcessLookupError, PermissionError):
            continue


def fork_child() -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first
        except OSError:
            pass
    else:
        try:
            os.setpgid(0, 0)  # its own group: Ctrl-C reaches the parent only, which ends the child
        except OSError:
            pass
    return pid


# ----------------------------------------------------------------------------- waiting


def portable(exc: BaseException) -> BaseException:
    """The exception as the parent can unpickle it, else a load error with its text."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if isinstance(copy, BaseException) and str(copy) == str(exc):
            return copy
    except Exception:  # noqa: BLE001 - any exception that does not travel is replaced
        pass
    kind = BackendUnavailable if isinstance(exc, BackendUnavailable) else BackendLoadError
    return kind(f"{type(exc).__name__}: {exc}")


def wait_one(conn: Connection, pid: int, limit: Optional[float]) -> Optional[Tuple[Any, ...]]:
    """One message from a child; ("ended",) if it ended first; None if it gave none within
    ``limit`` seconds."""
    started = time.monotonic()
    while limit is None or time.monotonic() - started < limit:
        if conn.poll(POLL_S):
            try:
                return conn.recv()
            except (EOFError, OSError):
                return ("ended",)
        if not alive(pid):
            try:
                return conn.recv() if conn.poll(0) else ("ended",)
            except (EOFError, OSError):
                return ("ended",)
    return None


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    if done:
        _STATUS[pid] = _
        return False
    return True


_STATUS: Dict[int, int] = {}


def reap(pid: int, timeout: float) -> int:
    """The child's wait status, ending it if it does not exit within ``timeout``."""
    if pid in _STATUS:
        return _STATUS.pop(pid)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return status
        time.sleep(0.02)
    kill_group(pid)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


# ----------------------------------------------------------------------------- the child


class _ChildReporter:
    """Registered in a child only: each report goes to the parent as soon as it is made."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        report = yield
        data = item.config.hook.pytest_report_to_serializable(config=item.config, report=report)
        self.conn.send(("report", data))
        return report


def _child_main(session: pytest.Session, conn: Connection, output: Output) -> int:
    """Run cases as the parent asks, until it says exit."""
    config = session.config
    dl.mark_isolated_child(config)
    state = get_state(config)
    state.loaded = {text: loaded for text, loaded in state.loaded.items() if loaded.error is not None}
    state.loader, state.runs_cases = None, True
    # pytest's capture stays as it was: the phases' output reaches the reports as usual, and in
    # fd mode its files are shared with the parent, which reads them when the child dies.
    output.stacks()
    _child_conn.append(conn)
    config.pluginmanager.register(_ChildReporter(conn), "longctx-isolated-child")
    conn.send(("ready", threading.get_ident()))
    items = session.items
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return 0
        if message[0] == "run":
            item = items[message[1]]
            nextitem = items[message[2]] if message[2] is not None else None
            item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            conn.send(("done", message[1]))
        else:  # exit: tear down what the last case left set up (an interrupted or -x run)
            try:
                session._setupstate.teardown_exact(None)
            finally:
                return 0


@dataclass
class Child:
    """A forked child running cases, seen from the parent."""

    pid: int
    conn: Connection
    output: Output
    thread: Optional[int] = None

    @classmethod
    def start(cls, session: pytest.Session) -> "Child":
        output = Output()
        parent_end, child_end = Pipe()
        pid = fork_child()
        if pid == 0:
            code = 70
            try:
                parent_end.close()
                code = _child_main(session, child_end, output)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        child_end.close()
        child = cls(pid, parent_end, output)
        ready = wait_one(parent_end, pid, 60.0)
        child.thread = ready[1] if ready is not None and ready[0] == "ready" else None  # else: it died, and says so
        return child

    def stop(self, timeout: float) -> None:
        try:
            self.conn.send(("exit",))
        except OSError:
            pass
        reap(self.pid, timeout)
        kill_group(self.pid)  # anything it left in its group
        self.conn.close()
        self.output.close()

    def end(self) -> int:
        """End it now (and its process group); its wait status."""
        kill_group(self.pid)
        status = reap(self.pid, 10)
        self.conn.close()
        return status
