"""The equivalence yardstick: a plain implementation in the backend's storage precision.

"Plain" means what a correct engine does: float32 angles and float32 arithmetic,
K rotated before it is stored, K and V held in the cache's kv_dtype. A backend
is judged by how far it is from the float64 truth compared with how far this is.
Correct engines differ in ways that move that distance (their frequencies'
rounding, the type of their activations), so the yardstick is an envelope over
the ``Plain`` variants a cache's type admits: for every value, whichever of them
is farthest from the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

from pytest_longctx.spec import CacheSpec

from .attention import attention
from .quant import roundtrip
from .rope import apply_rope


# A float32 engine's inverse frequencies are not correctly rounded: transformers computes
# them with float32 ``pow`` (1 to 3 ulp off). At positions 2^k the float32 product is exact,
# so the plain error there is the frequencies' rounding alone, and an engine 3 ulp off is
# 6x further from the truth than one 0.5 ulp off.
FREQ_ULPS = (0, 3, -3)

# Cache types whose engines often hold activations in the same type: a model exported in
# float16 (ONNX Runtime, TensorRT) takes Q and K in float16, keeps float16 rotary tables and
# returns a float16 output. Rounding Q shifts every score of a query together, so at logits
# near 200 it moves the output 2-3x more than storing K does (ONNX Runtime's float16
# GroupQueryAttention, qwen3-0.6b at 16384 positions: 4.5e-3 against 1.1e-3 for float32
# activations); FlashAttention's tests cast every input to the type for the same reason.
HALF_ACTIVATIONS = ("float16", "bfloat16")


@dataclass(frozen=True)
class Plain:
    """One correct engine's numerics: frequencies ``freq_ulps`` off, and activations (Q and
    K before storage, cos/sin tables, the output) in ``activations``, or float32 if None."""

    freq_ulps: int = 0
    activations: Optional[str] = None

    def rotate(self, x: ArrayLike, positions: ArrayLike, spec: CacheSpec) -> np.ndarray:
        """x rotated in float32 as this engine rotates it (float64 array)."""
        if self.activations is None:
            return apply_rope(x, positions, spec, dtype=np.float32, freq_ulps=self.freq_ulps).astype(np.float64)
        x = roundtrip(x, self.activations)
        rotated = apply_rope(x, positions, spec, dtype=np.float32, freq_ulps=self.freq_ulps, tables=self.activations)
        return roundtrip(rotated, self.activations)

    def output(self, out: np.ndarray) -> np.ndarray:
        return out if self.activations is None else roundtrip(out, self.activations)


def plain_variants(spec: CacheSpec) -> Tuple[Plain, ...]:
    """The correct engines the yardstick spans for this cache."""
    variants = tuple(Plain(ulps) for ulps in FREQ_ULPS)
    if spec.kv_dtype in HALF_ACTIVATIONS:
        variants += (Plain(0, spec.kv_dtype),)
    return variants


def stored_k(k: ArrayLike, positions: ArrayLike, spec: CacheSpec, plain: Plain = Plain()) -> np.ndarray:
    """K as the cache holds it: rotated as ``plain`` rotates, then stored as kv_dtype (float64 array)."""
    return roundtrip(plain.rotate(k, positions, spec), spec.kv_dtype)


def stored_k_variants(k: ArrayLike, positions: ArrayLike, spec: CacheSpec) -> Tuple[np.ndarray, ...]:
    """``stored_k`` for each of ``plain_variants(spec)``, in that order."""
    return tuple(stored_k(k, positions, spec, plain) for plain in plain_variants(spec))


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


def plain_attention(q: ArrayLike, q_positions: ArrayLike, k_stored: np.ndarray, v_stored: np.ndarray,
                    spec: CacheSpec, plain: Plain = Plain()) -> np.ndarray:
    """Pre-RoPE q over stored K and V as ``plain`` computes it: float32 scores and sums."""
    q_rot = plain.rotate(q, q_positions, spec)
    return plain.output(attention(q_rot, k_stored, v_stored, spec, dtype=np.float32).astype(np.float64))


def plain_attend(q: ArrayLike, k: ArrayLike, v: ArrayLike, spec: CacheSpec) -> np.ndarray:
    """Pre-RoPE q (n_q, ...) over k, v (L, ...): float32 rotation and attention over stored K, V."""
    q, k = np.asarray(q), np.asarray(k)
    length, n_q = k.shape[0], q.shape[0]
    return plain_attention(q, np.arange(length - n_q, length), stored_k(k, np.arange(length), spec),
                           stored_v(v, spec), spec)
