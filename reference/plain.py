"""The equivalence yardstick: a plain implementation in the backend's storage precision.

"Plain" means what a correct engine does: float32 angles and float32 arithmetic,
K rotated before it is stored, K and V held in the cache's kv_dtype. A backend
is judged by how far it is from the float64 truth compared with how far this is.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

from pytest_longctx.spec import CacheSpec

from .attention import attention
from .quant import roundtrip
from .rope import apply_rope


# A float32 engine's inverse frequencies are not correctly rounded: transformers computes
# them with float32 ``pow`` (1 to 3 ulp off). At positions 2^k the float32 product is exact,
# so the plain error there is the frequencies' rounding alone, and an engine 3 ulp off is
# 6x further from the truth than one 0.5 ulp off. The yardstick is therefore the envelope
# of the plain implementation with its frequencies as rounded and moved by +-3 ulp: for
# every value, whichever of them is farthest from the truth.
FREQ_ULPS = (0, 3, -3)


def stored_k(k: ArrayLike, positions: ArrayLike, spec: CacheSpec, freq_ulps: int = 0) -> np.ndarray:
    """K as the cache holds it: rotated in float32, then stored as kv_dtype (float64 array)."""
    return roundtrip(apply_rope(k, positions, spec, dtype=np.float32, freq_ulps=freq_ulps), spec.kv_dtype)


def stored_k_variants(k: ArrayLike, positions: ArrayLike, spec: CacheSpec) -> Tuple[np.ndarray, ...]:
    """``stored_k`` for each frequency offset of ``FREQ_ULPS``."""
    return tuple(stored_k(k, positions, spec, ulps) for ulps in FREQ_ULPS)


def farthest(variants: Sequence[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """For every value, the variant farthest from ``truth``: the envelope's yardstick."""
    worst = np.array(variants[0], dtype=np.float64, copy=True)
    gap = np.abs(worst - truth)
    for variant in variants[1:]:
        other = np.abs(variant - truth)
        wider = other > gap
        worst[wider], gap[wider] = variant[wider], other[wider]
    return worst


def stored_v(v: ArrayLike, spec: CacheSpec) -> np.ndarray:
    """V as the cache holds it (float64 array)."""
    return roundtrip(v, spec.kv_dtype)


def plain_attend(q: ArrayLike, k: ArrayLike, v: ArrayLike, spec: CacheSpec) -> np.ndarray:
    """Pre-RoPE q (n_q, ...) over k, v (L, ...): float32 rotation and attention over stored K, V."""
    q, k = np.asarray(q), np.asarray(k)
    length, n_q = k.shape[0], q.shape[0]
    q_rot = apply_rope(q, np.arange(length - n_q, length), spec, dtype=np.float32)
    k_stored = stored_k(k, np.arange(length), spec)
    v_stored = stored_v(v, spec)
    return attention(q_rot, k_stored, v_stored, spec, dtype=np.float32).astype(np.float64)
