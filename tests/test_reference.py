"""The float64 reference against naive loops, hand-computed values and its own invariances."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc

import numpy as np
import pytest

from pytest_longctx.reference import (
    apply_rope,
    attend,
    attention,
    dequantize_q4_0,
    dequantize_q8_0,
    plain_attend,
    quantize_q4_0,
    quantize_q8_0,
    rope_angles,
    roundtrip,
    stored_k,
    stored_v,
)
from pytest_longctx.rope import rope_frequencies
from pytest_longctx.spec import CacheSpec, RopeSpec

YARN = RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=32768)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- RoPE


def naive_rope(x: np.ndarray, positions: np.ndarray, spec: CacheSpec) -> np.ndarray:
    """One pair at a time with math.cos/sin on Python floats."""
    freqs = rope_frequencies(spec)
    rd, af = freqs.rotary_dim, freqs.attention_factor
    out = np.array(x, dtype=np.float64)
    for n, pos in enumerate(positions):
        for h in range(x.shape[1]):
            for j in range(rd // 2):
                i0, i1 = (j, j + rd // 2) if spec.rope.style == "neox" else (2 * j, 2 * j + 1)
                angle = float(pos) * float(freqs.inv_freq[j])
                c, s = math.cos(angle) * af, math.sin(angle) * af
                a, b = float(x[n, h, i0]), float(x[n, h, i1])
                out[n, h, i0] = a * c - b * s
                out[n, h, i1] = a * s + b * c
    return out


ROPES = {
    "default": RopeSpec(theta=10000.0),
    "partial": RopeSpec(theta=10000.0, rotary_dim=8),
    "yarn": YARN,
    "llama3": RopeSpec(
        kind="llama3", theta=500000.0, factor=8.0, original_max_positions=8192,
        low_freq_factor=1.0, high_freq_factor=4.0,
    ),
}


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_apply_rope_matches_naive_loop(style: str, rope: str) -> None:
    spec = CacheSpec(1, 3, 1, 16, 131072, rope=dataclasses.replace(ROPES[rope], style=style))
    x = _rng().standard_normal((5, 3, 16))
    positions = np.array([0, 1, 17, 4097, 131071])
    got = apply_rope(x, positions, spec)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, naive_rope(x, positions, spec), rtol=0, atol=1e-12)
    if rope == "partial":
        np.testing.assert_array_equal(got[..., 8:], x[..., 8:])
    if rope == "yarn":  # the factor is on both cos and sin: norms grow by af
        af = rope_frequencies(spec).attention_factor
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), af * np.linalg.norm(x, axis=-1), rtol=1e-13)


def test_neox_and_gptj_pair_different_elements() -> None:
    spec = CacheSpec(1, 1, 1, 4, 16, rope=RopeSpec(theta=1.0))  # inv_freq = [1, 1]
    x = np.array([[[1.0, 0.0, 0.0, 0.0]]])
    pos = np.array([1])
    c, s = math.cos(1.0), math.sin(1.0)
    np.testing.assert_allclose(apply_rope(x, pos, spec)[0, 0], [c, 0, s, 0], atol=1e-15)
    gptj = spec.replace(style="gptj")
    np.testing.assert_allclose(apply_rope(x, pos, gptj)[0, 0], [c, s, 0, 0], atol=1e-15)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_inverse_undoes_forward(style: str) -> None:
    spec = CacheSpec(1, 4, 2, 64, 131072, rope=dataclasses.replace(YARN, style=style))
    x = _rng(1).standard_normal((64, 2, 64))
    positions = _rng(2).integers(0, 131072, size=64)
    there = apply_rope(x, positions, spec)
    np.testing.assert_allclose(apply_rope(there, positions, spec, inverse=True), x, rtol=0, atol=1e-12)
    back = apply_rope(x, positions, spec, inverse=True)
    np.testing.assert_allclose(apply_rope(back, positions, spec), x, rtol=0, atol=1e-12)


def test_rotated_dot_depends_on_relative_position_only() -> None:
    spec = CacheSpec(1, 1, 1, 64, 131072, rope=YARN)
    af = rope_frequencies(spec).attention_factor
    q, k = _rng(3).standard_normal((2, 1, 1, 64))

    def dot(m: int, n: int) -> float:
        return float(np.sum(apply_rope(q, np.array([m]), spec) * apply_rope(k, np.array([n]), spec)))

    assert dot(100, 37) == pytest.approx(dot(120000, 119937), rel=1e-9)
    assert dot(5000, 5000) == pytest.approx(af**2 * float(np.sum(q * k)), rel=1e-12)


def test_apply_rope_dtype_and_none() -> None:
    spec = CacheSpec(1, 2, 1, 8, 64)
    x = _rng().standard_normal((3, 2, 8))
    pos = np.arange(3)
    assert apply_rope(x, pos, spec, dtype=np.float32).dtype == np.float32
    none = apply_rope(x, pos, spec.replace(kind="none"), dtype=np.float32)
    assert none.dtype == np.float32
    np.testing.assert_array_equal(none, x.astype(np.float32))
    with pytest.raises(TypeError):
        apply_rope(x, np.array([0.0, 1.0, 2.0]), spec)


def test_rope_angles_casts_operands_first() -> None:
    inv = np.array([1.0, 0.1])
    angles = rope_angles(np.array([3, 2049]), inv, np.float16)
    assert angles.dtype == np.float16
    assert float(angles[1, 0]) == 2048.0  # float16 holds integers exactly only up to 2048
    exact = rope_angles(np.array([3, 2049]), inv)
    assert exact.dtype == np.float64 and exact[1, 1] == 2049 * 0.1


def test_float32_angle_error_grows_with_position_float16_far_worse() -> None:
    inv = rope_frequencies(CacheSpec(1, 1, 1, 128, 131072, rope=RopeSpec(theta=10000.0))).inv_freq

    def error(position: int, dtype: type) -> float:
        pos = np.arange(position - 255, position + 1)
        low = rope_angles(pos, inv, dtype).astype(np.float64)
        return float(np.abs(low - rope_angles(pos, inv)).max())

    at_4k, at_32k = error(4096, np.float32), error(32768, np.float32)
    assert 5e-5 < at_4k < 5e-4  # about 1e-4 rad
    assert 5e-4 < at_32k < 5e-3  # about 1e-3 rad
    assert at_32k > 4 * at_4k
    assert error(4096, np.float16) > 0.5 > 100 * at_4k


# ---------------------------------------------------------------- attention


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: CacheSpec) -> np.ndarray:
    """Per head, per query: the visible keys listed explicitly, softmax with max subtraction."""
    n_q, n_heads, _ = q.shape
    length = k.shape[0]
    out = np.zeros((n_q, n_heads, v.shape[2]))
    for h in range(n_heads):
        kv = h // spec.group_size
        for i in range(n_q):
            pos = length - n_q + i
            lo = max(0, pos - spec.sliding_window + 1) if spec.sliding_window else 0
            keys = np.arange(lo, pos + 1)
            scores = (k[keys, kv] @ q[i, h]) * spec.scale
            if spec.softcap:
                scores = spec.softcap * np.tanh(scores / spec.softcap)
            weights = np.exp(scores - scores.max())
            out[i, h] = (weights / weights.sum()) @ v[keys, kv]
    return out


CASES = {
    # name: (n_heads, n_kv_heads, head_dim, L, n_q, cache changes)
    "mha-decode": (4, 4, 16, 50, 1, {}),
    "gqa": (8, 2, 16, 40, 5, {}),
    "mqa": (4, 1, 16, 33, 3, {}),
    "window": (8, 2, 16, 60, 12, {"sliding_window": 7}),
    "window-prefill": (4, 2, 16, 30, 30, {"sliding_window": 5}),
    "softcap": (4, 2, 16, 40, 6, {"softcap": 2.0}),
    "scale": (4, 2, 16, 40, 6, {"softmax_scale": 0.9}),
    "prefill-causal": (4, 2, 16, 25, 25, {}),
    "everything": (8, 2, 32, 70, 20, {"sliding_window": 16, "softcap": 3.0, "softmax_scale": 0.4}),
}


@pytest.mark.parametrize("block", [7, 4096])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_naive_loop(case: str, block: int) -> None:
    n_heads, n_kv, d, length, n_q, changes = CASES[case]
    spec = CacheSpec(1, n_heads, n_kv, d, 4096, **changes)
    rng = _rng(4)
    q = rng.standard_normal((n_q, n_heads, d)) * 2  # large enough for softcap to bite
    k = rng.standard_normal((length, n_kv, d)) * 2
    v = rng.standard_normal((length, n_kv, d))
    got = attention(q, k, v, spec, block=block)
    assert got.dtype == np.float64 and got.shape == (n_q, n_heads, d)
    np.testing.assert_allclose(got, naive_attention(q, k, v, spec), rtol=0, atol=1e-12)


def test_softcap_and_scale_change_the_result() -> None:
    spec = CacheSpec(1, 2, 1, 16, 64)
    rng = _rng(5)
    q, k, v = rng.standard_normal((2, 2, 16)) * 3, rng.standard_normal((20, 1, 16)) * 3, rng.standard_normal((20, 1, 16))
    plain = attention(q, k, v, spec)
    assert np.abs(attention(q, k, v, spec.replace(softcap=1.0)) - plain).max() > 1e-3
    assert np.abs(attention(q, k, v, spec.replace(softmax_scale=0.05)) - plain).max() > 1e-3


def test_gqa_reads_contiguous_groups() -> None:
    """Head h reads KV head h // group: with 8 heads on 2 KV heads, head 1 reads KV head 0, not 1."""
    spec = CacheSpec(1, 8, 2, 16, 64)
    rng = _rng(6)
    q, k, v = rng.standard_normal((3, 8, 16)), rng.standard_normal((20, 2, 16)), rng.standard_normal((20, 2, 16))
    got = attention(q, k, v, spec)
    single = CacheSpec(1, 1, 1, 16, 64)
    for h in range(8):
        kv = h // 4
        alone = attention(q[:, h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], single)
        np.testing.assert_allclose(got[:, h : h + 1], alone, rtol=0, atol=1e-14)
    wrong = attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], single)
    assert np.abs(got[:, 1:2] - wrong).max() > 1e-3


