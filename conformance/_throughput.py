"""Machinery of the throughput group: floors judged against contention, timed decode attention.

The tests in ``test_throughput`` state the requirements; what they need to judge them
(a rate and its floor, a fraction of the probed bandwidth, a host other processes took,
timed outputs drawn at random for the reference) lives here. Decode attention is timed
once per case (``time_decode``) and judged by three tests: its rate, whether a repeated
query is answered from a cache, and whether its timed outputs are right.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, List

import numpy as np
import pytest

from pytest_longctx.measure.contention import HostMeter, HostShare
from pytest_longctx.measure.inputs import Inputs
from pytest_longctx.measure.stats import Stats
from pytest_longctx.measure.workloads import fill_traffic, time_conversion, time_decode_attention, time_repeated_input
from pytest_longctx.reference import apply_rope, roundtrip, stored_k_variants, stored_v

from ._check import call, case, equivalence, fail, guarded, host, judge_attention, read, verdict_line

SAMPLED_ATTENDS = 2  # timed attend outputs checked against the reference (TEST01)
PROBE_PAIRS = 9  # fresh/repeated/fresh triplets of the memorisation probe (TEST04); a second round confirms
CONVERSIONS = 5  # timed attend results converted after timing, to detect deferred work
# A timed result may take at most this share of a timed call's seconds more to convert than a
# materialized one: a correct result converts in microseconds, a deferred one costs the whole call.
DEFERRED_SHARE = 0.5


def ready(backend, run, what):
    """The filled cache of the case, its fill record and the case text; a failed fill fails."""
    __tracebackhide__ = True
    cache, filled, _ = run
    if filled.fill.error:
        fail(what, filled.fill.error, "no error while filling", case(backend, cache.spec))
    return cache, filled, case(backend, cache.spec)


def check_floor(what, rate, unit, floor, where, share, settings):
    __tracebackhide__ = True
    if floor is not None and rate < floor:
        not_judged_if_contended(what, f"{rate:.4g} {unit}", f">= {floor:.4g} {unit}", share, settings, where)
        fail(what, f"{rate:.4g} {unit}", f">= {floor:.4g} {unit}", where)


def check_fraction(what, fraction, floor, of, where, share, settings):
    """A figure as a fraction of the probed bandwidth (the roofline) against its floor."""
    __tracebackhide__ = True
    if floor is not None and fraction < floor:
        what = f"{what} as a fraction of {of} bandwidth"
        not_judged_if_contended(what, f"{fraction:.1%}", f">= {floor:.1%}", share, settings, where)
        fail(what, f"{fraction:.1%}", f">= {floor:.1%}", where)


def not_judged_if_contended(what, measured, expected, share: HostShare, settings, where):
    """A floor missed while other processes took the host says nothing about the backend
    (``pytest_longctx.measure.contention``): the case is skipped with its figure, so the certificate
    holds the floor as not shown."""
    __tracebackhide__ = True
    if share.contended(settings.contended_cores):
        pytest.skip(f"{what}={measured}, below {expected}, measured while {share.describe()}: "
                    f"not judged on a contended host [{where}]")


def judged(passed, share: HostShare, settings) -> dict:
    """What a figure's record says of the host: the contention, and whether a miss was judged."""
    return {"host": share.as_dict(), "judged": passed or not share.contended(settings.contended_cores)}


def passes(rate, floor, fraction, fraction_floor):
    return (floor is None or rate >= floor) and (fraction_floor is None or fraction >= fraction_floor)


def bound(floor, unit, fraction_floor, of):
    parts = ([f">= {floor:.4g} {unit}"] if floor is not None else []) + (
        [f">= {fraction_floor:.0%} of {of}"] if fraction_floor is not None else [])
    return " and ".join(parts)


