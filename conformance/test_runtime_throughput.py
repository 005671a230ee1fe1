"""Prefill and decode throughput of a whole-model runtime at depth, as llama-bench's
``pp512 @ d4096`` and ``tg128 @ d16384``.

Requirements, one test each, at every positions value d the runtime holds:
- prefill of fresh chunks ending at depth d meets ``--longctx-prefill-floor`` positions/s;
- greedy generation at depth d meets ``--longctx-decode-floor`` tokens/s;
- the timed work is right: every repeat generates the tokens asked for, within the
  vocabulary, the first of them the arg-max of the timed prefill's logits (greedy), and
  the runtime holds d positions afterwards. A fast wrong answer is a correctness failure,
  not a speed: the rate tests judge the rates only.

Floors come from the settings (none by default: the figures are recorded); a floor missed
while other processes took the host is skipped with its figure, not judged.

At each d the context is prefilled (untimed) so that the timed work ends at d: each
repeat prefills one chunk of fresh tokens (timed) and then greedily generates 32 tokens
(timed). Figures are medians over the repeats, with the depth range they cover; the
runtime's own counters from ``stats()`` are recorded beside the wall-clock ones.
"""

from __future__ import annotations

from typing import Dict

import pytest

from pytest_longctx.measure.contention import HostMeter

from ._check import fail
from ._runtime import need_depth, tags, where
from ._runtime_throughput import Timed, judge_rate, measure

pytestmark = pytest.mark.longctx_throughput


@pytest.fixture(scope="module")
def timed(longctx_backend, longctx_runtime, longctx_settings, _longctx_lock):
    """Measurements per depth, taken once for the three tests under the exclusive timing lock."""
    done: Dict[int, Timed] = {}

    def at_depth(depth: int) -> Timed:
        if depth not in done:
            at = where(longctx_backend, longctx_runtime, longctx_settings)
            with _longctx_lock.exclusive(), HostMeter() as meter:
                done[depth] = measure(longctx_backend, longctx_runtime, longctx_settings, depth, at)
            done[depth].host = meter.share
        return done[depth]

    return at_depth


def test_prefill_rate_at_depth(longctx_backend, longctx_runtime, longctx_settings, longctx_measure,
                               longctx_positions, timed):
    need_depth(longctx_runtime, longctx_positions)
    result = timed(longctx_positions)
    judge_rate("prefill", result.prefill, result.runtime_prefill, longctx_settings.prefill_floor, "positions/s",
               result, longctx_positions, longctx_measure, where(longctx_backend, longctx_runtime, longctx_settings),
               tags(longctx_runtime, longctx_settings), longctx_settings.contended_cores)


def test_decode_rate_at_depth(longctx_backend, longctx_runtime, longctx_settings, longctx_measure,
                              longctx_positions, timed):
    need_depth(longctx_runtime, longctx_positions)
    result = timed(longctx_positions)
    judge_rate("decode", result.decode, result.runtime_decode, longctx_settings.decode_floor, "tokens/s",
               result, longctx_positions, longctx_measure, where(longctx_backend, longctx_runtime, longctx_settings),
               tags(longctx_runtime, longctx_settings), longctx_settings.contended_cores)


def test_timed_generation_is_greedy_at_depth(longctx_backend, longctx_runtime, longctx_settings,
                                             longctx_positions, timed):
    """What was timed was right: the tokens asked for, the first the prefill's arg-max."""
    need_depth(longctx_runtime, longctx_positions)
    result = timed(longctx_positions)
    at = where(longctx_backend, longctx_runtime, longctx_settings)
    if result.problems:
        what, measured, expected = result.problems[0]
        more = f" (and {len(result.problems) - 1} more problems)" if len(result.problems) > 1 else ""
        fail(f"{what} at depth {result.start}..{longctx_positions}", f"{measured}{more}", expected, at)
