"""Context limits of a whole-model runtime: does it hold exactly the context its model
claims, refuse one token more loudly, and lose nothing when it refuses?

Requirements, one test each:
- the model's own limit (RKLLM bakes it in at conversion, a GGUF names its training
  context) is read and reported, and the context granted is within it and within
  ``--longctx-context``;
- asking for more than the model holds is refused, or clamped with a warning naming both
  numbers;
- a prompt of exactly the limit is held (positions() is the limit);
- one token more is rejected with ContextLimitExceeded, positions unchanged;
- a prompt crossing the limit is rejected whole: positions unchanged, and the next
  token's logits the same as if it had never been sent (within the consistency bound,
  ``pytest_longctx.measure.consistency``). A runtime that applies part of the prompt before
  failing is named with how many tokens it took.
"""

from __future__ import annotations

import warnings

import pytest

from pytest_longctx import ContextClamped, ContextLimitExceeded, LongctxError

from pytest_longctx.access.guard import close_warned, guarded
from pytest_longctx.access.runcontrol import captured

from ._check import fail
from ._runtime import (
    check_consistent, consistency, need_logits, positions, prefill, prefill_chunks, prompt, reset, tags, where,
)

pytestmark = pytest.mark.longctx_limits

BEYOND = 32  # context asked above the model's limit: RKLLM aligns contexts to 32


def test_model_context_limit_is_read_and_reported(longctx_backend, longctx_runtime, longctx_settings,
                                                  longctx_measure):
    runtime, at = longctx_runtime, where(longctx_backend, longctx_runtime, longctx_settings)
    model_limit, limit = runtime.model_context_limit, runtime.context_limit
    longctx_measure.record("context limit", limit, "positions", **tags(longctx_runtime, longctx_settings), positions=limit,
                           cell=f"{limit} (model {model_limit if model_limit is not None else 'does not say'})",
                           model_context_limit=model_limit, requested=longctx_settings.context)
    if not isinstance(limit, int) or limit < 1:
        fail("context_limit", repr(limit), "a positive whole number", at)
    if model_limit is not None and limit > model_limit:
        fail("context_limit", limit, f"<= the model's limit {model_limit}", at)
    requested = longctx_settings.context
    if requested is not None and limit > requested:
        fail("context_limit", limit, f"<= the {requested} asked for with --longctx-context", at)


def test_context_above_the_model_limit_is_clamped_or_refused(longctx_backend, longctx_runtime,
                                                             longctx_settings, longctx_measure):
    runtime, at = longctx_runtime, where(longctx_backend, longctx_runtime, longctx_settings)
    model_limit = runtime.model_context_limit
    if model_limit is None:
        pytest.skip("the model file does not state its context limit: nothing to exceed")
    asked = model_limit + BEYOND
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with guarded(f"open_runtime(context={asked})",
                         "a LongctxError (refused) or a runtime clamped with a ContextClamped warning", at,
                         let=(LongctxError,)):
                other = longctx_backend.open_runtime(longctx_settings.model, asked)
        except LongctxError as exc:
            longctx_measure.record("context above the model's", asked, "positions", **tags(longctx_runtime, longctx_settings), positions=asked,
                                   cell=f"{asked}: refused", outcome="refused", message=str(exc))
            return
    try:
        granted = other.context_limit
    finally:
        close_warned(other, f"the runtime opened with context {asked}")
    clamped = [w.message for w in caught if isinstance(w.message, ContextClamped)]
    longctx_measure.record("context above the model's", asked, "positions", **tags(longctx_runtime, longctx_settings), positions=asked,
                           cell=f"{asked}: {granted} granted", outcome="clamped" if clamped else "accepted",
                           granted=granted)
    if granted > model_limit:
        fail(f"context_limit when {asked} is asked of a model holding {model_limit}", granted,
             f"<= {model_limit} (clamped) or a refusal", at)
    if not clamped:
        fail(f"warning when context {asked} is clamped to {granted}", "none",
             "a ContextClamped warning naming both numbers", at)


