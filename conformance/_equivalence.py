"""Machinery of the equivalence group: fill a cache with needles, compare, report.

``equivalence_run`` fills the last layer stage by stage with a needle case
(``_needles``) and compares attend() at each stage against the float64 reference and the
plain yardstick; ``compare_read`` does the same for read(); ``report`` records the worst
comparison and fails with one line per failing comparison. ``rope_variant`` and
``variant_spec`` build the specs of the RoPE variants and the attention features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import pytest

from pytest_longctx import CacheSpec, RopeSpec
from pytest_longctx.measure.inputs import Inputs
from pytest_longctx.measure.metrics import Verdict
from pytest_longctx.reference import apply_rope, farthest, stored_k_variants, stored_v
from pytest_longctx.session.fixtures import opened, skip_unless_fits

from ._check import append, attend, case, equivalence, judge_attention, read, verdict_line
from ._needles import NeedleCase, plant_needles

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
        lines = [verdict_line(o.verdict, o.what, where) for o in failures]
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
