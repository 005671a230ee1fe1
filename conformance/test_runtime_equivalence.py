"""Output equivalence of a whole-model runtime at long positions: do its logits stay
the same however the prompt is fed, and match a float reference of the same model?

Requirements, one test each, at every positions value d:
- chunked prefill (chunks, then the last 16 tokens one at a time) gives the last logits
  of one-shot prefill of the same d tokens;
- the same prompt after ``reset()`` gives the first run's last logits;
- with ``--longctx-reference-logits``, the last 16 positions match golden logits of a
  float reference run of the same model and tokens.

Tolerances: the consistency bound, a KL divergence of 10 x the noise a correct
llama.cpp shows for the runtime's KV dtype, with the same top-1 token
(``pytest_longctx.measure.consistency``); against the reference, mean KL at most
``--longctx-logits-kl`` and top-1 agreement at least ``--longctx-top1-agreement``.
Chunked prefill that diverges from one-shot prefill (a chunk seen at the wrong
positions, a stale slot) and a reset that leaves state behind are bug classes that
reached users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import pytest

from pytest_longctx.measure.golden import TAIL
from pytest_longctx.measure.metrics import compare_logits
from pytest_longctx.measure.prefill import tail_logits

from ._check import fail
from ._runtime import (
    check_consistent, consistency, golden, need_depth, need_logits, prefill, prompt, reset, tags, where,
)

pytestmark = pytest.mark.longctx_equivalence


@dataclass
class Runs:
    one_shot: Optional[np.ndarray]
    chunked_tail: Optional[np.ndarray]  # (tail, vocab): the last rows of the chunked run
    after_reset: Optional[np.ndarray]
    tail: int


@pytest.fixture(scope="module")
def reference(longctx_settings):
    return golden(longctx_settings)


@pytest.fixture(scope="module")
def runs(longctx_backend, longctx_runtime, longctx_settings, reference):
    done: Dict[int, Runs] = {}

    def at_depth(depth: int) -> Runs:
        if depth not in done:
            runtime, settings = longctx_runtime, longctx_settings
            at = where(longctx_backend, runtime, settings)
            ids = prompt(settings, runtime, depth, reference)
            tail = reference.tail if reference is not None else min(TAIL, depth)
            reset(runtime, at)
            one_shot = prefill(runtime, ids, at, f"one-shot prefill of {depth} tokens")
            reset(runtime, at)
            if one_shot is None:
                done[depth] = Runs(None, None, None, tail)
                return done[depth]
            rows = tail_logits(lambda part: prefill(runtime, part, at), ids, tail, settings.chunk)
            reset(runtime, at)
            after = prefill(runtime, ids, at, f"one-shot prefill of {depth} tokens after reset()")
            done[depth] = Runs(one_shot, rows, after, tail)
        return done[depth]

    return at_depth


def test_chunked_prefill_gives_the_one_shot_logits(longctx_backend, longctx_runtime, longctx_settings,
                                                   longctx_measure, longctx_positions, runs):
    need_depth(longctx_runtime, longctx_positions)
    result = runs(longctx_positions)
    one_shot = need_logits(result.one_shot)
    at = where(longctx_backend, longctx_runtime, longctx_settings)
    judged = consistency(result.chunked_tail[-1], one_shot, longctx_runtime, longctx_settings)
    longctx_measure.record("chunked vs one-shot logits", judged.comparison.kl, "nats",
                           **tags(longctx_runtime, longctx_settings), **judged.record())
    check_consistent(f"last logits of {longctx_positions} tokens in chunks of {longctx_settings.chunk} "
                     f"then {result.tail} single tokens, against one prefill", judged, at)


def test_same_prompt_after_reset_gives_the_same_logits(longctx_backend, longctx_runtime, longctx_settings,
                                                       longctx_measure, longctx_positions, runs):
    need_depth(longctx_runtime, longctx_positions)
    result = runs(longctx_positions)
    one_shot = need_logits(result.one_shot)
    at = where(longctx_backend, longctx_runtime, longctx_settings)
    judged = consistency(result.after_reset, one_shot, longctx_runtime, longctx_settings)
    longctx_measure.record("logits after reset", judged.comparison.kl, "nats",
                           **tags(longctx_runtime, longctx_settings), **judged.record())
    check_consistent(f"last logits of {longctx_positions} tokens after reset(), against the first run",
                     judged, at)


def test_logits_match_the_reference_logits(longctx_backend, longctx_runtime, longctx_settings, longctx_measure,
                                           longctx_positions, reference, runs):
    settings = longctx_settings
    if reference is None:
        pytest.skip("no --longctx-reference-logits: accuracy against a float reference is not judged "
                    "(write golden logits with longctx-logits)")
    if longctx_positions not in reference.depths:
        pytest.skip(f"the reference logits hold depths {reference.depths}, not {longctx_positions}")
    need_depth(longctx_runtime, longctx_positions)
    at = where(longctx_backend, longctx_runtime, settings)
    if reference.vocab_size != longctx_runtime.vocab_size:
        fail("vocabulary of the reference logits", reference.vocab_size,
             f"the runtime's {longctx_runtime.vocab_size} (another model?)", at)
    result = runs(longctx_positions)
    need_logits(result.one_shot)
    comparisons = [compare_logits(row, gold) for row, gold in zip(result.chunked_tail, reference.at(longctx_positions))]
    kl = float(np.mean([c.kl for c in comparisons]))
    agreement = float(np.mean([c.top1 for c in comparisons]))
    passed = kl <= settings.logits_kl and agreement >= settings.top1_agreement
    longctx_measure.record("KL from reference logits", kl, "nats", **tags(longctx_runtime, longctx_settings), bound=f"<= {settings.logits_kl:g}",
                           passed=passed, cell=f"KL {kl:.3g}, top-1 {agreement:.0%}", top1_agreement=agreement,
                           positions_judged=len(comparisons), threshold=settings.logits_kl,
                           reference=reference.meta)
    if kl > settings.logits_kl:
        fail(f"mean KL divergence from the reference logits over the last {len(comparisons)} positions",
             f"{kl:.4g} nats", f"<= {settings.logits_kl:g} nats", at)
    if agreement < settings.top1_agreement:
        fail(f"top-1 agreement with the reference logits over the last {len(comparisons)} positions",
             f"{agreement:.0%}", f">= {settings.top1_agreement:.0%}", at)
