"""The normative RoPE frequencies of every scaling variant, in float64.

This is the meaning of a RopeSpec: backends may compute it themselves, or call
this; the reference rotates with it at float64 angles. The formulas are Hugging
Face transformers' rope utilities, with two choices fixed per cache so results
are deterministic (see ``rope_frequencies``). Their published check values are
in tests/test_rope_frequencies.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SpecError
from .spec import CacheSpec, RopeSpec


@dataclass(frozen=True)
class RopeFrequencies:
    """inv_freq[j] for pairs j < rotary_dim/2, and the factor on both cos and sin."""

    inv_freq: np.ndarray
    attention_factor: float
    rotary_dim: int


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(rope: RopeSpec, dim: int) -> tuple[int, int]:
    """The truncated (low, high) pair indices of YaRN's ramp."""

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_positions
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    beta_fast = rope.beta_fast if rope.beta_fast is not None else 32.0
    beta_slow = rope.beta_slow if rope.beta_slow is not None else 1.0
    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _yarn(rope: RopeSpec, dim: int) -> tuple[np.ndarray, float]:
    extrapolation = _base_inv_freq(rope.theta, dim)
    interpolation = extrapolation / rope.factor
    low, high = yarn_correction_range(rope, dim)
    span = (high - low) if high != low else 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / span, 0.0, 1.0)
    keep = 1.0 - ramp
    inv_freq = interpolation * (1.0 - keep) + extrapolation * keep
    if rope.attention_factor is not None:
        factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = yarn_mscale(rope.factor)
    return inv_freq, factor


def _longrope(rope: RopeSpec, dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    orig = rope.original_max_positions
    ext = rope.long_factor if max_positions > orig else rope.short_factor
    if len(ext) != dim // 2:
        raise SpecError(f"rope longrope factor lists have {len(ext)} values, but should have {dim // 2}")
    inv_freq = 1.0 / (np.asarray(ext, dtype=np.float64) * rope.theta ** (np.arange(0, dim, 2) / dim))
    if rope.attention_factor is not None:
        return inv_freq, rope.attention_factor
    factor = rope.factor if rope.factor is not None else max_positions / orig
    if factor <= 1.0:
        return inv_freq, 1.0
    return inv_freq, math.sqrt(1.0 + math.log(factor) / math.log(orig))


def _llama3(rope: RopeSpec, dim: int) -> np.ndarray:
    inv_freq = _base_inv_freq(rope.theta, dim)
    orig = rope.original_max_positions
    low_wavelen = orig / rope.low_freq_factor
    high_wavelen = orig / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_frequencies(spec: CacheSpec) -> RopeFrequencies:
    """inv_freq and attention factor for a cache spec.

    ``dynamic`` computes its scaled base once, with the cache's max_positions as
    the sequence length; ``longrope`` uses long_factor when max_positions >
    original_max_positions, else short_factor, and when its factor is not given
    takes max_positions / original_max_positions for the attention factor.
    """
    rope = spec.rope
    dim = spec.rotary_dim
    if dim == 0:
        return RopeFrequencies(np.zeros(0), 1.0, 0)
    if rope.kind == "default":
        inv_freq, factor = _base_inv_freq(rope.theta, dim), 1.0
    elif rope.kind == "linear":
        inv_freq, factor = _base_inv_freq(rope.theta, dim) / rope.factor, 1.0
    elif rope.kind == "dynamic":
        orig = rope.original_max_positions
        length = max(spec.max_positions, orig)
        base = rope.theta * ((rope.factor * length / orig) - (rope.factor - 1)) ** (dim / (dim - 2))
        inv_freq, factor = _base_inv_freq(base, dim), 1.0
    elif rope.kind == "yarn":
        inv_freq, factor = _yarn(rope, dim)
    elif rope.kind == "longrope":
        inv_freq, factor = _longrope(rope, dim, spec.max_positions)
    else:
        inv_freq, factor = _llama3(rope, dim), 1.0
    inv_freq.setflags(write=False)
    return RopeFrequencies(inv_freq, float(factor), dim)
