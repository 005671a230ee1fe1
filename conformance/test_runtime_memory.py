"""KV memory of a whole-model runtime: does its memory grow by what the analytic KV size
says, no more?

Requirement, one test at each positions value: from the previous depth to this one the
process's peak resident memory (Linux VmHWM, reset at the start of each stretch) grows by
at most kv_bytes(positions added) × (1 + ``--longctx-memory-allowance``) +
the fixed 16 MiB ``Settings.memory_slack``. A runtime that allocates its whole cache when it is opened
stays flat; one that grows per position grows linearly; one that keeps twice its need,
or leaks a prompt's scratch per call, fails. What the runtime reports as its own peak is
recorded beside it.

The runtime is opened fresh for this module and filled from empty to each positions
value in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import pytest

from pytest_longctx.measure.memory import ProcessPeak
from pytest_longctx.measure.units import format_bytes

from ._check import call, fail
from ._runtime import prefill_chunks, prompt, reset, tags, where

pytestmark = pytest.mark.longctx_memory


@dataclass
class Growth:
    """Peak growth of each stretch, keyed by the depth it ended at."""

    process: Dict[int, int] = field(default_factory=dict)
    reported: Dict[int, Optional[int]] = field(default_factory=dict)
    start: Dict[int, int] = field(default_factory=dict)  # depth the stretch started at
    errors: Dict[int, str] = field(default_factory=dict)  # why a depth was not reached
    reached: int = -1  # depth the runtime holds now; -1: unknown (reset before the next stretch)


@pytest.fixture(scope="module")
def growth(longctx_backend, longctx_runtime, longctx_settings):
    """Fills to each depth asked for, as a stretch from the depth held before: from empty on a
    first call, ascending in a plain run; a shallower depth than the runtime holds (the
    context finder's bisection) starts again from reset()."""
    runtime, settings = longctx_runtime, longctx_settings
    at = where(longctx_backend, runtime, settings)
    depths = [d for d in settings.positions if d <= runtime.context_limit]
    ids = prompt(settings, runtime, max(depths)) if depths else []
    result = Growth()

    def reach(depth: int) -> Growth:
        if depth in result.process or depth in result.errors:
            return result
        if result.reached < 0 or depth < result.reached:
            reset(runtime, at)
            result.reached = 0
        with ProcessPeak() as peak:
            try:
                prefill_chunks(runtime, ids[result.reached:depth], settings.chunk, at)
            except pytest.fail.Exception as exc:
                result.errors[depth], result.reached = str(exc), -1
                return result
            result.process[depth] = peak.growth()
            reported = call("stats()", runtime.stats).peak_memory_bytes
            result.reported[depth] = None if reported is None else max(0, reported - peak.start_rss)
        result.start[depth], result.reached = result.reached, depth
        return result

    return reach


def test_memory_growth_within_kv_bound(longctx_backend, longctx_runtime, longctx_settings, longctx_measure,
                                       longctx_positions, growth):
    runtime, settings = longctx_runtime, longctx_settings
    at = where(longctx_backend, runtime, settings)
    if longctx_positions > runtime.context_limit:
        pytest.skip(f"depth {longctx_positions} is beyond the runtime's context of {runtime.context_limit}: "
                    "not claimed")
    grown = growth(longctx_positions)
    if longctx_positions not in grown.process:
        fail(f"prefill to {longctx_positions} tokens", grown.errors.get(longctx_positions, "not reached"),
             "no error", at)
    start, spec = grown.start[longctx_positions], runtime.kv_spec
    added = longctx_positions - start
    analytic = spec.kv_bytes(added)
    allowed = int(analytic * (1 + settings.memory_allowance)) + settings.memory_slack
    measured = grown.process[longctx_positions]
    reported = grown.reported[longctx_positions]
    passed = measured <= allowed
    longctx_measure.record(
        "peak memory growth / analytic KV", measured / analytic, "x", **tags(runtime, settings), bound=f"<= {allowed / analytic:.3f}",
        passed=passed, cell=f"+{format_bytes(measured)} over {start}..{longctx_positions}",
        measured_bytes=measured, analytic_bytes=analytic, bound_bytes=allowed, from_positions=start,
        runtime_reported_bytes=reported, threshold=allowed / analytic,
    )
    if not passed:
        fail(f"peak memory growth from {start} to {longctx_positions} positions", format_bytes(measured),
             f"<= {format_bytes(allowed)} (analytic KV {format_bytes(analytic)} for {added} positions x "
             f"{1 + settings.memory_allowance:.2f} + {format_bytes(settings.memory_slack)})", at)
