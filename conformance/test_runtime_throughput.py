"""Prefill and decode throughput of a whole-model runtime at depth, as llama-bench's
``pp512 @ d4096`` and ``tg128 @ d16384``.

At each positions value d the context is prefilled (untimed) so that the
timed work ends at d: each repeat prefills one chunk of fresh tokens (timed)
and then greedily generates 32 tokens (timed). Figures are medians over the
repeats, with the depth range they cover; the runtime's own counters from
``stats()`` are recorded beside the wall-clock ones. The first token generated
after each timed prefill must be the arg-max of that prefill's logits: a fast
wrong answer is a failure, not a speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import pytest

from pytest_longctx.contention import HostMeter, HostShare
from pytest_longctx.measure import Stats
from pytest_longctx.metrics import is_top1

from ._check import call, fail
from ._runtime import need_depth, positions, prefill, prefill_chunks, prompt, reset, tags, where

pytestmark = pytest.mark.longctx_throughput

GENERATE = 32  # tokens generated per timed repeat


@dataclass
class Timed:
    start: int
    prefill: Stats
    decode: Stats
    runtime_prefill: float  # positions/s from the runtime's own counters (0: not counted)
    runtime_decode: float
    problems: List[str] = field(default_factory=list)
    host: HostShare = HostShare(0.0, 0.0, 1)  # other processes' use while it was timed


def measure(backend, runtime, settings, depth: int, at: str) -> Timed:
    chunk = min(settings.chunk, depth // 2)
    per_repeat = chunk + GENERATE
    repeats = max(1, min(settings.repeats, (depth // 2) // per_repeat))
    start = depth - repeats * per_repeat
    ids = prompt(settings, runtime, depth)
    reset(runtime, at)
    prefill_chunks(runtime, ids[:start], settings.chunk, at)
    before = call("stats()", runtime.stats)
    prefill_times, decode_times, problems = [], [], []
    fresh = np.random.default_rng([settings.seed, depth]).integers(0, runtime.vocab_size, size=repeats * chunk)
    for r in range(repeats):
        tokens = fresh[r * chunk:(r + 1) * chunk].tolist()
        began = time.perf_counter()
        logits = prefill(runtime, tokens, at)
        prefill_times.append(time.perf_counter() - began)
        began = time.perf_counter()
        generated = call(f"generate({GENERATE})", runtime.generate, GENERATE)
        decode_times.append(time.perf_counter() - began)
        generated = list(generated)
        if len(generated) != GENERATE or not all(0 <= int(t) < runtime.vocab_size for t in generated):
            problems.append(f"generate({GENERATE}) returned {len(generated)} tokens {generated[:4]}...")
        elif logits is not None and not is_top1(logits, int(generated[0])):
            problems.append(f"repeat {r}: first generated token {int(generated[0])} is not the arg-max "
                            f"{int(np.argmax(logits))} of the logits before it (greedy)")
    after = call("stats()", runtime.stats)
    held = positions(runtime)
    if held != depth:
        problems.append(f"positions() after the timed work is {held}, but should be {depth}")
    return Timed(
        start,
        Stats.of([chunk / t for t in prefill_times]),
        Stats.of([GENERATE / t for t in decode_times]),
        _rate(after.prefill_tokens - before.prefill_tokens, after.prefill_seconds - before.prefill_seconds),
        _rate(after.generate_tokens - before.generate_tokens, after.generate_seconds - before.generate_seconds),
        problems,
    )


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if tokens > 0 and seconds > 0 else 0.0


@pytest.fixture(scope="module")
def timed(longctx_backend, longctx_runtime, longctx_settings, _longctx_lock):
    """Measurements per depth, taken once for both tests under the exclusive timing lock."""
    done: Dict[int, Timed] = {}

    def at_depth(depth: int) -> Timed:
        if depth not in done:
            at = where(longctx_backend, longctx_runtime, longctx_settings)
            with _longctx_lock.exclusive(), HostMeter() as meter:
                done[depth] = measure(longctx_backend, longctx_runtime, longctx_settings, depth, at)
            done[depth].host = meter.share
        return done[depth]

    return at_depth


def _judge(what, stats, runtime_rate, floor, unit, result, depth, measure_, at, tagged, contended_cores):
    __tracebackhide__ = True
    passed = not result.problems and (floor is None or stats.median >= floor)
    slow = floor is not None and stats.median < floor
    judged = not (slow and not result.problems and result.host.contended(contended_cores))
    measure_.record(what, stats.median, unit, **tagged, bound=f">= {floor:.4g}" if floor else "", passed=passed,
                    host=result.host.as_dict(), judged=judged,
                    cell=f"{stats.median:.4g} {unit} ±{stats.spread:.0%}", stats=stats.as_dict(),
                    from_positions=result.start, runtime_counted=runtime_rate, threshold=floor)
    if result.problems:
        fail(f"{what} at depth {result.start}..{depth}", "; ".join(result.problems), "none", at)
    if slow:
        if not judged:  # other processes took the host: the figure says nothing of the runtime
            pytest.skip(f"{what} at depth {result.start}..{depth}={stats.median:.4g} {unit}, below {floor:.4g} "
                        f"{unit}, measured while {result.host.describe()}: not judged on a contended host [{at}]")
        fail(f"{what} at depth {result.start}..{depth}", f"{stats.median:.4g} {unit}", f">= {floor:.4g} {unit}", at)


def test_prefill_rate_at_depth(longctx_backend, longctx_runtime, longctx_settings, longctx_measure,
                               longctx_positions, timed):
    need_depth(longctx_runtime, longctx_positions)
    result = timed(longctx_positions)
    _judge("prefill", result.prefill, result.runtime_prefill, longctx_settings.prefill_floor, "positions/s",
           result, longctx_positions, longctx_measure, where(longctx_backend, longctx_runtime, longctx_settings),
           tags(longctx_runtime, longctx_settings), longctx_settings.contended_cores)


def test_decode_rate_at_depth(longctx_backend, longctx_runtime, longctx_settings, longctx_measure,
                              longctx_positions, timed):
    need_depth(longctx_runtime, longctx_positions)
    result = timed(longctx_positions)
    _judge("decode", result.decode, result.runtime_decode, longctx_settings.decode_floor, "tokens/s",
           result, longctx_positions, longctx_measure, where(longctx_backend, longctx_runtime, longctx_settings),
           tags(longctx_runtime, longctx_settings), longctx_settings.contended_cores)