@pytest.fixture(scope="module")
def at_limit(longctx_backend, longctx_runtime, longctx_settings):
    """The runtime filled with exactly context_limit tokens, in chunks; and the error if any."""
    runtime, at = longctx_runtime, where(longctx_backend, longctx_runtime, longctx_settings)
    reset(runtime, at)
    ids = prompt(longctx_settings, runtime, runtime.context_limit + 1)
    try:
        prefill_chunks(runtime, ids[:-1], longctx_settings.chunk, at)
    except pytest.fail.Exception as exc:
        return ids, str(exc)
    return ids, None


def test_prompt_of_exactly_the_context_limit_is_held(longctx_backend, longctx_runtime, longctx_settings, at_limit):
    runtime, at = longctx_runtime, where(longctx_backend, longctx_runtime, longctx_settings)
    _, error = at_limit
    if error:
        fail(f"prefill to exactly {runtime.context_limit} tokens", error, "no error", at)
    held = positions(runtime)
    if held != runtime.context_limit:
        fail(f"positions() after prefilling {runtime.context_limit} tokens", held, runtime.context_limit, at)


def test_one_token_more_is_rejected_and_changes_nothing(longctx_backend, longctx_runtime, longctx_settings,
                                                        at_limit):
    runtime, at = longctx_runtime, where(longctx_backend, longctx_runtime, longctx_settings)
    ids, error = at_limit
    if error or positions(runtime) != runtime.context_limit:
        pytest.skip("the runtime could not be filled to its limit (see the test above)")
    limit = runtime.context_limit
    try:
        with guarded(f"prefill of 1 token at the limit {limit}", "ContextLimitExceeded", at,
                     let=(ContextLimitExceeded,)):
            runtime.prefill(ids[-1:])
    except ContextLimitExceeded:
        pass
    else:
        fail(f"prefill of 1 token at the limit {limit}", f"accepted (positions {positions(runtime)})",
             "ContextLimitExceeded", at)
    held = positions(runtime)
    if held != limit:
        fail("positions() after the rejected token", held, f"{limit}, unchanged", at)


def test_prompt_crossing_the_limit_is_rejected_whole(longctx_backend, longctx_runtime, longctx_settings,
                                                     longctx_measure):
    """A prompt of chunk + 8 tokens sent at limit - chunk: a runtime that batches by chunk
    would fit the first batch exactly; the whole prompt must still be refused."""
    runtime, at = longctx_runtime, where(longctx_backend, longctx_runtime, longctx_settings)
    limit, chunk = runtime.context_limit, min(longctx_settings.chunk, runtime.context_limit // 2)
    start, crossing = limit - chunk, chunk + 8
    ids = prompt(longctx_settings, runtime, start + crossing)

    reset(runtime, at)
    prefill_chunks(runtime, ids[:start], longctx_settings.chunk, at)
    expected = prefill(runtime, ids[start:start + 1], at, f"prefill of 1 token at position {start}")

    reset(runtime, at)
    prefill_chunks(runtime, ids[:start], longctx_settings.chunk, at)
    with captured() as caught:
        runtime.prefill(ids[start:])
    raised = caught.error
    held = positions(runtime)
    longctx_measure.record("crossing prompt: tokens taken", held - start, "tokens", **tags(longctx_runtime, longctx_settings), positions=limit,
                           cell=f"{held - start} of {crossing}", passed=held == start and
                           isinstance(raised, ContextLimitExceeded))
    if raised is None:
        fail(f"prefill of {crossing} tokens at position {start} (limit {limit})",
             f"accepted (positions {held})", "ContextLimitExceeded", at)
    if held != start:
        fail(f"prefill of {crossing} tokens at position {start} (limit {limit})",
             f"half-applied: took {held - start} of {crossing} tokens before raising "
             f"{type(raised).__name__}: {raised}", f"rejected whole (positions {start})", at)
    if not isinstance(raised, ContextLimitExceeded):
        fail(f"prefill of {crossing} tokens at position {start} (limit {limit})",
             f"{type(raised).__name__}: {raised}", "ContextLimitExceeded", at)
    after = prefill(runtime, ids[start:start + 1], at, f"prefill of 1 token at position {start} after the refusal")
    if expected is not None:
        check_consistent("next logits after the refused prompt",
                         consistency(need_logits(after), expected, runtime, longctx_settings), at)
