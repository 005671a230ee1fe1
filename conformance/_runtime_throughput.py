"""Machinery of the runtime throughput group: timed prefill and generation at a depth.

``measure`` fills the context (untimed) so that the timed work ends at the depth, then
times each repeat's prefill of a fresh chunk and its greedy generation, and notes what
was wrong with the answers (``Timed.problems``) for the correctness test; ``judge_rate``
records a rate and judges it against its floor only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, List, Tuple

import numpy as np
import pytest

from pytest_longctx.measure.contention import HostShare
from pytest_longctx.measure.metrics import is_top1
from pytest_longctx.measure.stats import Stats

from ._check import call, fail
from ._runtime import positions, prefill, prefill_chunks, prompt, reset

GENERATE = 32  # tokens generated per timed repeat


@dataclass
class Timed:
    """The rates at one depth, from where the timed work started, and what was wrong with
    the answers (judged by the correctness test, not by the rate tests)."""

    start: int
    prefill: Stats
    decode: Stats
    runtime_prefill: float  # positions/s from the runtime's own counters (0: not counted)
    runtime_decode: float
    problems: List[Tuple[str, Any, Any]] = field(default_factory=list)  # (what, measured, expected)
    host: HostShare = HostShare(0.0, 0.0, 1)  # other processes' use while it was timed


def measure(backend, runtime, settings, depth: int, at: str) -> Timed:
    """Repeats of a timed prefill of fresh tokens then a timed generation, ending at ``depth``."""
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
            problems.append((f"generate({GENERATE}) of repeat {r}", f"{len(generated)} tokens {generated[:4]}...",
                             f"{GENERATE} token ids below vocab_size {runtime.vocab_size}"))
        elif logits is not None and not is_top1(logits, int(generated[0])):
            problems.append((f"first generated token of repeat {r}", int(generated[0]),
                             f"the arg-max {int(np.argmax(logits))} of the logits before it (greedy)"))
    after = call("stats()", runtime.stats)
    held = positions(runtime)
    if held != depth:
        problems.append(("positions() after the timed work", held, depth))
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


def judge_rate(what, stats, runtime_rate, floor, unit, result, depth, measure_, at, tagged, contended_cores):
    """Record a rate and fail it below its floor; a miss on a contended host is skipped, not judged."""
    __tracebackhide__ = True
    slow = floor is not None and stats.median < floor
    passed = not slow
    judged = not (slow and result.host.contended(contended_cores))
    measure_.record(what, stats.median, unit, **tagged, bound=f">= {floor:.4g}" if floor else "", passed=passed,
                    host=result.host.as_dict(), judged=judged,
                    cell=f"{stats.median:.4g} {unit} ±{stats.spread:.0%}", stats=stats.as_dict(),
                    from_positions=result.start, runtime_counted=runtime_rate, threshold=floor)
    if slow:
        if not judged:  # other processes took the host: the figure says nothing of the runtime
            pytest.skip(f"{what} at depth {result.start}..{depth}={stats.median:.4g} {unit}, below {floor:.4g} "
                        f"{unit}, measured while {result.host.describe()}: not judged on a contended host [{at}]")
        fail(f"{what} at depth {result.start}..{depth}", f"{stats.median:.4g} {unit}", f">= {floor:.4g} {unit}", at)
