"""What a KV cache of each storage type holds for a value: exact round trips.

The equivalence yardstick stores K and V the way the backend says it does, so
the formats here follow their public definitions (IEEE, bfloat16 from float32
bits, ggml's q8_0/q4_0 reference quantizers, OCP fp8 e4m3fn). Values lie along
the last axis (head_dim); block formats use 32 values per block.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
from numpy.typing import ArrayLike

BLOCK = 32
FP8_E4M3_MAX = 448.0


def _blocks(x: ArrayLike) -> np.ndarray:
    """x as float64 (..., n/32, 32)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"block formats need a last axis divisible by {BLOCK}, got shape {x.shape}")
    return x.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK, BLOCK))


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is 0 (an all-zero block quantizes to zeros, as in ggml)."""
    safe = np.where(d == 0, 1.0, d)
    return np.where(d == 0, 0.0, 1.0 / safe)


def quantize_q8_0(x: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """ggml q8_0: d = amax/127 (stored float16), q = round(x/d) as int8.

    Rounding is half away from zero (C roundf, as ggml's reference quantizer);
    q uses the unrounded d, as ggml does. Returns d (..., n/32), q (..., n).
    """
    blocks = _blocks(x)
    d = np.abs(blocks).max(axis=-1) / 127.0
    scaled = blocks * _inverse(d)[..., None]
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    q = q.astype(np.int8).reshape(blocks.shape[:-2] + (-1,))
    return d.astype(np.float16), q


def dequantize_q8_0(d: ArrayLike, q: ArrayLike) -> np.ndarray:
    """value = q * d with the stored float16 d."""
    q = np.asarray(q)
    blocks = q.reshape(q.shape[:-1] + (-1, BLOCK)).astype(np.float64)
    values = blocks * np.asarray(d, dtype=np.float16).astype(np.float64)[..., None]
    return values.reshape(q.shape)


def quantize_q4_0(x: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """ggml q4_0: m = the signed value of largest magnitude, d = m/-8 (float16),
    q = min(15, trunc(x/d + 8.5)); element j in the low nibble, j+16 in the high.

    Ties in magnitude pick the first element, as ggml's strict comparison does.
    Returns d (..., n/32) float16 and packed (..., n/32, 16) uint8.
    """
    blocks = _blocks(x)
    first_largest = np.argmax(np.abs(blocks), axis=-1)[..., None]
    d = np.take_along_axis(blocks, first_largest, axis=-1)[..., 0] / -8.0
    q = np.clip(np.trunc(blocks * _inverse(d)[..., None] + 8.5), 0, 15).astype(np.uint8)
    half = BLOCK // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return d.astype(np.float16), packed.astype(np.uint8)


def dequantize_q4_0(d: ArrayLike, packed: ArrayLike) -> np.ndarray:
    """value = (q - 8) * d with the stored float16 d; returns float64 (..., n)."""
    packed = np.asarray(packed, dtype=np.uint8)
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float64)
    values = (q - 8.0) * np.asarray(d, dtype=np.float16).astype(np.float64)[..., None]
    return values.reshape(values.shape[:-2] + (-1,))


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """Round the float32 bits to the upper 16 with round-to-nearest-even; NaN stays NaN."""
    f32 = np.asarray(x, dtype=np.float32)
    nan = np.isnan(f32)
    bits = np.where(nan, np.float32(0), f32).view(np.uint32)  # NaN bits could wrap the add
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)
    out = rounded.view(np.float32).astype(np.float64)
    return np.where(nan, np.nan, out)


def _fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """OCP e4m3fn: 3 mantissa bits, exponents down to -6 (subnormal step 2^-9),
    no infinities, saturating at 448, round to nearest even; NaN stays NaN."""
    x = np.asarray(x, dtype=np.float64)
    magnitude = np.minimum(np.abs(x), FP8_E4M3_MAX)  # saturate; inf -> 448
    _, exponent = np.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1)
    step = np.ldexp(1.0, np.maximum(exponent - 1, -6) - 3)
    return np.copysign(np.rint(magnitude / step) * step, x)


def _q8_0(x: np.ndarray) -> np.ndarray:
    return dequantize_q8_0(*quantize_q8_0(x))


def _q4_0(x: np.ndarray) -> np.ndarray:
    return dequantize_q4_0(*quantize_q4_0(x))


_ROUNDTRIPS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "float32": lambda x: x.astype(np.float32).astype(np.float64),
    "float16": lambda x: x.astype(np.float16).astype(np.float64),
    "bfloat16": _bfloat16,
    "q8_0": _q8_0,
    "q4_0": _q4_0,
    "fp8_e4m3": _fp8_e4m3,
}


def roundtrip(x: ArrayLike, kv_dtype: str) -> np.ndarray:
    """The float64 value a cache storing ``kv_dtype`` holds for x."""
    if kv_dtype not in _ROUNDTRIPS:
        raise ValueError(f"kv_dtype={kv_dtype!r}, but should be one of {', '.join(_ROUNDTRIPS)}")
    with np.errstate(over="ignore"):  # overflow to inf is what such a cache holds
        return np.asarray(_ROUNDTRIPS[kv_dtype](np.asarray(x)), dtype=np.float64)
