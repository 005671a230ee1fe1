"""Rotary position embedding applied element by element, in a chosen precision.

float64 with angles from integer positions is the truth; float32 is what a
correct engine computes (the "plain" yardstick). Frequencies come from the
normative ``pytest_longctx.rope.rope_frequencies``, so every scaling variant is
rotated the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from pytest_longctx.rope import rope_frequencies
from pytest_longctx.spec import CacheSpec

from .quant import roundtrip


def _integer_positions(positions: ArrayLike) -> np.ndarray:
    pos = np.asarray(positions)
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
        raise TypeError(f"positions should be a 1-D integer array, got {pos.dtype} of shape {pos.shape}")
    return pos


def rope_angles(positions: ArrayLike, inv_freq: ArrayLike, dtype: DTypeLike = np.float64,
                freq_ulps: int = 0) -> np.ndarray:
    """angle[n, j] = positions[n] * inv_freq[j], both cast to ``dtype`` first.

    Casting first is the point: a float32 engine rounds both operands and the
    product, and that error grows with position; float64 keeps it negligible.
    ``freq_ulps`` moves each frequency that many units in the last place of
    ``dtype`` after rounding: engines compute their frequencies in float32 with
    ``pow``, 1 to 3 ulp from the correctly rounded value (transformers).
    """
    pos = _integer_positions(positions).astype(dtype)
    inv = np.asarray(inv_freq).astype(dtype)
    if freq_ulps:
        inv = (inv + freq_ulps * np.spacing(inv)).astype(dtype)
    return np.multiply.outer(pos, inv)


def _pair_indices(rotary_dim: int, style: str) -> tuple[Any, Any]:
    """The (first, second) element indices of each rotated pair."""
    half = rotary_dim // 2
    if style == "neox":
        return slice(0, half), slice(half, rotary_dim)
    return slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)


def apply_rope(
    x: ArrayLike,
    positions: ArrayLike,
    spec: CacheSpec,
    *,
    dtype: DTypeLike = np.float64,
    inverse: bool = False,
    freq_ulps: int = 0,
    tables: Optional[str] = None,
) -> np.ndarray:
    """Rotate x (n, heads, head_dim) at positions (n,), all arithmetic in ``dtype``.

    The first spec.rotary_dim elements rotate in pairs (neox: i with i + rd/2;
    gptj: 2i with 2i+1) and the rest pass through. The attention factor scales
    both cos and sin. ``inverse`` applies the exact inverse (angle negated,
    divided by the factor), so tests can design inputs whose rotated value is
    known. ``freq_ulps``: see ``rope_angles``. ``tables``: a storage type (``float16``)
    that cos and sin, the attention factor applied, are rounded to before they rotate, as
    an engine holding its rotary tables in its activation type does.
    """
    dtype = np.dtype(dtype)
    out = np.array(x, dtype=dtype, copy=True)
    if out.ndim < 2 or out.shape[-1] != spec.head_dim:
        raise ValueError(f"x should have shape (n, ..., {spec.head_dim}), got {out.shape}")
    freqs = rope_frequencies(spec)
    pos = _integer_positions(positions)
    if pos.shape[0] != out.shape[0]:
        raise ValueError(f"{pos.shape[0]} positions for {out.shape[0]} rows of x")
    if freqs.rotary_dim == 0:
        return out

    angles = rope_angles(pos, freqs.inv_freq, dtype, freq_ulps)
    cos, sin = np.cos(angles), np.sin(angles)
    factor = dtype.type(freqs.attention_factor)
    if inverse:
        cos, sin = cos / factor, -sin / factor
    else:
        cos, sin = cos * factor, sin * factor
    if tables is not None:
        cos, sin = roundtrip(cos, tables).astype(dtype), roundtrip(sin, tables).astype(dtype)
    # Broadcast (n, rd/2) over the head axes between positions and head_dim.
    shape = (pos.shape[0],) + (1,) * (out.ndim - 2) + (angles.shape[1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)

    first, second = _pair_indices(freqs.rotary_dim, spec.rope.style)
    a, b = out[..., first].copy(), out[..., second].copy()
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out