def judge_fill(what, check, positions_per_step, seconds, settings, measure, spec, bandwidth, where, share,
               fraction_floor=None, open_seconds=None):
    """Positions/s of timed fill steps against the fill floor, also as a fraction of copy bandwidth."""
    __tracebackhide__ = True
    stats = Stats.of([positions_per_step / s for s in seconds])
    gbps = stats.median * fill_traffic(spec) / 1e9
    fraction = gbps / bandwidth.copy_gbps
    floor = settings.whole_cache_floor(settings.fill_floor, spec.max_positions)
    passed = passes(stats.median, floor, fraction, fraction_floor)
    measure.record(
        check, stats.median, "pos/s", bound=bound(floor, "pos/s", fraction_floor, "copy"), passed=passed,
        **judged(passed, share, settings),
        cell=f"{stats.median:.4g} pos/s {gbps:.2f} GB/s ({fraction:.0%} copy)"
             + ("" if open_seconds is None else f"; open {open_seconds:.2f} s"),
        gbps=gbps, fraction_of_copy=fraction, spread=stats.spread, threshold=floor,
        fraction_threshold=fraction_floor, copy_gbps=bandwidth.copy_gbps, read_gbps=bandwidth.read_gbps,
        bytes_per_position=fill_traffic(spec), open_seconds=open_seconds,
    )
    check_floor(what, stats.median, "positions/s", floor, where, share, settings)
    check_fraction(what, fraction, fraction_floor, "copy", where, share, settings)


def check_sampled_reads(backend, cache, filled, samples, factor, where):
    """Timed single-position reads drawn at random (MLPerf TEST01): K and V the same as an
    untimed read of that position gives, and V what the timed fill appended there. How
    precisely K is rotated is the equivalence group's verdict, not asked again here."""
    __tracebackhide__ = True
    spec = filled.fill.spec
    shape = (1, spec.n_kv_heads, spec.head_dim)
    for layer, position, result in samples:
        what = f"timed read of layer {layer} at position {position}"
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"{what} result", type(result).__name__, "a (K, V) pair", where)
        timed_kv = [host(backend, x, f"{what}: {name}", shape, where) for x, name in zip(result, "KV")]
        untimed_kv = read(backend, cache, layer, position, position + 1)
        for name, got, again in zip("KV", timed_kv, untimed_kv):
            if not np.array_equal(got, again, equal_nan=True):
                fail(f"{what}: {name} max|diff| from an untimed read of it",
                     f"{np.nanmax(np.abs(got - again)):.3g}", "0: the same stored values (MLPerf TEST01)", where)
        _, v_in = filled.fill.values(backend, layer, position, position + 1)
        verdict = equivalence(timed_kv[1], v_in, roundtrip(v_in, spec.kv_dtype), factor)
        if not verdict.passed:
            pytest.fail(verdict_line(verdict, f"{what}: V", where), pytrace=False)


@dataclass
class DecodeTimed:
    """Decode attention timed once for the case's three tests, and how it went.

    ``rng`` continues from the draw of the probe's layer: the correctness test draws the
    sampled outputs from it. ``error`` is a failure while timing (the backend raised, or
    returned what cannot be converted), reported by each test as a failure, not an error.
    """

    where: str
    seconds: List[float] = field(default_factory=list)
    calls: List[Any] = field(default_factory=list)
    host_queries: Any = None
    probe_layer: int = 0
    speedup: float = 1.0
    noise: float = 1.0
    pending: List[float] = field(default_factory=list)
    ready: List[float] = field(default_factory=list)
    share: HostShare = HostShare(0.0, 0.0, 1)
    rng: Any = None
    error: str = ""

    def usable(self) -> "DecodeTimed":
        __tracebackhide__ = True
        if self.error:
            pytest.fail(self.error, pytrace=False)
        return self


