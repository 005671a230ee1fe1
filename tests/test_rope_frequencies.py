"""rope_frequencies against the formulas and the published check values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_longctx.rope import rope_frequencies, yarn_correction_range
from pytest_longctx.shapes import SHAPES
from pytest_longctx.spec import CacheSpec, RopeSpec


def _spec(rope: RopeSpec, head_dim: int = 128, max_positions: int = 131072) -> CacheSpec:
    return CacheSpec(1, 4, 1, head_dim, max_positions, rope=rope)


def _base(theta: float, dim: int) -> np.ndarray:
    return np.array([theta ** (-2.0 * j / dim) for j in range(dim // 2)])


def test_default_is_theta_power() -> None:
    freqs = rope_frequencies(_spec(RopeSpec(theta=10000.0)))
    assert freqs.rotary_dim == 128 and freqs.attention_factor == 1.0
    np.testing.assert_allclose(freqs.inv_freq, _base(10000.0, 128), rtol=1e-14)
    assert freqs.inv_freq.dtype == np.float64


def test_partial_rotary_uses_rotary_dim() -> None:
    freqs = rope_frequencies(_spec(RopeSpec(theta=10000.0, rotary_dim=32)))
    assert freqs.rotary_dim == 32
    np.testing.assert_allclose(freqs.inv_freq, _base(10000.0, 32), rtol=1e-14)


def test_none_has_no_rotation() -> None:
    freqs = rope_frequencies(_spec(RopeSpec(kind="none")))
    assert freqs.rotary_dim == 0 and freqs.inv_freq.shape == (0,) and freqs.attention_factor == 1.0


def test_linear_divides_by_factor() -> None:
    freqs = rope_frequencies(_spec(RopeSpec(kind="linear", theta=10000.0, factor=4.0)))
    np.testing.assert_allclose(freqs.inv_freq, _base(10000.0, 128) / 4.0, rtol=1e-14)
    assert freqs.attention_factor == 1.0


def test_dynamic_base_grows_as_the_formula_says() -> None:
    rope = RopeSpec(kind="dynamic", theta=10000.0, factor=2.0, original_max_positions=4096)
    grown = 10000.0 * ((2.0 * 16384 / 4096) - (2.0 - 1)) ** (128 / 126)
    freqs = rope_frequencies(_spec(rope, max_positions=16384))
    np.testing.assert_allclose(freqs.inv_freq, _base(grown, 128), rtol=1e-13)
    assert freqs.attention_factor == 1.0
    # At or below the original length the base is unchanged.
    same = rope_frequencies(_spec(rope, max_positions=4096))
    np.testing.assert_allclose(same.inv_freq, _base(10000.0, 128), rtol=1e-13)
    smaller = rope_frequencies(_spec(rope, max_positions=1024))
    np.testing.assert_allclose(smaller.inv_freq, _base(10000.0, 128), rtol=1e-13)


def test_yarn_published_constants() -> None:
    rope = RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=32768)
    assert yarn_correction_range(rope, 128) == (23, 40)
    freqs = rope_frequencies(_spec(rope))
    assert freqs.attention_factor == pytest.approx(1.13863, abs=1e-5)
    assert freqs.attention_factor**2 == pytest.approx(1.2965, abs=1e-4)
    base = _base(1e6, 128)
    # Pairs below low extrapolate (unchanged), above high interpolate (/factor), ramp between.
    np.testing.assert_allclose(freqs.inv_freq[:24], base[:24], rtol=1e-14)
    np.testing.assert_allclose(freqs.inv_freq[40:], base[40:] / 4.0, rtol=1e-14)
    ramp = (np.arange(64) - 23) / (40 - 23)
    np.testing.assert_allclose(freqs.inv_freq[30], base[30] / 4 * ramp[30] + base[30] * (1 - ramp[30]), rtol=1e-14)


def test_yarn_explicit_attention_factor_and_mscale() -> None:
    rope = RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=32768, attention_factor=1.5)
    assert rope_frequencies(_spec(rope)).attention_factor == 1.5
    rope = RopeSpec(
        kind="yarn", theta=1e6, factor=4.0, original_max_positions=32768, mscale=1.0, mscale_all_dim=0.5
    )
    expected = (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)
    assert rope_frequencies(_spec(rope)).attention_factor == pytest.approx(expected, rel=1e-14)


def test_llama3_on_llama_3_1_8b() -> None:
    spec = SHAPES["llama-3.1-8b"]
    freqs = rope_frequencies(spec)
    base = _base(500000.0, 128)
    ratio = freqs.inv_freq / base
    unchanged = np.isclose(ratio, 1.0, rtol=1e-12)
    divided = np.isclose(ratio, 1 / 8, rtol=1e-12)
    assert (int(unchanged.sum()), int(divided.sum()), int((~unchanged & ~divided).sum())) == (29, 29, 6)
    assert freqs.attention_factor == 1.0


def test_phi3_longrope_constants() -> None:
    spec = SHAPES["phi-3-mini-128k"]
    freqs = rope_frequencies(spec)
    assert freqs.attention_factor == pytest.approx(1.190238, abs=1e-6)
    assert freqs.attention_factor**2 == pytest.approx(1.41667, abs=1e-5)
    long = np.asarray(spec.rope.long_factor)
    np.testing.assert_allclose(freqs.inv_freq, _base(10000.0, 96) / long, rtol=1e-14)


def test_longrope_picks_long_only_past_the_original_length() -> None:
    spec = SHAPES["phi-3-mini-128k"]
    short = np.asarray(spec.rope.short_factor)
    at_orig = rope_frequencies(spec.replace(max_positions=4096))
    np.testing.assert_allclose(at_orig.inv_freq, _base(10000.0, 96) / short, rtol=1e-14)
    # The preset states Phi-3's factor (131072 / 4096), so the attention factor is the model's
    # at every cache size; without a factor it follows max_positions / original.
    assert at_orig.attention_factor == pytest.approx(1.190238, abs=1e-6)
    assert rope_frequencies(spec.replace(max_positions=4096, factor=None)).attention_factor == 1.0
    long = np.asarray(spec.rope.long_factor)
    past = rope_frequencies(spec.replace(max_positions=4097))
    np.testing.assert_allclose(past.inv_freq, _base(10000.0, 96) / long, rtol=1e-14)
