"""The equivalence yardstick: a plain implementation in the backend's storage precision.

"Plain" means what a correct engine does: float32 angles and float32 arithmetic,
K rotated before it is stored, K and V held in the cache's kv_dtype. A backend
is judged by how far it is from the float64 truth compared with how far this is.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from pytest_longctx.spec import CacheSpec

from .attention import attention
from .quant import roundtrip
from .rope import apply_rope


def stored_k(k: ArrayLike, positions: ArrayLike, spec: CacheSpec) -> np.ndarray:
    """K as the cache holds it: rotated in float32, then stored as kv_dtype (float64 array)."""
    return roundtrip(apply_rope(k, positions, spec, dtype=np.float32), spec.kv_dtype)


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
