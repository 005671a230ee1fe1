"""The inter-process lock: timed sections hold it exclusively, every other test shared,
so that pytest-xdist workers never measure against each other; POSIX ``flock``,
a no-op where there is none."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import Dict, Iterator, List, Optional


try:  # POSIX only; elsewhere the lock degrades to a no-op.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _default_lock_path() -> str:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"pytest-longctx-{user}.lock")


class _LockFile:
    """One open lock file per path and process, with a stack of held modes.

    flock locks belong to an open file description, so two descriptors of the
    same file in one process would block each other; sharing one descriptor
    lets a timed (exclusive) section nest inside a shared one. Converting
    between modes is not atomic: another process may run in between.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None
        self.modes: List[int] = []

    def _strongest(self) -> int:
        return fcntl.LOCK_EX if fcntl.LOCK_EX in self.modes else fcntl.LOCK_SH

    def acquire(self, mode: int) -> None:
        before = self._strongest() if self.modes else None
        if self.fd is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self.modes.append(mode)
        after = self._strongest()
        if after != before:
            try:
                fcntl.flock(self.fd, after)
            except BaseException:  # e.g. interrupted while waiting: restore what was held
                self.modes.pop()
                self._settle(None)
                raise

    def release(self) -> None:
        before = self._strongest()
        self.modes.pop()
        self._settle(before)

    def _settle(self, before: Optional[int]) -> None:
        """Drop the file when nothing is held, else hold the strongest mode still wanted."""
        if self.fd is None:
            return
        if not self.modes:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        elif self._strongest() != before:
            fcntl.flock(self.fd, self._strongest())


_LOCK_FILES: Dict[str, _LockFile] = {}
_LOCK_FILES_GUARD = threading.Lock()


def _forget_lock_files() -> None:
    """In a forked child: the inherited descriptors share the parent's locks; drop them."""
    for held in _LOCK_FILES.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _LOCK_FILES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lock_files)


class ExclusiveLock:
    """A reader-writer lock between processes, through ``fcntl.flock`` on a file.

    Timed sections hold it exclusively so that pytest-xdist workers never
    measure against each other; every other test holds it shared, so they run
    in parallel with each other but never during a timing. Re-entrant within
    a process (an exclusive section may nest in a shared one); a no-op where
    ``fcntl`` is missing. Not meant to be shared between threads.
    """

    def __init__(self, path: "Optional[str | os.PathLike[str]]" = None) -> None:
        self.path = os.path.abspath(os.fspath(path) if path is not None else _default_lock_path())

    def _file(self) -> _LockFile:
        with _LOCK_FILES_GUARD:
            held = _LOCK_FILES.get(self.path)
            if held is None:
                held = _LOCK_FILES[self.path] = _LockFile(self.path)
            return held

    @contextlib.contextmanager
    def _hold(self, mode_name: str) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        held = self._file()
        held.acquire(getattr(fcntl, mode_name))
        try:
            yield
        finally:
            held.release()

    def shared(self) -> "contextlib.AbstractContextManager[None]":
        """Held alongside other shared holders; waits while anyone holds it exclusively."""
        return self._hold("LOCK_SH")

    def exclusive(self) -> "contextlib.AbstractContextManager[None]":
        """Held alone; waits until every shared and exclusive holder has left."""
        return self._hold("LOCK_EX")
