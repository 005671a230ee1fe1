"""Fixtures shared by the suite's modules: one memory-probed fill per case.

Filling a full cache is the dominant cost of a run (its pages must be touched),
so the limits and memory groups read the same fill: a cache of max_positions N
filled to exactly N in every layer, with memory sampled at every positions
value on the way. Nothing mutates it afterwards. Throughput fills its own cache,
untraced, since tracemalloc slows the calls it would time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import pytest

from pytest_longctx import KVCache
from pytest_longctx.access.guard import close_warned
from pytest_longctx.measure.inputs import Inputs
from pytest_longctx.measure.memory import Held, MemoryProbe, MemorySample
from pytest_longctx.measure.workloads import Fill, fill, native_pool
from pytest_longctx.session.fixtures import open_cache

from ._check import call


@dataclass
class FilledCase:
    """A cache filled to max_positions in every layer, what was appended, and its memory.

    ``before``/``after_fill`` are the memory before open() and once filled, for the
    leak check (``test_memory_is_returned_after_close``), which closes the cache: it
    runs after every other test of the case that reads it.
    """

    cache: KVCache
    fill: Fill
    at_open: Held = Held(0, "tracemalloc")
    held: Dict[int, Held] = field(default_factory=dict)  # positions filled -> bytes held, and who saw them
    peak: int = 0
    before: Optional[MemorySample] = None
    after_fill: Optional[MemorySample] = None
    closed: bool = False

    def usable(self) -> None:
        """Skip a test that reads the cache after the leak check closed it (a changed test order)."""
        if self.closed:
            pytest.skip("the shared fill was already closed by the leak check (tests ran out of order)")


@pytest.fixture(scope="session")
def filled(longctx_backend, longctx_kv_dtype, longctx_positions, longctx_settings):
    settings = longctx_settings
    spec = settings.spec_for(longctx_kv_dtype, longctx_positions)
    inputs = Inputs(settings.seed, f"filled-{longctx_kv_dtype}-{longctx_positions}")
    pool = call("asarray (input pool)", native_pool, longctx_backend, inputs, spec, min(spec.max_positions, 4096))
    chunk = min(settings.chunk, pool.k.shape[0])
    # Every certified length below this one and the quarters of this one: a cache that grows
    # faster than it fills shows between checkpoints, not only at the end.
    quarters = {spec.max_positions * q // 4 for q in (1, 2, 3)}
    checkpoints = sorted({p for p in (*settings.positions, *quarters) if 0 < p < spec.max_positions}
                         | {spec.max_positions})
    # The probe ends before the yield: tracemalloc must not stay on for the tests that time calls.
    with MemoryProbe(longctx_backend) as probe:
        cache = open_cache(longctx_backend, spec, working_bytes=pool.nbytes * 3)
        case = FilledCase(cache, Fill(spec), at_open=probe.held_by(), before=probe.baseline)
        for target in checkpoints:
            fill(cache, pool, range(spec.n_layers), target - case.fill.length, chunk, keep=True, into=case.fill)
            if case.fill.error:
                break
            case.held[target] = probe.held_by()
        case.peak = probe.peak()
        case.after_fill = probe.sample()
    try:
        yield case
    finally:
        if not case.closed:
            close_warned(cache, "the cache")
