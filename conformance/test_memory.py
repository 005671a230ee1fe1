"""KV memory: does the cache use what the analytic size says it should, no more?

Measured is device memory for device backends; for host backends what the
process allocated (tracemalloc, which counts allocations even before their
pages are touched, and RSS for native allocations). The bound is
kv_bytes(positions held) × (1 + allowance) + a fixed slack. Across the
positions list a growing cache must grow linearly and a preallocated one stay
flat; a cache that allocates twice its need fails either way. After close(),
what the fill took must come back within the same allowance: a backend that
leaks fails here.
"""

from __future__ import annotations

import pytest

from pytest_longctx.measure import MemoryProbe, format_bytes, release_free_memory

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
    held = filled.held[spec.max_positions]
    analytic = spec.kv_bytes(spec.max_positions)
    allowed = bound(longctx_settings, spec, spec.max_positions)
    passed = held <= allowed
    longctx_measure.record(
        "KV memory / analytic", held / analytic, "x", bound=f"<= {allowed / analytic:.3f}", passed=passed,
        cell=f"{format_bytes(held)} ({held / analytic:.3f}x)", measured_bytes=held, analytic_bytes=analytic,
        bound_bytes=allowed, peak_bytes=filled.peak, threshold=allowed / analytic,
    )
    if not passed:
        fail(f"KV memory after {spec.max_positions} positions", format_bytes(held),
             f"<= {format_bytes(allowed)} (analytic {format_bytes(analytic)} x "
             f"{1 + longctx_settings.memory_allowance:.2f} + {format_bytes(longctx_settings.memory_slack)})", where)


def test_memory_grows_linearly_or_stays_flat(longctx_backend, longctx_settings, longctx_measure, filled):
    """Memory at every positions value on the way to max_positions: flat if preallocated, else linear."""
    filled.usable()
    spec = filled.cache.spec
    where = case(longctx_backend, spec)
    if filled.fill.error:
        fail("filling to max_positions", filled.fill.error, "no error", where)
    capacity = spec.kv_bytes(spec.max_positions)
    slack = longctx_settings.memory_slack
    preallocated = filled.at_open >= 0.9 * capacity
    problems = []
    for target, measured in filled.held.items():
        if preallocated:
            allowed = filled.at_open + longctx_settings.memory_allowance * capacity + slack
            shape = f"flat at {format_bytes(filled.at_open)} (preallocated at open)"
        else:
            allowed = bound(longctx_settings, spec, target)
            shape = f"linear: <= {format_bytes(allowed)} for {target} positions"
        if measured > allowed:
            problems.append(f"{format_bytes(measured)} at {target} positions, but should be {shape}")
    kind = "preallocated" if preallocated else "growing"
    longctx_measure.record("KV memory growth", len(filled.held), "checkpoints", bound="linear or flat",
                           passed=not problems, cell=f"{kind}, {len(filled.held)} checkpoints ok"
                           if not problems else f"{kind}: {len(problems)} over")
    if problems:
        fail("KV memory while filling", "; ".join(problems), "linear growth or flat", where)


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
