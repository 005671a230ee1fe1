"""Output equivalence: does attention with RoPE match a float64 reference at long positions?

Requirements, one test each:
- attend() of the shape's own spec matches the reference at the start, middle and end
  of the cache, one query at a time (decode) and 16 at a time (chunk, causal inside);
- read() returns every position's K rotated at its own angle and V as appended;
- every RoPE scaling kind (none, default, linear, dynamic, YaRN, LongRoPE, Llama 3) in
  both pairings matches at the real angles θ·pos at 2047, 2048, 4095, 4096, 8191, 8192,
  16383 … and the largest position requested; dynamic NTK and LongRoPE also on a cache
  filled in many chunks across the original context (fixed once per cache);
- the attention features match: sliding window (edges included), softcap, a custom scale;
- position indices at and past every power of two from 256 read and attend right (a
  16-bit index wraps at 32768, a float16 one rounds odd positions past 2048);
- flat attention over same-sign V is exact past the length where a float16
  accumulator overflows (``_probes`` computes it).

Tolerance (as FlashAttention's tests): the backend's max abs error against the float64
reference ≤ ``--longctx-error-factor`` × the error of a plain implementation in the
backend's storage precision (float32 angles and arithmetic, K and V stored as the cache
stores them) + a floor of (8 + sqrt(keys summed)) float32 ulps of the output's scale,
the rounding any correct float32 summation carries (``_check.equivalence``). Any NaN or
Inf fails. A correct backend that computes angles in float32 passes; one that computes
them in float16 fails.

Inputs make attention depend on position: needle keys that score high only when query
and key are rotated at the right angles with the right pairing, decoys just outside the
causal mask and the window, heads with logits near 200 and flat heads (``_needles``).
The variants and the features do not depend on the storage type and run at the
backend's most precise kv dtype; the shape's own RoPE is checked at every dtype and
positions value. Machinery: ``_equivalence``.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_longctx.measure.inputs import CHECK_POSITIONS, Inputs
from pytest_longctx.reference import stored_v
from pytest_longctx.session.fixtures import opened
from pytest_longctx.spec import ATTENTION_FEATURES, ROPE_KINDS, ROPE_STYLES

from ._check import append, attend, equivalence
from ._equivalence import Outcome, compare_read, equivalence_run, report, rope_variant, stage_lengths, variant_spec
from ._probes import (FLOAT16_OVERFLOW, boundaries_below, boundary_rows, chunk_ends, flat_value, flat_values,
                      overflow_length, visible_keys)

pytestmark = pytest.mark.longctx_equivalence


@pytest.fixture(scope="module")
def shape_run(longctx_backend, longctx_kv_dtype, longctx_positions, longctx_settings):
    """The shape's own spec at each positions value, with stages at start, middle and end."""
    spec = longctx_settings.spec_for(longctx_kv_dtype, longctx_positions)
    inputs = Inputs(longctx_settings.seed, f"equivalence-{longctx_kv_dtype}-{longctx_positions}")
    with equivalence_run(longctx_backend, spec, inputs, longctx_settings.error_factor,
                         stage_lengths(spec.max_positions)) as run:
        yield run


def test_attention_matches_reference(longctx_backend, longctx_measure, shape_run):
    report(shape_run.outcomes, shape_run.spec, longctx_backend, longctx_measure, "attention error", shape_run.error)


def test_read_matches_reference(longctx_backend, longctx_settings, longctx_measure, shape_run):
    if shape_run.error:
        pytest.fail(shape_run.error, pytrace=False)
    rows = np.arange(shape_run.spec.max_positions)
    outcomes = compare_read(shape_run, longctx_backend, longctx_settings.error_factor, rows)
    report(outcomes, shape_run.spec, longctx_backend, longctx_measure, "read error")


# Kinds whose frequencies depend on the cache's length: fixed once per cache by the contract.
PER_CACHE_KINDS = ("dynamic", "longrope")

ROPE_CASES = [(kind, style) for kind in ROPE_KINDS for style in ROPE_STYLES if (kind, style) != ("none", "gptj")]


@pytest.mark.longctx_storage_independent
@pytest.mark.parametrize(("kind", "style"), ROPE_CASES, ids=[f"{k}-{s}" for k, s in ROPE_CASES])
def test_rope_matches_reference_at_long_positions(longctx_backend, longctx_kv_dtype, longctx_settings,
                                                  longctx_inputs, longctx_measure, kind, style):
    n = max(longctx_settings.positions)
    spec = variant_spec(longctx_settings, longctx_kv_dtype, n).replace(
        rope=rope_variant(longctx_settings.shape, kind, style, n))
    checks = [p for p in CHECK_POSITIONS if p < n] + [n - 1]
    lengths, appends = [n], []
    if kind in PER_CACHE_KINDS:
        # Dynamic NTK's base and LongRoPE's factors are fixed per cache: a cache filled in many
        # chunks, the first ending within the original context, must get them on every chunk
        # (chosen from the length at each append, vLLM #3488 and #27414, it does not). Keys
        # from before the crossing are read; dynamic also attends there.
        orig = spec.rope.original_max_positions
        lengths = sorted({orig, n}) if kind == "dynamic" else [n]
        appends = chunk_ends(n, longctx_settings.chunk, keep=(orig,))
        checks = [0, orig - 1] + checks
    checks = np.unique(checks)
    with equivalence_run(longctx_backend, spec, longctx_inputs, longctx_settings.error_factor, lengths,
                         targets=tuple(int(p) for p in checks), appends=appends) as run:
        outcomes = [] if run.error else compare_read(run, longctx_backend, longctx_settings.error_factor, checks)
        report(run.outcomes + outcomes, spec, longctx_backend, longctx_measure, f"rope {kind}/{style}", run.error)