@pytest.mark.parametrize("block", [3, 4096])
def test_window_edge_sees_exactly_w_keys(block: int) -> None:
    """With V the identity, the output row is the attention weights: support is exactly p-W+1..p."""
    length, window = 16, 5
    spec = CacheSpec(1, 1, 1, length, 64, sliding_window=window)
    rng = _rng(7)
    q = rng.standard_normal((length, 1, length))
    k = rng.standard_normal((length, 1, length))
    v = np.eye(length)[:, None, :]
    weights = attention(q, k, v, spec, block=block)[:, 0]
    for pos in range(length):
        seen = np.flatnonzero(weights[pos] > 0)
        np.testing.assert_array_equal(seen, np.arange(max(0, pos - window + 1), pos + 1))
        assert weights[pos].sum() == pytest.approx(1.0, abs=1e-14)


def test_chunk_and_block_invariance() -> None:
    """Blocks of 7, 64 and 4096 keys, and query chunking (300 queries x group 4 > 1024 rows), agree."""
    spec = CacheSpec(1, 8, 2, 32, 4096, sliding_window=100, softcap=5.0)
    rng = _rng(8)
    q = rng.standard_normal((300, 8, 32))
    k = rng.standard_normal((400, 2, 32))
    v = rng.standard_normal((400, 2, 32))
    results = [attention(q, k, v, spec, block=block) for block in (7, 64, 4096)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(results[-1][-3:], naive_attention(q[-3:], k, v, spec), rtol=0, atol=1e-12)
    np.testing.assert_allclose(results[0][:2], naive_attention(q, k, v, spec)[:2], rtol=0, atol=1e-12)


def test_attention_float32_path() -> None:
    spec = CacheSpec(1, 4, 2, 16, 4096, sliding_window=50)
    rng = _rng(9)
    q, k, v = rng.standard_normal((4, 4, 16)), rng.standard_normal((200, 2, 16)), rng.standard_normal((200, 2, 16))
    low = attention(q, k, v, spec, dtype=np.float32, block=64)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, attention(q, k, v, spec), rtol=0, atol=1e-5)


