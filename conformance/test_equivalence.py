"""Output equivalence: does attention with RoPE match a float64 reference at long positions?

Criterion (as FlashAttention's tests): the backend's max abs error against the
float64 reference ≤ factor × the error of a plain implementation in the
backend's storage precision (float32 angles and arithmetic, K and V stored as
the cache stores them) + a floor of (8 + sqrt(keys summed)) float32 ulps of the
output's scale, the rounding any correct float32 summation carries. Any NaN or
Inf fails.
A correct backend that computes angles in float32 passes; one that computes
them in float16 fails.

Inputs make attention depend on position: needle keys that score high only
when query and key are rotated at the right angles with the right pairing,
decoys just outside the causal mask and the window, heads with logits near 200
and flat heads (see ``pytest_longctx.inputs``). Queries are checked at the
start, middle and end of the cache, one at a time (decode) and 16 at a time
(chunk, causal inside). RoPE is checked at the real angles θ·pos at 2047, 2048,
4095, 4096, 8191, 8192, 16383 … and the largest position requested, for every
scaling variant and both pairings; the variants and the attention features
(window, softcap, scale) do not depend on the storage type and run at the
backend's most precise kv dtype, while the shape's own RoPE is checked at
every dtype and positions value.

Long-length probes put a check where a bug class starts (``_probes``): K read
and queries attending at and past every power of two from 256 (a 16-bit index
wraps at 32768), flat attention over same-sign V (a float16 accumulator
overflows at a length its docstring computes), and dynamic NTK and LongRoPE
on a cache filled in many chunks across the original context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import pytest

from pytest_longctx import CacheSpec, RopeSpec
from pytest_longctx.spec import ATTENTION_FEATURES, ROPE_KINDS, ROPE_STYLES
from pytest_longctx.fixtures import opened, skip_unless_fits
from pytest_longctx.inputs import CHECK_POSITIONS, Inputs
from pytest_longctx.metrics import Verdict
from pytest_longctx.reference import apply_rope, farthest, stored_k_variants, stored_v

from ._needles import NeedleCase, plant_needles
from ._check import append, attend, case, equivalence, judge_attention, read
from ._probes import (FLOAT16_OVERFLOW, boundaries_below, boundary_rows, chunk_ends, flat_value, flat_values,
                      overflow_length, visible_keys)

pytestmark = pytest.mark.longctx_equivalence

N_Q = (1, 16)
START = 128  # cache length of the "start" stage
# 2 x 4 (needles) + 6 x 8 (true K and V, stored V, stored K at each of the 3 frequency offsets)
# + 2 x 8 (RoPE temporaries)
REFERENCE_BYTES_PER_VALUE = 72


def stage_lengths(n: int) -> List[int]:
    return sorted({min(n, START), max(1, n // 2), n})


@dataclass
class Outcome:
    """One comparison: what was compared, and the verdict."""

    what: str
    verdict: Verdict


@dataclass
class EquivalenceRun:
    """A cache filled stage by stage with a needle case, the references, and attend()'s outcomes."""

    spec: CacheSpec
    case: NeedleCase
    cache: object
    layer: int
    k_true: np.ndarray
    k_plains: Tuple[np.ndarray, ...]  # stored K for each of plain_variants(spec)
    v_true: np.ndarray
    v_plain: np.ndarray
    outcomes: List[Outcome] = field(default_factory=list)
    error: str = ""  # the backend raised or returned a malformed result while filling


def _role(run: EquivalenceRun, stage: Tuple[int, int], verdict: Verdict) -> str:
    if verdict.where is None or len(verdict.where) < 2:
        return ""
    i, h = verdict.where[0], verdict.where[1]
    roles = run.case.roles[stage]
    role = roles[i * run.spec.n_heads + h] if i * run.spec.n_heads + h < len(roles) else "?"
    return f", worst at query {i} head {h} ({role})"


@contextlib.contextmanager
def equivalence_run(backend, spec: CacheSpec, inputs: Inputs, factor: float,
                    lengths: Sequence[int], targets: Sequence[int] = (), appends: Sequence[int] = (),
                    n_qs: Sequence[int] = N_Q):
    """Fill the last layer stage by stage, comparing attend() at each stage.

    ``lengths`` are where attend() is compared; ``appends`` are further lengths where an
    append ends (a cache filled in many chunks). The fill stops at the largest of both."""
    n = max((*lengths, *appends))
    # Checked before the references are made: needles' K/V (float32), K and V true and as
    # stored (float64), RoPE's temporaries.
    skip_unless_fits(backend, spec, REFERENCE_BYTES_PER_VALUE * n * spec.n_kv_heads * spec.head_dim)
    stages = [(length, n_q) for length in lengths for n_q in n_qs if n_q <= length]
    needles = plant_needles(spec, n, stages, inputs, targets)
    positions = np.arange(n)
    k_true = apply_rope(needles.k, positions, spec)
    k_plains = stored_k_variants(needles.k, positions, spec)
    v_true = needles.v.astype(np.float64)
    v_plain = stored_v(needles.v, spec)
    working = 2 * k_true.nbytes  # what the comparisons still allocate
    layer = spec.n_layers - 1
    with opened(backend, spec, working_bytes=working) as cache:
        run = EquivalenceRun(spec, needles, cache, layer, k_true, k_plains, v_true, v_plain)
        try:
            _fill_and_compare(backend, run, stages, sorted({*lengths, *appends}), factor)
        except pytest.fail.Exception as exc:  # reported by the tests, as failures not errors
            run.error = str(exc)
        yield run


