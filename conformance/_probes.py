"""Inputs and lengths of the long-length probes: where each bug class starts, computed.

Random mean-zero data hides the bugs that live past 16K: each has a length where
it starts, and these helpers put a check there. Position indices break at the
powers of two (a 16-bit index wraps at 32768 and again past 65535, float16 stops
holding integers at 2048, bfloat16 at 256); a float16 accumulator overflows once
enough same-sign values are summed (``overflow_length``).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from pytest_longctx import CacheSpec
from pytest_longctx.reference import roundtrip

# Powers of two from here on are where a narrow position index goes wrong: bfloat16 holds
# every integer only up to 256, float16 up to 2048, int16 up to 32767 (wrap), uint16 to 65535.
FIRST_BOUNDARY = 256
# float16's overflow threshold: its largest finite value 65504 plus half its last spacing (32);
# a sum rounded to nearest becomes +Inf from here on.
FLOAT16_OVERFLOW = 65520.0
# V of the flat-attention probe: the first of these the cache stores exactly. 2 is a power of
# two, so every partial sum a float16 accumulator holds below the threshold is exact
# (multiples of 32 past 32768) and its first failure is the overflow itself, at
# FLOAT16_OVERFLOW / 2 = 32760 keys; q8_0's scale (amax/127 in float16) holds 127/64 exactly.
# Both have at most 7 significant bits, so float32 sums n of them exactly up to 2^17 keys.
FLAT_VALUES = (2.0, 127 / 64)


def boundaries_below(n: int) -> List[int]:
    """The powers of two from FIRST_BOUNDARY on that a cache of ``n`` positions holds."""
    out, b = [], FIRST_BOUNDARY
    while b < n:
        out.append(b)
        b *= 2
    return out


def boundary_rows(n: int) -> List[int]:
    """Positions read: b-1, b and b+1 at each boundary b below ``n`` (a rounded or wrapped
    index shows on the odd ones), and the last one."""
    rows = {p for b in boundaries_below(n) for p in (b - 1, b, b + 1) if p < n}
    return sorted(rows | {n - 1})


def overflow_length(value: float, threshold: float = FLOAT16_OVERFLOW) -> int:
    """Keys of ``value`` whose sum first reaches ``threshold``: where a float16 accumulator of
    the unnormalised output (Σ 1·v over flat weights) becomes Inf. Its denominator (Σ 1)
    overflows at ``overflow_length(1.0)`` = 65520 keys."""
    return math.ceil(threshold / abs(value))


def flat_value(kv_dtype: str) -> float:
    """The first of FLAT_VALUES a ``kv_dtype`` cache holds exactly (else the first)."""
    exact = [a for a in FLAT_VALUES if np.all(roundtrip(np.full(256, a), kv_dtype) == a)]  # whole blocks
    return (exact or FLAT_VALUES)[0]


def flat_values(n: int, spec: CacheSpec) -> np.ndarray:
    """V for ``n`` positions, every value ``flat_value``: no sum over keys cancels."""
    return np.full((n, spec.n_kv_heads, spec.head_dim), flat_value(spec.kv_dtype), np.float32)


def visible_keys(n: int, spec: CacheSpec) -> int:
    """Keys the last query of a cache of ``n`` positions sums over (the window's, if any)."""
    return min(n, spec.sliding_window) if spec.sliding_window else n


def chunk_ends(n: int, chunk: int, keep: Sequence[int] = ()) -> List[int]:
    """Where the appends of a fill in chunks of ``chunk`` end, with ``keep`` among them."""
    return sorted({*range(chunk, n, max(1, chunk)), *(k for k in keep if 0 < k < n), n})