def test_attend_rotates_keys_from_zero_and_queries_at_the_end() -> None:
    spec = CacheSpec(1, 4, 2, 16, 4096, rope=dataclasses.replace(YARN, style="gptj"))
    rng = _rng(10)
    q, k, v = rng.standard_normal((3, 4, 16)), rng.standard_normal((30, 2, 16)), rng.standard_normal((30, 2, 16))
    q_rot = naive_rope(q, np.arange(27, 30), spec)
    k_rot = naive_rope(k, np.arange(30), spec)
    np.testing.assert_allclose(attend(q, k, v, spec), naive_attention(q_rot, k_rot, v, spec), rtol=0, atol=1e-12)


def test_attention_rejects_bad_shapes() -> None:
    spec = CacheSpec(1, 4, 2, 16, 64)
    q, kv = np.zeros((2, 4, 16)), np.zeros((5, 2, 16))
    with pytest.raises(ValueError):
        attention(np.zeros((2, 2, 16)), kv, kv, spec)  # n_kv heads of queries
    with pytest.raises(ValueError):
        attention(q, np.zeros((5, 4, 16)), np.zeros((5, 4, 16)), spec)
    with pytest.raises(ValueError):
        attention(np.zeros((6, 4, 16)), kv, kv, spec)  # more queries than keys


