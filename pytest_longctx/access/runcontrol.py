"""What a backend may raise, and what is the run's own: the primitive every guard is built on.

Vendor code raises anything: ``Exception`` subclasses, ``SystemExit`` from a
wrapper that calls ``exit()``, ``BaseException`` subclasses of its own. All of
those are the backend's failure. Only the run's own control flow passes
through: Ctrl-C, a generator being closed, and pytest's outcomes (skip, fail,
exit; the deadline's failure is one), so that no guard swallows an interrupt or
a verdict already given. It imports no pytest (``load_backend`` works outside
pytest): an outcome of pytest can only be raised where pytest is loaded.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Type


def is_run_control(exc: BaseException) -> bool:
    """True for what must propagate: never a backend's failure."""
    if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
        return True
    pytest = sys.modules.get("pytest")
    return pytest is not None and isinstance(
        exc, (pytest.fail.Exception, pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception))


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (the first line of a multi-line message)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    more = " …" if len(text) > 1 else ""
    return f"{type(exc).__name__}: {first}{more}" if first else type(exc).__name__


def raised(what: str, exc: BaseException, expected: str = "", where: str = "") -> str:
    """The line for a call that raised: what was called, what it raised, what it should have done."""
    should = f", but should be {expected}" if expected else ""
    case = f" [{where}]" if where else ""
    return f"{what} raised {describe(exc)}{should}{case}"


@dataclass
class Caught:
    """What a ``captured`` block raised that was the backend's (None when it returned)."""

    error: Optional[BaseException] = None


@contextlib.contextmanager
def captured(*let: Type[BaseException]) -> Iterator[Caught]:
    """Run backend code and keep what it raises in ``.error``; run control and the types in
    ``let`` (those the caller handles itself, e.g. ContextLimitExceeded) propagate."""
    caught = Caught()
    try:
        yield caught
    except let:
        raise
    except BaseException as exc:
        if is_run_control(exc):
            raise
        caught.error = exc
