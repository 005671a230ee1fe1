"""Planted needles: inputs whose attention output depends on every RoPE angle.

Gaussian inputs alone barely depend on position: a wrong RoPE angle changes the
output by noise. Needles make attention depend on it. A needle is a key planted
at position t whose rotated value is b·u (u a random unit vector), and a query
at position p whose rotated value is a·u: their score is high only if both are
rotated at the right angles with the right pairing. Decoys are needles the
query must NOT see (the next position inside a chunk, the key just outside the
window); loud heads have logits near 200 (a softmax without max subtraction
overflows); flat heads (q = 0) weigh every visible key equally. The keys and
queries are un-rotated with the float64 reference, so they live in the suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pytest_longctx import CacheSpec
from pytest_longctx.measure.inputs import CHECK_POSITIONS, Inputs
from pytest_longctx.reference import apply_rope

# Scores after scaling: a needle must dominate thousands of Gaussian keys; a loud one
# overflows exp() in float32 unless the maximum is subtracted.
NEEDLE_LOGIT = 16.0
DECOY_LOGIT = 30.0
LOUD_LOGIT = 200.0

ROLES = ("needle", "flat", "decoy-future", "needle", "loud", "window-inside", "window-outside", "gaussian")


@dataclass
class NeedleCase:
    """K/V for ``length`` positions and, per stage (cache length, n_q), the queries."""

    k: np.ndarray
    v: np.ndarray
    queries: Dict[Tuple[int, int], np.ndarray]
    roles: Dict[Tuple[int, int], List[str]] = field(default_factory=dict)


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    u = rng.standard_normal(d)
    return u / np.linalg.norm(u)


def plant_needles(spec: CacheSpec, length: int, stages: Sequence[Tuple[int, int]],
                  inputs: Inputs, targets: Sequence[int] = ()) -> NeedleCase:
    """Gaussian K/V/Q with needles planted for every stage's queries.

    ``stages`` are (cache length L, n_q): the queries are for positions L-n_q .. L-1.
    ``targets`` are extra positions for needles (besides 0, the middle and the
    check positions that fit).
    """
    rng = inputs.rng
    d = spec.head_dim
    k, v = inputs.kv(length, spec)
    directions: Dict[Tuple[int, int], np.ndarray] = {}
    planted_k: List[Tuple[int, int, np.ndarray]] = []
    planted_q: List[Tuple[Tuple[int, int], int, int, int, np.ndarray]] = []
    queries: Dict[Tuple[int, int], np.ndarray] = {}
    roles: Dict[Tuple[int, int], List[str]] = {}
    key_magnitude = np.sqrt(d)

    def direction(position: int, kv_head: int) -> np.ndarray:
        if (position, kv_head) not in directions:
            directions[(position, kv_head)] = _unit(rng, d)
            planted_k.append((position, kv_head, directions[(position, kv_head)] * key_magnitude))
        return directions[(position, kv_head)]

    for stage in stages:
        cache_length, n_q = stage
        q = inputs.q(n_q, spec)
        stage_roles = []
        base = [0, cache_length // 2, *targets, *(p for p in CHECK_POSITIONS if p < cache_length)]
        for i in range(n_q):
            position = cache_length - n_q + i
            window = spec.sliding_window
            low = 0 if window is None else position - window + 1
            visible = [t for t in base if low <= t <= position] or [position]
            for h in range(spec.n_heads):
                role = ROLES[(h + i) % len(ROLES)]
                logit, target = NEEDLE_LOGIT, visible[(h + 3 * i) % len(visible)]
                if role == "loud":
                    logit = LOUD_LOGIT
                elif role == "decoy-future":
                    if i == n_q - 1:
                        role, target = "needle", position - 1 if position > 0 else position
                    else:
                        logit, target = DECOY_LOGIT, position + 1
                elif role == "window-inside":
                    if window is None or low < 0:
                        role = "needle"
                    else:
                        target = low
                elif role == "window-outside":
                    if window is None or low - 1 < 0:
                        role = "gaussian"
                    else:
                        logit, target = DECOY_LOGIT, low - 1
                stage_roles.append(role)
                if role == "flat":
                    q[i, h] = 0.0
                elif role != "gaussian":
                    u = direction(target, h // spec.group_size)
                    a = logit / (spec.scale * key_magnitude)
                    planted_q.append((stage, i, h, position, u * a))
        queries[stage] = q
        roles[stage] = stage_roles

    if planted_k:
        positions = np.array([p for p, _, _ in planted_k])
        rotated = np.stack([x for _, _, x in planted_k])[:, None, :]
        pre = apply_rope(rotated, positions, spec, inverse=True)[:, 0, :]
        for (p, g, _), row in zip(planted_k, pre):
            k[p, g] = row
    if planted_q:
        positions = np.array([p for _, _, _, p, _ in planted_q])
        rotated = np.stack([x for _, _, _, _, x in planted_q])[:, None, :]
        pre = apply_rope(rotated, positions, spec, inverse=True)[:, 0, :]
        for (stage, i, h, _, _), row in zip(planted_q, pre):
            queries[stage][i, h] = row
    return NeedleCase(k, v, queries, roles)