@pytest.mark.longctx_storage_independent
@pytest.mark.parametrize("feature", ATTENTION_FEATURES)
def test_attention_features_match_reference(longctx_backend, longctx_kv_dtype, longctx_settings,
                                            longctx_inputs, longctx_measure, feature):
    """Sliding window (edges included), softcap and a custom scale, at the largest positions."""
    n = max(longctx_settings.positions)
    spec = variant_spec(longctx_settings, longctx_kv_dtype, n)
    changes = {
        "window": dict(sliding_window=max(1, min(n // 4, 4096))),
        "softcap": dict(softcap=30.0),
        "scale": dict(softmax_scale=0.5 / np.sqrt(spec.head_dim)),
    }[feature]
    spec = spec.replace(**changes)
    with equivalence_run(longctx_backend, spec, longctx_inputs, longctx_settings.error_factor,
                         stage_lengths(n)) as run:
        report(run.outcomes, spec, longctx_backend, longctx_measure, f"attention {feature}", run.error)


@pytest.mark.longctx_storage_independent
@pytest.mark.longctx_longest_only
def test_positions_at_index_boundaries_read_and_attend_right(longctx_backend, longctx_kv_dtype, longctx_positions,
                                                             longctx_settings, longctx_inputs, longctx_measure):
    """Position indices at and past every power of two b >= 256 the cache holds: K read at
    b-1, b and b+1, queries attending at b (a cache of b+1 positions, needles at b-1 and b).

    A position kept in 16 bits wraps at 32768 (signed) or 65536 (unsigned) and one kept in
    bfloat16 or float16 rounds odd positions past 256 or 2048 (candle PR #3520: 15962 became
    15936): the cache then rotates K and the query at another position than its own."""
    n = longctx_positions  # at each length, so that the context finder probes it too
    spec = variant_spec(longctx_settings, longctx_kv_dtype, n)
    bounds = boundaries_below(n)
    lengths = sorted({b + 1 for b in bounds} | {n})  # a decode query at each b and at the last position
    appends = [min(n, b + 2) for b in bounds]  # b+1 is read too
    targets = tuple(p for b in bounds for p in (b - 1, b))
    with equivalence_run(longctx_backend, spec, longctx_inputs, longctx_settings.error_factor, lengths,
                         targets=targets, appends=appends, n_qs=(1,)) as run:
        outcomes = [] if run.error else [
            outcome for row in boundary_rows(n)  # one by one: a failure names its position
            for outcome in compare_read(run, longctx_backend, longctx_settings.error_factor, np.array([row]))]
        report(run.outcomes + outcomes, spec, longctx_backend, longctx_measure, "positions at boundaries", run.error)


@pytest.mark.longctx_longest_only
def test_flat_attention_over_large_values_is_exact(longctx_backend, longctx_kv_dtype, longctx_positions,
                                                   longctx_settings, longctx_inputs, longctx_measure):
    """A query with zero scores over n keys that all hold the same value a (2, or 127/64 where
    the cache cannot store 2 exactly): the output is a.

    Random mean-zero V never shows a float16 accumulator; same-sign V does, at a length the
    arithmetic gives. Flat weights are all exp(0) = 1, so the unnormalised output is the sum
    n·a and the denominator n. float16 rounds a sum to +Inf from 65504 + 32/2 = 65520 on: a
    float16 accumulator of the output overflows at n = ceil(65520 / a) keys (32760 for a = 2,
    33018 for 127/64), one of the denominator at n = 65520 keys (llama.cpp PR #17746, Metal PR
    #13975). Below that, float16 holds the sum 2n exactly for every n up to 2048 and every n
    that is a multiple of 16, so there the first failure is the overflow; float32 holds n·a
    exactly (a has 7 significant bits) up to 2^17 keys, in any order of summation. With
    equal weights the reference is the mean of the visible V."""
    n = longctx_positions  # at each length: the finder brackets the overflow length
    spec = variant_spec(longctx_settings, longctx_kv_dtype, n)
    keys = visible_keys(n, spec)
    k = longctx_inputs.normal(n, spec.n_kv_heads, spec.head_dim)  # no score depends on it
    v = flat_values(n, spec)
    q = np.zeros((1, spec.n_heads, spec.head_dim), np.float32)
    with opened(longctx_backend, spec, working_bytes=k.nbytes + v.nbytes) as cache:
        for start in range(0, n, longctx_settings.chunk):
            stop = min(n, start + longctx_settings.chunk)
            append(longctx_backend, cache, 0, k[start:stop], v[start:stop], start)
        got = attend(longctx_backend, cache, 0, q)
    # Equal weights: attention is the mean of the visible V, summed in float64 (the truth) and
    # in float32 over V as the cache stores it (the plain yardstick), for each query head's KV head.
    heads, seen = np.arange(spec.n_heads) // spec.group_size, slice(n - keys, n)
    truth = np.mean(v[seen], axis=0, dtype=np.float64)[heads][None]
    plain = np.mean(stored_v(v[seen], spec).astype(np.float32), axis=0, dtype=np.float32)[heads][None]
    verdict = equivalence(got, truth, plain, longctx_settings.error_factor, terms=keys)
    value = flat_value(spec.kv_dtype)
    what = (f"attend with a flat query over {keys} keys of v={value:g} (a float16 sum of them overflows "
            f"{FLOAT16_OVERFLOW:g} at {overflow_length(value)} keys)")
    report([Outcome(what, verdict)], spec, longctx_backend, longctx_measure, "flat attention")
