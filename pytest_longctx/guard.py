"""Calling a backend: what it may raise, and the one way the suite and the plugin guard a call.

Vendor code raises anything: ``Exception`` subclasses, ``SystemExit`` from a
wrapper that calls ``exit()``, ``BaseException`` subclasses of its own. All of
those fail the case with a one-line diagnosis. Only the run's own control flow
passes through: Ctrl-C, a generator being closed, and pytest's outcomes (skip,
fail, exit; the deadline's failure is one), so that the guards never swallow
an interrupt or a verdict already given.

``captured`` is the one place that decides what is the backend's and what is the
run's; ``guarded`` and ``call`` fail the case with it, ``close_warned`` turns a
failed ``close()`` into a warning. Every failure has one shape,
"{what}={measured}, but should be {expected} [{case}]" (``fail``), or for an
exception "{what} raised {Type: message}[, but should be {expected}] [{case}]".
A child process of ``forked``/``isolate`` keeps its own catch-all: there even
Ctrl-C must end in ``os._exit``, never unwind into the parent's pytest.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple, Type

import pytest

RUN_CONTROL: Tuple[Type[BaseException], ...] = (
    KeyboardInterrupt,
    GeneratorExit,
    pytest.fail.Exception,
    pytest.skip.Exception,
    pytest.xfail.Exception,
    pytest.exit.Exception,
)


class CloseWarning(UserWarning):
    """A backend's ``close()`` raised: not the case's verdict (the memory group judges leaks),
    but never silent, so a leaking or crashing close shows in pytest's warnings summary."""


def is_run_control(exc: BaseException) -> bool:
    """True for what must propagate: never a backend's failure."""
    return isinstance(exc, RUN_CONTROL)


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (the first line of a multi-line message)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    more = " …" if len(text) > 1 else ""
    return f"{type(exc).__name__}: {first}{more}" if first else type(exc).__name__


def fail(what: str, measured: Any, expected: Any, where: str) -> None:
    """Fail the case with one line; raised ``from None``, so that a backend's exception being
    handled is not printed as the failure's context."""
    __tracebackhide__ = True
    raise pytest.fail.Exception(f"{what}={measured}, but should be {expected} [{where}]", pytrace=False) from None


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


@contextlib.contextmanager
def guarded(what: str, expected: str = "", where: str = "",
            let: Tuple[Type[BaseException], ...] = ()) -> Iterator[None]:
    """Fail the case with one line (``raised``) when the block raises; see ``captured``."""
    __tracebackhide__ = True
    with captured(*let) as caught:
        yield
    if caught.error is not None:
        raise pytest.fail.Exception(raised(what, caught.error, expected, where), pytrace=False) from None


def call(what: str, fn: Callable[..., Any], *args: Any, where: str = "") -> Any:
    """``fn(*args)``, its exception a one-line failure naming the call."""
    __tracebackhide__ = True
    with guarded(what, where=where):
        return fn(*args)


def close_warned(resource: Any, what: str) -> None:
    """``resource.close()``; what it raises becomes one CloseWarning line, run control propagates."""
    with captured() as caught:
        resource.close()
    if caught.error is not None:
        warnings.warn(CloseWarning(raised(f"close() of {what}", caught.error)), stacklevel=2)