def time_decode(backend, cache, settings, lock, where: str) -> DecodeTimed:
    """One query per layer at depth max_positions through all layers (repeats tokens), the
    TEST04 probe on a layer drawn at random (measured again when it shows a speed-up), and the
    conversion of the last timed outputs beside a materialized one, all under the timing lock."""
    spec = cache.spec
    n = spec.max_positions
    inputs = Inputs(settings.seed, f"attention-{spec.kv_dtype}-{n}")
    timed = DecodeTimed(where, host_queries=inputs.q(spec.n_layers * (settings.repeats + 1), spec))
    probe_queries = inputs.q(4 * PROBE_PAIRS + 1, spec)
    timed.rng = np.random.default_rng([settings.seed, n])
    timed.probe_layer = int(timed.rng.integers(spec.n_layers))
    meter = HostMeter()
    try:
        with lock.exclusive():
            with guarded("attend", where=where):
                with meter:
                    timed.seconds, timed.calls = time_decode_attention(
                        backend, cache, backend.asarray(timed.host_queries), settings.repeats)
                probe = time_repeated_input(backend, cache, timed.probe_layer,
                                            backend.asarray(probe_queries[:2 * PROBE_PAIRS + 1]), PROBE_PAIRS)
                timed.speedup, timed.noise = probe.speedup(), probe.noise()
                if settings.repeat_speedup is not None and timed.speedup > settings.repeat_speedup:
                    # A noisy machine can fake a speed-up once; a cache of answers shows it every time.
                    again = time_repeated_input(backend, cache, timed.probe_layer, backend.asarray(
                        np.concatenate([probe_queries[:1], probe_queries[2 * PROBE_PAIRS + 1:]])), PROBE_PAIRS)
                    timed.speedup = min(timed.speedup, again.speedup())
                    timed.noise = max(timed.noise, again.noise())
            outputs = [c.output for c in timed.calls[-CONVERSIONS:]]
            shape = (1, spec.n_heads, spec.head_dim)
            timed.pending, timed.ready = call("to_numpy (timed attend results)", time_conversion, backend, outputs,
                                              backend.asarray(np.zeros(shape, np.float32)))
    except pytest.fail.Exception as exc:  # reported by the tests, as failures not errors
        timed.error = str(exc)
    timed.share = meter.share
    return timed


def check_not_deferred(timed: DecodeTimed, tokens: Stats, spec, measure) -> None:
    """A timed output must be ready when its timing ends: else the rate measures nothing."""
    __tracebackhide__ = True
    per_call = statistics.median(timed.seconds) / spec.n_layers
    deferred = statistics.median(timed.pending) - statistics.median(timed.ready)
    if deferred > DEFERRED_SHARE * per_call:
        measure.record(
            "decode attention", tokens.median, "tok/s", bound="results ready when timing ends", passed=False,
            cell=f"{tokens.median:.4g} tok/s UNTRUSTED: deferred work", deferred_seconds=deferred,
            per_call_seconds=per_call,
        )
        fail("to_numpy of a timed attend result",
             f"{deferred * 1e3:.3g} ms more than of a materialized one ({per_call * 1e3:.3g} ms per timed call)",
             f"<= {DEFERRED_SHARE:.0%} of a timed call: deferred work runs after the timed region "
             "(synchronize waits for nothing), so the rate figures measure nothing", timed.where)


def check_sampled_attends(backend, filled, timed: DecodeTimed, factor: float) -> None:
    """Timed attend outputs of one layer drawn at random, against the reference (TEST01).

    One KV head and its query group drawn at random are judged, as the equivalence
    group judges its variants: no head index changes the math, and the float64
    reference of one head costs an n_kv_heads-th of a layer's.
    """
    __tracebackhide__ = True
    spec, rng, where = filled.fill.spec, timed.rng, timed.where
    n, group = spec.max_positions, spec.group_size
    layer, kv_head = int(rng.integers(spec.n_layers)), int(rng.integers(spec.n_kv_heads))
    heads = slice(kv_head * group, (kv_head + 1) * group)
    one = spec.replace(n_kv_heads=1, n_heads=group)
    of_layer = [c for c in timed.calls if c.layer == layer]
    picked = rng.choice(len(of_layer), size=min(SAMPLED_ATTENDS, len(of_layer)), replace=False)
    k, v = (x[:, kv_head:kv_head + 1] for x in filled.fill.values(backend, layer, 0, n))
    positions = np.arange(n)
    k_true, k_plains, v_plain = apply_rope(k, positions, one), stored_k_variants(k, positions, one), stored_v(v, one)
    for index in sorted(int(i) for i in picked):
        timed_call = of_layer[index]
        what = f"timed decode attention of layer {layer}, KV head {kv_head} (token {timed_call.token})"
        got = host(backend, timed_call.output, what, (1, spec.n_heads, spec.head_dim), where)[:, heads]
        q = timed.host_queries[timed_call.query:timed_call.query + 1, heads]
        verdict = judge_attention(got, q, one, k_true, v, k_plains, v_plain, factor)
        if not verdict.passed:
            pytest.fail(verdict_line(verdict, what, where), pytrace=False)
