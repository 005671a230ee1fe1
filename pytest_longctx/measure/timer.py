"""The timer: seconds of one call, device work included (synchronized before and after)."""

from __future__ import annotations

import time
from typing import Any, Callable


def timed(fn: Callable[[], Any], synchronize: Callable[[], None]) -> float:
    """Seconds taken by one call of ``fn``, device work included.

    ``synchronize`` runs before the clock starts, so queued work from earlier
    is not billed to ``fn``, and before it stops, so asynchronous device work
    that ``fn`` queued is.
    """
    synchronize()
    start = time.perf_counter_ns()
    fn()
    synchronize()
    return (time.perf_counter_ns() - start) / 1e9
