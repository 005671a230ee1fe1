"""Context limits: does the backend hold exactly the context it claims, refuse one
position more loudly, and lose nothing when it refuses?

Requirements, one test each:
- a cache of max_positions N takes N positions in every layer, and windows read at its
  start, middle and end give back the V appended there;
- one position more raises ContextLimitExceeded, leaving the length and every stored
  value as they were (a ring buffer that overwrites position 0 is named as such);
- a chunk that would cross N is rejected whole (never half-applied), nothing of it leaks
  into the cache, and the positions that fit are then taken;
- each layer keeps its own length (a length shared across layers fails).

Tolerance: read-back V against what was appended, by the equivalence criterion
(``_check.equivalence``: ``--longctx-error-factor`` x a plain store in the cache's
dtype, plus the float32 rounding floor); lengths and refusals are exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_longctx import ContextLimitExceeded
from pytest_longctx.access.guard import guarded
from pytest_longctx.reference import roundtrip
from pytest_longctx.session.fixtures import opened

from pytest_longctx.measure.workloads import Fill, fill, native_pool

from ._check import call, case, equivalence, fail, read

pytestmark = pytest.mark.longctx_limits

WINDOW = 64  # positions read back at the start, middle and end of the cache


def windows(n: int) -> list[tuple[int, int]]:
    w = min(WINDOW, n)
    mid = max(0, n // 2 - w // 2)
    return sorted({(0, w), (mid, mid + w), (n - w, n)})


def check_holds(backend, cache, record: Fill, layer: int, factor: float, where: str) -> None:
    """Every sampled window reads back the V that was appended there."""
    __tracebackhide__ = True
    spec = cache.spec
    for start, stop in windows(record.length):
        _, v = read(backend, cache, layer, start, stop)
        _, expected = record.values(backend, layer, start, stop)
        verdict = equivalence(v, expected, roundtrip(expected, spec.kv_dtype), factor)
        if not verdict.passed:
            fail(f"V of layer {layer} at positions {start}..{stop - 1}: max|error|", f"{verdict.error:.3g}",
                 f"<= {verdict.allowed:.3g}: the cache dropped or overwrote positions it should hold", where)


def test_fills_to_exactly_max_positions_in_every_layer(longctx_backend, longctx_settings, filled):
    filled.usable()
    cache, record = filled.cache, filled.fill
    spec = cache.spec
    where = case(longctx_backend, spec)
    if record.error:
        fail("filling to max_positions", record.error, f"no error below {spec.max_positions} positions", where)
    lengths = [call(f"length({layer})", cache.length, layer) for layer in range(spec.n_layers)]
    wrong = {layer: n for layer, n in enumerate(lengths) if n != spec.max_positions}
    if wrong:
        fail("length after filling", f"{wrong} (layer: length)", f"{spec.max_positions} in every layer", where)
    for layer in sorted({0, spec.n_layers - 1}):
        check_holds(longctx_backend, cache, record, layer, longctx_settings.error_factor, where)


def test_one_more_position_raises_and_changes_nothing(longctx_backend, longctx_settings, longctx_kv_dtype,
                                                      longctx_positions, longctx_inputs):
    spec = longctx_settings.spec_for(longctx_kv_dtype, longctx_positions)
    where = case(longctx_backend, spec)
    layer = spec.n_layers - 1
    pool = call("asarray (input pool)", native_pool, longctx_backend, longctx_inputs, spec,
                min(spec.max_positions, 4096))
    with opened(longctx_backend, spec, working_bytes=pool.nbytes * 3) as cache:
        record = fill(cache, pool, range(layer, layer + 1), spec.max_positions,
                      min(longctx_settings.chunk, pool.k.shape[0]))
        if record.error:
            fail(f"filling layer {layer} to max_positions", record.error, "no error", where)
        before = {w: read(longctx_backend, cache, layer, *w) for w in windows(spec.max_positions)}
        k, v = (call("asarray", longctx_backend.asarray, x) for x in longctx_inputs.kv(1, spec))
        try:
            with guarded("append at max_positions", "ContextLimitExceeded", where, let=(ContextLimitExceeded,)):
                cache.append(layer, k, v)
        except ContextLimitExceeded:
            pass
        else:
            length = call("length", cache.length, layer)
            first = windows(spec.max_positions)[0]
            first_k, _ = read(longctx_backend, cache, layer, 0, 1)
            wrapped = not np.array_equal(first_k, before[first][0][:1])
            detail = "; position 0 was overwritten: the cache wraps around (ring buffer)" if wrapped else ""
            fail("append of 1 position at max_positions", f"accepted (length now {length}){detail}",
                 "a ContextLimitExceeded error", where)
        length = call("length", cache.length, layer)
        if length != spec.max_positions:
            fail("length after the refused append", length, spec.max_positions, where)
        for (start, stop), (k0, v0) in before.items():
            k1, v1 = read(longctx_backend, cache, layer, start, stop)
            if not (np.array_equal(k0, k1) and np.array_equal(v0, v1)):
                fail(f"positions {start}..{stop - 1} after the refused append", "changed", "unchanged", where)


def test_chunk_crossing_the_limit_is_rejected_whole(longctx_backend, longctx_settings, longctx_kv_dtype,
                                                     longctx_positions, longctx_inputs):
    spec = longctx_settings.spec_for(longctx_kv_dtype, longctx_positions)
    if spec.max_positions < 2:
        pytest.skip("a chunk cannot cross a limit of 1 position")
    chunk = min(longctx_settings.chunk, spec.max_positions)
    held = spec.max_positions - chunk // 2
    where = case(longctx_backend, spec)
    pool = call("asarray (input pool)", native_pool, longctx_backend, longctx_inputs, spec, min(held, 4096))
    with opened(longctx_backend, spec) as cache:
        record = fill(cache, pool, range(1), held, chunk)
        if record.error:
            fail(f"filling layer 0 to {held} positions", record.error, "no error", where)
        tail = (max(0, held - WINDOW), held)
        before = read(longctx_backend, cache, 0, *tail)
        k, v = (call("asarray", longctx_backend.asarray, x) for x in longctx_inputs.kv(chunk, spec))
        try:
            with guarded(f"append of {chunk} positions to {held} held", "ContextLimitExceeded", where,
                         let=(ContextLimitExceeded,)):
                cache.append(0, k, v)
        except ContextLimitExceeded:
            pass
        else:
            fail(f"append of {chunk} positions to {held} held", "accepted",
                 f"rejected: it would pass max_positions={spec.max_positions}", where)
        length = call("length", cache.length, 0)
        if length != held:
            fail("length after the rejected chunk", length,
                 f"{held}: {length - held} of its {chunk} positions were applied (half-applied chunk)", where)
        after = read(longctx_backend, cache, 0, *tail)
        if not all(np.array_equal(a, b) for a, b in zip(before, after)):
            fail(f"positions {tail[0]}..{tail[1] - 1} after the rejected chunk", "changed", "unchanged", where)
        rest = spec.max_positions - held
        k, v = longctx_inputs.kv(rest, spec)
        call(f"append of the {rest} positions that fit", lambda: cache.append(
            0, longctx_backend.asarray(k), longctx_backend.asarray(v)))
        _, stored_v = read(longctx_backend, cache, 0, held, spec.max_positions)
        expected = v.astype(np.float64)
        verdict = equivalence(stored_v, expected, roundtrip(expected, spec.kv_dtype), longctx_settings.error_factor)
        if not verdict.passed:
            fail(f"V at positions {held}..{spec.max_positions - 1}: max|error|", f"{verdict.error:.3g}",
                 f"<= {verdict.allowed:.3g}: values of the rejected chunk leaked into the cache", where)


def test_lengths_are_tracked_per_layer(longctx_backend, longctx_settings, longctx_kv_dtype,
                                       longctx_positions, longctx_inputs):
    """Different amounts appended to the first, second, middle and last layer; every other
    layer must still report 0 (a length shared across layers fails)."""
    spec = longctx_settings.spec_for(longctx_kv_dtype, longctx_positions)
    where = case(longctx_backend, spec)
    touched = sorted({0, 1 % spec.n_layers, spec.n_layers // 2, spec.n_layers - 1})
    expected = {layer: 0 for layer in range(spec.n_layers)}
    expected.update({layer: min(spec.max_positions, 3 * (i + 1)) for i, layer in enumerate(touched)})
    with opened(longctx_backend, spec) as cache:
        for layer in touched:
            k, v = longctx_inputs.kv(expected[layer], spec)
            call(f"append({layer}, {expected[layer]} positions)", lambda: cache.append(
                layer, longctx_backend.asarray(k), longctx_backend.asarray(v)))
        lengths = {layer: call(f"length({layer})", cache.length, layer) for layer in expected}
        if lengths != expected:
            wrong = {layer: n for layer, n in lengths.items() if n != expected[layer]}
            fail("per-layer lengths", wrong, {layer: expected[layer] for layer in wrong}, where)
