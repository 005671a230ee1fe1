"""What a backend may raise: its own failure, or the run's control flow.

Vendor code raises anything: ``Exception`` subclasses, ``SystemExit`` from a
wrapper that calls ``exit()``, ``BaseException`` subclasses of its own. All of
those fail the case with a one-line diagnosis. Only the run's own control flow
passes through: Ctrl-C, a generator being closed, and pytest's outcomes (skip,
fail, exit; the deadline's failure is one), so that the guards never swallow
an interrupt or a verdict already given.
"""

from __future__ import annotations

from typing import Tuple, Type

import pytest

RUN_CONTROL: Tuple[Type[BaseException], ...] = (
    KeyboardInterrupt,
    GeneratorExit,
    pytest.fail.Exception,
    pytest.skip.Exception,
    pytest.xfail.Exception,
    pytest.exit.Exception,
)


def is_run_control(exc: BaseException) -> bool:
    """True for what must propagate: never a backend's failure."""
    return isinstance(exc, RUN_CONTROL)


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (the first line of a multi-line message)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    more = " …" if len(text) > 1 else ""
    return f"{type(exc).__name__}: {first}{more}" if first else type(exc).__name__