def _fill_and_compare(backend, run: EquivalenceRun, stages, ends: Sequence[int], factor: float) -> None:
    spec, needles, cache, layer = run.spec, run.case, run.cache, run.layer
    held = 0
    for length in ends:
        append(backend, cache, layer, needles.k[held:length], needles.v[held:length], held)
        held = length
        for stage in [s for s in stages if s[0] == length]:
            q = needles.queries[stage]
            got = attend(backend, cache, layer, q)
            verdict = judge_attention(got, q, spec, run.k_true[:length], run.v_true[:length],
                                      [k[:length] for k in run.k_plains], run.v_plain[:length], factor)
            label = f"attend with {stage[1]} quer{'y' if stage[1] == 1 else 'ies'} at positions ..{length - 1}"
            run.outcomes.append(Outcome(label + _role(run, stage, verdict), verdict))


def report(outcomes: List[Outcome], spec: CacheSpec, backend, measure, check: str, error: str = "") -> None:
    """Record the worst comparison and fail with one line per failing comparison."""
    __tracebackhide__ = True
    if error:
        pytest.fail(error, pytrace=False)
    failures = [o for o in outcomes if not o.verdict.passed]
    worst = max(outcomes, key=lambda o: (not o.verdict.passed, o.verdict.error / max(o.verdict.allowed, 1e-300)))
    verdict = worst.verdict
    measure.record(check, verdict.error, "max|err|", bound=f"<= {verdict.allowed:.3g}", passed=not failures,
                   cell=f"{verdict.error:.2g} <= {verdict.allowed:.2g}" if verdict.passed else f"{verdict.error:.2g}",
                   nmse=verdict.nmse, plain_error=verdict.plain_error, positions=spec.max_positions,
                   threshold=verdict.allowed)
    if failures:
        where = case(backend, spec)
        lines = [o.verdict.message(o.what, where) for o in failures]
        pytest.fail(f"{len(failures)} of {len(outcomes)} comparisons failed:\n" + "\n".join(lines), pytrace=False)


def compare_read(run: EquivalenceRun, backend, factor: float, rows: np.ndarray) -> List[Outcome]:
    """read() of the given positions against the float64-rotated K and the appended V."""
    outcomes = []
    for start, stop in _ranges(rows):
        k, v = read(backend, run.cache, run.layer, start, stop)
        span = f"positions {start}..{stop - 1}"
        outcomes.append(Outcome(f"read K at {span}", equivalence(
            k, run.k_true[start:stop], farthest([p[start:stop] for p in run.k_plains], run.k_true[start:stop]),
            factor)))
        outcomes.append(Outcome(f"read V at {span}", equivalence(
            v, run.v_true[start:stop], run.v_plain[start:stop], factor)))
    return outcomes


def _ranges(rows: np.ndarray) -> List[Tuple[int, int]]:
    """Contiguous (start, stop) runs of sorted unique positions."""
    rows = np.unique(rows)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, breaks) if r.size]


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


def rope_variant(shape: CacheSpec, kind: str, style: str, positions: int) -> RopeSpec:
    """The shape's RoPE, or a realistic configuration of another scaling kind.

    Dynamic NTK's and LongRoPE's original context is at most a quarter of ``positions``, so
    that the cache always grows past it (else its base is the plain one, its factors the
    short ones, and a choice made per append cannot show)."""
    base = shape.rope
    if base.kind == kind:
        return RopeSpec(**{**base.__dict__, "style": style})
    half = shape.rotary_dim // 2 if shape.rope.kind != "none" else shape.head_dim // 2
    common = dict(kind=kind, theta=base.theta, style=style, rotary_dim=base.rotary_dim)
    variants = {
        "none": dict(kind="none", style=style),
        "default": {},
        "linear": dict(factor=4.0),
        "dynamic": dict(factor=4.0, original_max_positions=max(1, min(4096, positions // 4))),
        "yarn": dict(factor=4.0, original_max_positions=32768),  # Qwen's recommended YaRN
        "longrope": dict(original_max_positions=max(1, min(4096, positions // 4)),
                         short_factor=tuple(np.linspace(1.0, 3.0, half)),
                         long_factor=tuple(np.geomspace(1.0, 64.0, half))),
        "llama3": dict(factor=8.0, original_max_positions=8192, low_freq_factor=1.0, high_freq_factor=4.0),
    }
    params = variants[kind]
    return RopeSpec(**params) if kind == "none" else RopeSpec(**{**common, **params})


def variant_spec(settings, kv_dtype: str, positions: int) -> CacheSpec:
    """The shape's head_dim and group size with one layer and one KV head: a variant's subject
    is the per-head math (angles, window, softcap, scale), which no head index changes; the
    shape's own checks already use every head of the last layer of the full cache (GQA mapping
    and large offsets included)."""
    shape = settings.spec_for(kv_dtype, positions)
    return shape.replace(n_layers=1, n_kv_heads=1, n_heads=shape.group_size)


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
