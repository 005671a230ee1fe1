"""Calling a backend: the one way the suite and the plugin guard a call.

Vendor code raises anything (``SystemExit`` and its own ``BaseException``
subclasses included); all of it fails the case with a one-line diagnosis, and
the run's own control flow passes through (see ``runcontrol``).

``runcontrol.captured`` is the one place that decides what is the backend's and
what is the run's (it imports no pytest: ``load_backend`` works outside pytest);
``guarded`` and ``call`` fail the case with it, ``close_warned`` turns a
failed ``close()`` into a warning. Every failure has one shape,
"{what}={measured}, but should be {expected} [{case}]" (``fail``), or for an
exception "{what} raised {Type: message}[, but should be {expected}] [{case}]".
A child process of ``forked``/``isolate`` keeps its own catch-all: there even
Ctrl-C must end in ``os._exit``, never unwind into the parent's pytest.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Tuple, Type

import pytest

from .runcontrol import captured, raised


class CloseWarning(UserWarning):
    """A backend's ``close()`` raised: not the case's verdict (the memory group judges leaks),
    but never silent, so a leaking or crashing close shows in pytest's warnings summary."""


def fail(what: str, measured: Any, expected: Any, where: str) -> None:
    """Fail the case with one line; raised ``from None``, so that a backend's exception being
    handled is not printed as the failure's context."""
    __tracebackhide__ = True
    raise pytest.fail.Exception(f"{what}={measured}, but should be {expected} [{where}]", pytrace=False) from None


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