def test_decode_at_128k_stays_small() -> None:
    length, d = 131072, 128
    spec = CacheSpec(1, 4, 1, d, length)
    rng = _rng(11)
    q = rng.standard_normal((1, 4, d))
    k = rng.standard_normal((length, 1, d), dtype=np.float32)
    v = rng.standard_normal((length, 1, d), dtype=np.float32)
    tracemalloc.start()
    try:
        got = attention(q, k, v, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 300e6, f"peak {peak / 1e6:.0f} MB"
    scores = (k[:, 0].astype(np.float64) @ q[0].T) * spec.scale  # dense check: (L, 4)
    weights = np.exp(scores - scores.max(axis=0))
    dense = (weights / weights.sum(axis=0)).T @ v[:, 0].astype(np.float64)
    np.testing.assert_allclose(got[0], dense, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- storage formats


def test_float16_and_float32_roundtrip() -> None:
    x = np.array([65504.0, 65520.0, 2049.0, 2051.0, 0.1])
    np.testing.assert_array_equal(roundtrip(x, "float16"), [65504.0, np.inf, 2048.0, 2052.0, np.float16(0.1)])
    assert roundtrip(x, "float32")[4] == float(np.float32(0.1))
    assert roundtrip(x, "float16").dtype == np.float64


def test_bfloat16_rounds_float32_bits_to_nearest_even() -> None:
    x = np.array([
        1 + 2**-8,  # tie between 1 and 1+2^-7: even is 1
        1 + 3 * 2**-8,  # tie between 1+2^-7 and 1+2^-6: even is 1+2^-6
        1 + 2**-8 + 2**-20,  # just above the tie: up
        -(1 + 2**-8),
        15962.0,  # bf16 holds integers exactly only to 256; steps of 64 in [8192, 16384)
        np.inf, 3.4028234663852886e38, np.nan,
    ])
    expected = [1.0, 1 + 2**-6, 1 + 2**-7, -1.0, 15936.0, np.inf, np.inf, np.nan]
    np.testing.assert_array_equal(roundtrip(x, "bfloat16"), expected)


def test_fp8_e4m3_saturates_and_rounds_to_even() -> None:
    x = np.array([448.0, 460.0, 470.0, 1e9, np.inf, -1000.0, 232.0, 1 + 1 / 16, 1 + 3 / 16,
                  0.1, 2.0**-9, 2.0**-10, 3 * 2.0**-10, -0.0, np.nan])
    expected = [448.0, 448.0, 448.0, 448.0, 448.0, -448.0, 224.0, 1.0, 1.25,
                0.1015625, 2.0**-9, 0.0, 2.0**-8, -0.0, np.nan]
    np.testing.assert_array_equal(roundtrip(x, "fp8_e4m3"), expected)
    # Every finite e4m3fn value (subnormals m*2^-9, normals (8+m)*2^(e-10)) is held exactly.
    values = [m * 2.0**-9 for m in range(8)] + [(8 + m) * 2.0 ** (e - 10) for e in range(1, 16) for m in range(8)]
    values = np.array([v for v in values if v <= 448.0])
    assert len(values) == 127 and values.max() == 448.0
    np.testing.assert_array_equal(roundtrip(values, "fp8_e4m3"), values)
    np.testing.assert_array_equal(roundtrip(-values, "fp8_e4m3"), -values)


def test_q8_0_scale_and_rounding() -> None:
    block = np.zeros(32)
    block[:3] = [1.0, -0.5, 0.25]
    d, q = quantize_q8_0(block)
    assert d.dtype == np.float16 and q.dtype == np.int8 and d.shape == (1,) and q.shape == (32,)
    assert float(d[0]) == 0.00787353515625  # 1/127 = 0.0078740157... to the nearest float16
    assert q[:3].tolist() == [127, -64, 32]  # 63.5 rounds away from zero, as C roundf
    back = roundtrip(block, "q8_0")
    assert back[0] == 127 * 0.00787353515625 == 0.99993896484375  # uses the float16 d
    # amax 127 gives d = 1 exactly: ties round away from zero.
    d, q = quantize_q8_0(np.array([127.0, 2.5, -2.5, 0.49] + [0.0] * 28))
    assert float(d[0]) == 1.0 and q[:4].tolist() == [127, 3, -3, 0]


def test_q8_0_blocks_are_independent_and_zero_stays_zero() -> None:
    x = _rng(12).standard_normal((3, 2, 64))
    x[1, 0, 32:] = 0.0
    d, q = quantize_q8_0(x)
    assert d.shape == (3, 2, 2) and q.shape == (3, 2, 64)
    assert d[1, 0, 1] == 0 and not q[1, 0, 32:].any()
    back = dequantize_q8_0(d, q)
    assert back.dtype == np.float64 and back.shape == x.shape
    np.testing.assert_array_equal(back, roundtrip(x, "q8_0"))
    assert not back[1, 0, 32:].any()
    step = d.astype(np.float64).repeat(32, axis=-1)
    assert np.all(np.abs(back - x) <= 0.5 * step + 127 * step * 2**-11)


def test_q4_0_nibble_layout_and_values() -> None:
    # q[j] = j for j < 16, q[j] = 31 - j above; x = (8 - q) * 0.5 so that x/d + 8.5 = q + 0.5.
    q = np.array(list(range(16)) + [31 - j for j in range(16, 32)])
    x = (8 - q) * 0.5  # largest magnitude is x[0] = 4.0, so d = 4 / -8 = -0.5
    d, packed = quantize_q4_0(x)
    assert d.dtype == np.float16 and float(d[0]) == -0.5
    assert packed.dtype == np.uint8 and packed.shape == (1, 16)
    assert packed[0, :3].tolist() == [0x00 | 0xF0, 0x01 | 0xE0, 0x02 | 0xD0]  # low j, high j+16
    np.testing.assert_array_equal(packed[0], np.arange(16) | ((15 - np.arange(16)) << 4))
    np.testing.assert_array_equal(dequantize_q4_0(d, packed), x)


def test_q4_0_sign_truncation_and_clip() -> None:
    x = np.zeros(32)
    x[:5] = [4.0, -4.0, 1.2, 1.3, -3.9]
    # m = +4 (first of equal magnitudes), d = -0.5; q = min(15, trunc(x/d + 8.5)).
    # -4: 16.5 -> 16 -> 15 -> -3.5 ; 1.2: 6.1 -> 6 -> 1.0 ; 1.3: 5.9 -> 5 -> 1.5 ; -3.9: 16.3 -> 15 -> -3.5
    np.testing.assert_array_equal(roundtrip(x, "q4_0")[:5], [4.0, -3.5, 1.0, 1.5, -3.5])
    y = x.copy()
    y[:2] = [-4.0, 4.0]  # now m = -4, d = 0.5, and +4 clips to 3.5
    np.testing.assert_array_equal(roundtrip(y, "q4_0")[:2], [-4.0, 3.5])
    assert not roundtrip(np.zeros((2, 32)), "q4_0").any()


def test_block_formats_need_whole_blocks() -> None:
    with pytest.raises(ValueError):
        roundtrip(np.zeros(48), "q8_0")
    with pytest.raises(ValueError):
        roundtrip(np.zeros(32), "int4")


# ---------------------------------------------------------------- plain yardstick


def test_stored_k_and_v() -> None:
    spec = CacheSpec(1, 2, 2, 32, 4096, kv_dtype="q8_0")
    rng = _rng(13)
    k, v = rng.standard_normal((10, 2, 32)), rng.standard_normal((10, 2, 32))
    pos = np.arange(10)
    expected = roundtrip(apply_rope(k, pos, spec, dtype=np.float32), "q8_0")
    np.testing.assert_array_equal(stored_k(k, pos, spec), expected)
    assert stored_k(k, pos, spec).dtype == np.float64
    np.testing.assert_array_equal(stored_v(v, spec), roundtrip(v, "q8_0"))


def test_plain_attend_is_close_to_the_truth_and_worse_with_coarser_storage() -> None:
    spec = CacheSpec(1, 4, 2, 64, 8192, kv_dtype="float32", rope=RopeSpec(theta=1e6))
    rng = _rng(14)
    q, k, v = rng.standard_normal((2, 4, 64)), rng.standard_normal((3000, 2, 64)), rng.standard_normal((3000, 2, 64))
    truth = attend(q, k, v, spec)
    errors = {}
    for kv_dtype in ("float32", "float16", "q4_0"):
        got = plain_attend(q, k, v, spec.replace(kv_dtype=kv_dtype))
        assert got.dtype == np.float64 and got.shape == truth.shape
        errors[kv_dtype] = float(np.abs(got - truth).max())
    assert errors["float32"] < 1e-4
    assert errors["float32"] < errors["float16"] < errors["q4_0"]
