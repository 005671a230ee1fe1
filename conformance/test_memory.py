"""KV memory: does the cache use what the analytic size says it should, no more?

Measured is device memory for device backends; for host backends what the
process allocated (tracemalloc, which counts allocations even before their
pages are touched, and RSS for native allocations). The bound is
kv_bytes(positions held) × (1 + allowance) + a fixed slack. Across the
positions list a growing cache must grow linearly and a preallocated one stay
flat; a cache that allocates twice its need fails either way.
"""

from __future__ import annotations

import pytest

from pytest_longctx.fixtures import opened
from pytest_longctx.measure import format_bytes

from pytest_longctx.workloads import fill, native_pool

from ._check import case, fail

pytestmark = pytest.mark.longctx_memory


def bound(settings, spec, positions: int) -> int:
    return int(spec.kv_bytes(positions) * (1 + settings.memory_allowance)) + settings.memory_slack


def test_memory_within_analytic_bound(longctx_backend, longctx_settings, longctx_kv_dtype,
                                      longctx_positions, longctx_inputs, longctx_measure):
    spec = longctx_settings.spec_for(longctx_kv_dtype, longctx_positions)
    where = case(longctx_backend, spec)
    pool = native_pool(longctx_backend, longctx_inputs, spec, min(spec.max_positions, longctx_settings.chunk))
    with longctx_measure.memory() as probe:
        with opened(longctx_backend, spec, working_bytes=pool.k.nbytes * 3) as cache:
            record = fill(cache, pool, range(spec.n_layers), spec.max_positions, pool.k.shape[0])
            held, peak = probe.held(), probe.peak()
    if record.error:
        fail("filling to max_positions", record.error, "no error", where)
    analytic = spec.kv_bytes(spec.max_positions)
    allowed = bound(longctx_settings, spec, spec.max_positions)
    passed = held <= allowed
    longctx_measure.record(
        "KV memory / analytic", held / analytic, "x", bound=f"<= {allowed / analytic:.3f}", passed=passed,
        cell=f"{format_bytes(held)} ({held / analytic:.3f}x)", measured_bytes=held, analytic_bytes=analytic,
        bound_bytes=allowed, peak_bytes=peak,
    )
    if not passed:
        fail(f"KV memory after {spec.max_positions} positions", format_bytes(held),
             f"<= {format_bytes(allowed)} (analytic {format_bytes(analytic)} x "
             f"{1 + longctx_settings.memory_allowance:.2f} + {format_bytes(longctx_settings.memory_slack)})", where)


def test_memory_grows_linearly_or_stays_flat(longctx_backend, longctx_settings, longctx_kv_dtype,
                                             longctx_inputs, longctx_measure):
    """One cache of the largest positions, measured at every positions value while it fills."""
    checkpoints = longctx_settings.positions
    spec = longctx_settings.spec_for(longctx_kv_dtype, max(checkpoints))
    where = case(longctx_backend, spec)
    pool = native_pool(longctx_backend, longctx_inputs, spec, min(spec.max_positions, longctx_settings.chunk))
    slack = longctx_settings.memory_slack
    held = {}
    with longctx_measure.memory() as probe:
        with opened(longctx_backend, spec, working_bytes=pool.k.nbytes * 3) as cache:
            at_open = probe.held()
            filled = 0
            for target in checkpoints:
                record = fill(cache, pool, range(spec.n_layers), target - filled, pool.k.shape[0])
                if record.error:
                    fail(f"filling from {filled} to {target} positions", record.error, "no error", where)
                filled = target
                held[target] = probe.held()
    capacity = spec.kv_bytes(spec.max_positions)
    preallocated = at_open >= 0.9 * capacity
    problems = []
    for target, measured in held.items():
        if preallocated:
            allowed = at_open + longctx_settings.memory_allowance * capacity + slack
            shape = f"flat at {format_bytes(at_open)} (preallocated)"
        else:
            allowed = bound(longctx_settings, spec, target)
            shape = f"linear: <= {format_bytes(allowed)} for {target} positions"
        passed = measured <= allowed
        longctx_measure.record("KV memory growth", measured, "B", bound=shape, passed=passed, positions=target,
                               cell=format_bytes(measured))
        if not passed:
            problems.append(f"{format_bytes(measured)} at {target} positions, but should be {shape}")
    if problems:
        fail("KV memory while filling", "; ".join(problems), "linear growth or flat", where)
