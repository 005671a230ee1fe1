"""KV memory: does the cache use what the analytic size says it should, no more?

Requirements, one test each:
- filled to max_positions, the cache holds at most kv_bytes(max_positions) × (1 +
  ``--longctx-memory-allowance``) + a fixed 16 MiB (``Settings.memory_slack``: working memory, rope
  tables, scratch buffers);
- from the first checkpoint to each later one (every certified length and every quarter
  of the way) a growing cache grows by at most the KV it gained × (1 + allowance), and a
  preallocated one stays flat within the allowance, each up to what the observer cannot
  resolve (``measure.memory.PROBE_SLACK``): fixed working memory cancels out there, so a cache
  that keeps 1.5× its KV fails at any size, one that allocates twice its need either way;
- after close(), what opening and filling took comes back within analytic × allowance +
  slack: a backend that leaks fails.

Measured is device memory for device backends; for host backends what the process
allocated (tracemalloc, which counts allocations even before their pages are touched,
and RSS for native allocations, after the C allocator has given its free pages back);
each figure names the observer that made it. The fill is shared with the limits group
(``conftest.filled``).
"""

from __future__ import annotations

import pytest

from pytest_longctx.measure.memory import MemoryProbe, release_free_memory
from pytest_longctx.measure.units import format_bytes

from ._check import call, case, fail

pytestmark = pytest.mark.longctx_memory


def bound(settings, spec, positions: int) -> int:
    return int(spec.kv_bytes(positions) * (1 + settings.memory_allowance)) + settings.memory_slack


def test_memory_within_analytic_bound(longctx_backend, longctx_settings, longctx_measure, filled):
    filled.usable()
    spec = filled.cache.spec
    where = case(longctx_backend, spec)
    if filled.fill.error:
        fail("filling to max_positions", filled.fill.error, "no error", where)
    seen = filled.held[spec.max_positions]
    held = seen.bytes
    analytic = spec.kv_bytes(spec.max_positions)
    allowed = bound(longctx_settings, spec, spec.max_positions)
    passed = held <= allowed
    longctx_measure.record(
        "KV memory / analytic", held / analytic, "x", bound=f"<= {allowed / analytic:.3f}", passed=passed,
        cell=f"{format_bytes(held)} ({held / analytic:.3f}x, {seen.probe})", measured_bytes=held,
        analytic_bytes=analytic, bound_bytes=allowed, peak_bytes=filled.peak, threshold=allowed / analytic,
        probe=seen.probe,
    )
    if not passed:
        fail(f"KV memory after {spec.max_positions} positions ({seen.probe})",
             f"{format_bytes(held)} ({held / analytic:.3f}x analytic)",
             f"<= {format_bytes(allowed)} (analytic {format_bytes(analytic)} x "
             f"{1 + longctx_settings.memory_allowance:.2f} + {format_bytes(longctx_settings.memory_slack)} "
             "working memory)", where)


def test_memory_grows_linearly_or_stays_flat(longctx_backend, longctx_settings, longctx_measure, filled):
    """From the first checkpoint on: flat if preallocated, else no more than the KV gained."""
    filled.usable()
    spec = filled.cache.spec
    where = case(longctx_backend, spec)
    if filled.fill.error:
        fail("filling to max_positions", filled.fill.error, "no error", where)
    capacity = spec.kv_bytes(spec.max_positions)
    at_open = filled.at_open.bytes
    preallocated = at_open >= 0.9 * capacity
    allowance = longctx_settings.memory_allowance
    problems = []
    steps = list(filled.held.items())
    start, first = steps[0]  # fixed working memory is in every figure: judged from the first on
    for target, seen in steps[1:]:
        grew = seen.bytes - first.bytes
        gained = spec.kv_bytes(target) - spec.kv_bytes(start)
        slack = max(first.slack, seen.slack)  # what the observers cannot resolve
        if preallocated:
            allowed = int(allowance * capacity) + slack
            shape = f"flat (preallocated at open: {format_bytes(at_open)}), <= {format_bytes(allowed)}"
        else:
            allowed = int(gained * (1 + allowance)) + slack
            shape = f"<= {format_bytes(allowed)} ({format_bytes(gained)} of KV gained)"
        if grew > allowed:
            problems.append((grew - allowed, f"KV memory growth from {start} to {target} positions ({seen.probe})",
                             f"+{format_bytes(grew)}", shape))
    kind = "preallocated" if preallocated else "growing"
    longctx_measure.record("KV memory growth", len(steps), "checkpoints", bound="linear or flat",
                           passed=not problems, cell=f"{kind}, {len(steps)} checkpoints ok"
                           if not problems else f"{kind}: {len(problems)} of {len(steps) - 1} steps over")
    if problems:
        _, what, grew, expected = max(problems)  # the step furthest over its bound
        others = f" (the worst of {len(problems)} steps over)" if len(problems) > 1 else ""
        fail(what, grew + others, expected, where)


def test_memory_is_returned_after_close(longctx_backend, longctx_settings, longctx_measure, filled):
    """close() gives back what opening and filling the cache took.

    Kept = (memory once filled − memory before open) − (memory before close −
    memory after close), measured where the cache lives (RSS for host backends,
    ``memory_in_use()`` for devices), after garbage collection and the C
    allocator's trim; bound: the KV bound's allowance, analytic × allowance + slack.
    Comparing what close() gave back with what the fill took, rather than memory
    now with memory then, leaves out what the tests in between allocated. Last of
    the tests that read the shared fill: it closes the cache.
    """
    filled.usable()
    spec = filled.cache.spec
    where = case(longctx_backend, spec)
    if filled.fill.error:
        fail("filling to max_positions", filled.fill.error, "no error", where)
    probe = MemoryProbe(longctx_backend)
    before_close = probe.sample()
    filled.closed = True
    call("close()", filled.cache.close)
    release_free_memory()
    after_close = probe.sample()
    device = filled.before.device is not None and after_close.device is not None
    observed = "device memory" if device else "RSS"

    def at(sample):
        return sample.device if device else sample.rss

    took = at(filled.after_fill) - at(filled.before)
    returned = at(before_close) - at(after_close)
    kept = max(0, took - returned)
    analytic = spec.kv_bytes(spec.max_positions)
    allowed = int(analytic * longctx_settings.memory_allowance) + longctx_settings.memory_slack
    passed = kept <= allowed
    longctx_measure.record(
        "memory after close", kept, "bytes", bound=f"<= {format_bytes(allowed)}", passed=passed,
        cell=f"{format_bytes(kept)} kept of {format_bytes(took)}", kept_bytes=kept, took_bytes=took,
        returned_bytes=returned, bound_bytes=allowed, threshold=allowed, observed=observed,
    )
    if not passed:
        fail(f"memory kept after close() ({observed})", f"{format_bytes(kept)} of the {format_bytes(took)} the fill "
             f"took", f"<= {format_bytes(allowed)} (analytic {format_bytes(analytic)} x "
             f"{longctx_settings.memory_allowance:.2f} + {format_bytes(longctx_settings.memory_slack)}): "
             "the backend leaks", where)
