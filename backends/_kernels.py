"""KV-cache kernels written once for any array module: numpy here, cupy for the GPU backend.

Every function takes ``xp``, the array module, and works on its arrays:
RoPE cos/sin tables and rotation, the storage codecs (float16 and bfloat16
from float32 bits, ggml's q8_0 and q4_0) and blockwise causal attention with an online
softmax. They allocate little and write into ``out`` where they can, so that a
backend can keep its scratch buffers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional, Tuple

import numpy as np

from pytest_longctx.rope import rope_frequencies
from pytest_longctx.spec import CacheSpec

Array = Any
LoadBlock = Callable[[int, int], Tuple[Array, Array]]
# scores(q, k) -> q @ k.T per head, and accumulate(p, v, acc): acc += p @ v per head.
Products = Tuple[Callable[[Array, Array], Array], Callable[[Array, Array, Array], Any]]

# Query rows (queries x heads of one group) scored against a key block at a time.
ROWS = 512
# Query rows up to which matrix-vector products beat a matrix product (no packing of K, V).
GEMV_ROWS = 2
Q8_BLOCK = 32
# float16_decode(scaled=True) gives values times 2**-HALF_EXPONENT.
HALF_EXPONENT = 112


# --- RoPE ---------------------------------------------------------------------------


def rope_rows(xp: Any, spec: CacheSpec, start: int, stop: int) -> Tuple[Array, Array]:
    """cos and sin of positions start .. stop-1, (n, rotary_dim/2) in float32, the attention
    factor folded in.

    Angles are integer positions times inv_freq in float64 and are rounded to
    float32 only after cos/sin, so the rows are as exact as float32 can hold at
    any depth. A rope of kind "none" gives rows with no columns.
    """
    freqs = rope_frequencies(spec)
    positions = xp.arange(start, stop, dtype=xp.float64)
    angles = positions[:, None] * xp.asarray(freqs.inv_freq, dtype=xp.float64)[None, :]
    factor = float(freqs.attention_factor)
    cos = (xp.cos(angles) * factor).astype(xp.float32)
    sin = (xp.sin(angles) * factor).astype(xp.float32)
    return cos, sin


class RopeTable:
    """cos/sin rows computed per block of positions on first use, the last few kept.

    Tables for every position would hold memory that grows with max_positions
    beside the cache (33 MB at 131072 positions for rotary_dim 64); appends go
    position by position through all layers, so a block is computed once.
    """

    BLOCK = 2048
    KEEP = 4

    def __init__(self, xp: Any, spec: CacheSpec) -> None:
        self._xp = xp
        self._spec = spec
        self._blocks: "OrderedDict[int, Tuple[Array, Array]]" = OrderedDict()
        # The rows of the last long append: a chunk goes through every layer at the same positions.
        self._long: Optional[Tuple[Tuple[int, int], Tuple[Array, Array]]] = None
        # The kept blocks are made at open, so a cache holds the same bytes from open to full
        # (engines build their cos/sin cache at start-up): made on first use, three more
        # blocks showed as +1.5 MiB growth while a 4.3 MiB q8_0 cache filled to 8192 positions.
        for index in range(min(self.KEEP, -(-spec.max_positions // self.BLOCK))):
            self._block(index)

    def _block(self, index: int) -> Tuple[Array, Array]:
        if index in self._blocks:
            self._blocks.move_to_end(index)
        else:
            start = index * self.BLOCK
            stop = min(start + self.BLOCK, self._spec.max_positions)
            self._blocks[index] = rope_rows(self._xp, self._spec, start, stop)
            if len(self._blocks) > self.KEEP:
                self._blocks.popitem(last=False)
        return self._blocks[index]

    def locate(self, start: int, stop: int) -> Tuple[Array, Array, int]:
        """Tables holding the rows of positions start .. stop-1 from row ``offset`` on: a kept
        block when the range lies in one (no slicing, which costs a device backend a call)."""
        first = start // self.BLOCK
        if first == max(start, stop - 1) // self.BLOCK:
            cos, sin = self._block(first)
            return cos, sin, start - first * self.BLOCK
        cos, sin = self.rows(start, stop)
        return cos, sin, 0

    def rows(self, start: int, stop: int) -> Tuple[Array, Array]:
        """cos and sin of positions start .. stop-1, as rope_rows gives them."""
        xp = self._xp
        first, last = start // self.BLOCK, max(start, stop - 1) // self.BLOCK
        if first == last:
            cos, sin = self._block(first)
            offset = first * self.BLOCK
            return cos[start - offset:stop - offset], sin[start - offset:stop - offset]
        if last - first >= self.KEEP:  # a long append: compute it, keep it for the next layer's
            if self._long is None or self._long[0] != (start, stop):
                self._long = ((start, stop), rope_rows(xp, self._spec, start, stop))
            return self._long[1]
        parts = [self._block(i) for i in range(first, last + 1)]
        offset = first * self.BLOCK
        cos = xp.concatenate([c for c, _ in parts])[start - offset:stop - offset]
        sin = xp.concatenate([s for _, s in parts])[start - offset:stop - offset]
        return cos, sin


def rotate(xp: Any, x: Array, cos: Array, sin: Array, style: str, out: Array) -> Array:
    """out = x (n, heads, d) rotated with the table rows cos, sin (n, rotary_dim/2); float32.

    x must be contiguous in its last axis and out must not alias it; elements
    past rotary_dim pass through. Each product is rounded, then the sum (no
    fused multiply-add, which NumPy's complex multiply may use), so that the
    native kernels give the same bits. gptj pairs are adjacent: out = x*[c, c]
    + swap_pairs(x)*[-s, s]. neox is the same with the halves swapped: three
    full-width passes instead of six half-width ones.
    """
    n, heads, _ = x.shape
    half = cos.shape[-1]
    rotary_dim = 2 * half
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    if rotary_dim == 0:
        return out
    x_rot, out_rot = x[..., :rotary_dim], out[..., :rotary_dim]
    if style == "gptj":
        table = xp.empty((n, 1, half, 2), dtype=xp.float32)
        table[..., 0], table[..., 1] = cos[:, None], cos[:, None]
        xp.multiply(x_rot, table.reshape(n, 1, rotary_dim), out=out_rot)
        table[..., 0], table[..., 1] = -sin[:, None], sin[:, None]
        swapped = x_rot.reshape(n, heads, half, 2)[..., ::-1]
        out_rot += (swapped * table).reshape(n, heads, rotary_dim)
        return out
    xp.multiply(x_rot, xp.concatenate([cos, cos], axis=-1)[:, None, :], out=out_rot)
    signed_sin = xp.concatenate([-sin, sin], axis=-1).reshape(n, 1, 2, half)
    swapped = x_rot.reshape(n, heads, 2, half)[:, :, ::-1]
    out_rot += (swapped * signed_sin).reshape(n, heads, rotary_dim)
    return out


# --- storage codecs -----------------------------------------------------------------


def float16_encode(xp: Any, x: Array, out: Array) -> bool:
    """IEEE half bits (uint16 ``out``) of float32 x, round to nearest even, as astype does.

    Built from elementwise passes because numpy's float16 cast is a scalar loop
    (~3 ns a value): adding c = 1.5 * 2**(E+13) rounds y to half precision's
    quantum for its exponent E (E >= -14 gives the subnormal quantum 2**-24);
    times 2**-112 puts half's exponent into float32's, so the bits shifted by
    13 are the half bits. Clipping to +-65536 makes overflow come out as inf.
    Returns whether any stored value is inf or NaN.
    """
    y = xp.clip(x, xp.float32(-65536.0), xp.float32(65536.0))
    c = xp.bitwise_and(y.view(xp.uint32), xp.uint32(0x7F800000))
    xp.clip(c, xp.uint32(113 << 23), xp.uint32(143 << 23), out=c)
    xp.add(c, xp.uint32((13 << 23) | 0x400000), out=c)
    magic = c.view(xp.float32)
    xp.add(y, magic, out=y)
    xp.subtract(y, magic, out=y)
    xp.multiply(y, xp.float32(2.0**-112), out=y)
    magnitude = xp.empty(x.shape, dtype=xp.uint16)
    xp.right_shift(y.view(xp.uint32), xp.uint32(13), out=magnitude, casting="unsafe")
    xp.bitwise_and(magnitude, xp.uint16(0x7FFF), out=magnitude)  # a NaN's shifted bits reach the sign
    sign = xp.empty(x.shape, dtype=xp.uint16)
    xp.right_shift(x.view(xp.uint32), xp.uint32(16), out=sign, casting="unsafe")
    xp.bitwise_and(sign, xp.uint16(0x8000), out=sign)
    xp.bitwise_or(magnitude, sign, out=out)
    return bool(magnitude.max() >= 0x7C00)


def float16_decode(xp: Any, bits: Array, out: Array, scaled: bool = False) -> Array:
    """float32 ``out`` of IEEE half bits (an int16 array); exact for every finite value.

    The sign-extended bits shifted by 13 hold half's sign, exponent and
    mantissa in float32's places once bits 28-30 are cleared: the value times
    2**-HALF_EXPONENT, subnormals included. ``scaled`` leaves it so (one pass
    fewer; attend_grouped takes the exponent back). Inf and NaN come out as
    finite values of magnitude 65536 to 131072: decode those with a plain cast.
    """
    word = out.view(xp.int32)
    xp.left_shift(bits, 13, out=word, dtype=xp.int32)
    xp.bitwise_and(word, xp.int32(-0x70000001), out=word)  # 0x8FFFFFFF
    if not scaled:
        xp.multiply(out, xp.float32(2.0**HALF_EXPONENT), out=out)
    return out


def bfloat16_encode(xp: Any, x: Array, out: Array) -> Array:
    """The upper 16 bits (uint16 ``out``) of float32 x, round to nearest even; NaN stays NaN."""
    bits = x.view(xp.uint32)
    rounded = xp.right_shift(bits, xp.uint32(16))
    xp.bitwise_and(rounded, xp.uint32(1), out=rounded)
    xp.add(rounded, xp.uint32(0x7FFF), out=rounded)
    xp.add(rounded, bits, out=rounded)
    xp.right_shift(rounded, xp.uint32(16), out=out, casting="unsafe")
    nan = xp.isnan(x)
    if bool(nan.any()):  # a NaN's bits can carry into the sign or vanish
        out[nan] = 0x7FC0
    return out


def bfloat16_decode(xp: Any, bits: Array, out: Array) -> Array:
    """float32 ``out`` of bfloat16 bits (a uint16 array): exact, a shift by 16."""
    xp.left_shift(bits, 16, out=out.view(xp.uint32), dtype=xp.uint32)
    return out


def q8_0_encode(xp: Any, x: Array, q_out: Array, d_out: Array) -> None:
    """ggml q8_0 of x (..., d): int8 q_out (..., d) and float16 scales d_out (..., d/32).

    d = amax/127 and q = round half away from zero of x/d with the unrounded d,
    computed in float64 like the reference quantizer so that both agree bit for bit.
    """
    blocks = x.astype(xp.float64).reshape(x.shape[:-1] + (x.shape[-1] // Q8_BLOCK, Q8_BLOCK))
    scale = xp.abs(blocks).max(axis=-1) / 127.0
    # 1/d; a scale of 0 is an all-zero block, whose values stay 0 under any finite factor.
    inverse = 1.0 / xp.maximum(scale, np.finfo(np.float64).tiny)
    scaled = blocks * inverse[..., None]
    scaled += xp.copysign(0.5, scaled)
    q_out[...] = xp.trunc(scaled).reshape(x.shape)  # the cast to int8 is exact
    d_out[...] = scale


def q8_0_decode(xp: Any, q: Array, d: Array, out: Array) -> Array:
    """float32 ``out`` (..., d) = q * d per block of 32; exact (at most 18 significant bits).

    out must be contiguous in its last axis, so that its blocks are a view of it.
    """
    out[...] = q
    blocks = out.reshape(out.shape[:-1] + (out.shape[-1] // Q8_BLOCK, Q8_BLOCK))
    xp.multiply(blocks, d.astype(xp.float32)[..., None], out=blocks)
    return out


def q4_0_encode(xp: Any, x: Array, q_out: Array, d_out: Array) -> None:
    """ggml q4_0 of x (..., d): packed nibbles q_out (..., d/2) uint8, float16 scales d_out (..., d/32).

    Per block of 32: m is the first value of largest magnitude, d = m / -8 and
    q = min(15, trunc(x/d + 8.5)) with the unrounded d, so m itself is stored
    exactly as q = 0; byte j of a block holds element j (low nibble) and j + 16
    (high nibble). Computed in float64 like the reference quantizer, bit for bit.
    """
    blocks = x.astype(xp.float64).reshape(x.shape[:-1] + (x.shape[-1] // Q8_BLOCK, Q8_BLOCK))
    first_largest = xp.argmax(xp.abs(blocks), axis=-1)[..., None]
    scale = xp.take_along_axis(blocks, first_largest, axis=-1)[..., 0] / -8.0
    zero = scale == 0  # an all-zero block: every q is 8, a value of 0
    inverse = xp.where(zero, 0.0, 1.0 / xp.where(zero, 1.0, scale))
    scaled = blocks * inverse[..., None]
    scaled += 8.5
    q = xp.clip(xp.trunc(scaled), 0.0, 15.0).astype(xp.uint8)
    half = Q8_BLOCK // 2
    q_out[...] = (q[..., :half] | (q[..., half:] << 4)).reshape(q_out.shape)
    d_out[...] = scale


def q4_0_decode(xp: Any, q: Array, d: Array, out: Array) -> Array:
    """float32 ``out`` (..., d) = (nibble - 8) * scale per block of 32; exact (at most 15
    significant bits). q (..., d/2) as q4_0_encode packs it; out contiguous in its last axis."""
    half = Q8_BLOCK // 2
    packed = q.reshape(q.shape[:-1] + (q.shape[-1] // half, half))
    blocks = out.reshape(out.shape[:-1] + (out.shape[-1] // Q8_BLOCK, Q8_BLOCK))
    blocks[..., :half] = xp.bitwise_and(packed, 0x0F)
    blocks[..., half:] = xp.right_shift(packed, 4)
    blocks -= xp.float32(8.0)
    xp.multiply(blocks, d.astype(xp.float32)[..., None], out=blocks)
    return out


# --- attention ----------------------------------------------------------------------


def visible_keys(length: int, n_q: int, window: Optional[int]) -> Tuple[int, int]:
    """The key range [lo, hi) some query of the last n_q positions of ``length`` can see."""
    lo = max(0, length - n_q - window + 1) if window else 0
    return lo, length


def group_queries(xp: Any, q: Array, n_kv_heads: int, scale: float) -> Array:
    """(n_q, n_heads, d) -> scale * q as (n_kv_heads, n_q * group, d), contiguous.

    Row i * group + g of KV head h is query i of head h * group + g, so a run of
    queries is a run of rows and each KV head's rows are one BLAS operand.
    """
    n_q, n_heads, d = q.shape
    group = n_heads // n_kv_heads
    grouped = xp.empty((n_kv_heads, n_q, group, d), dtype=xp.float32)
    grouped[...] = q.reshape(n_q, n_kv_heads, group, d).transpose(1, 0, 2, 3)
    grouped *= xp.float32(scale)
    return grouped.reshape(n_kv_heads, n_q * group, d)


def ungroup_queries(xp: Any, grouped: Array, n_q: int) -> Array:
    """The inverse layout of group_queries: (n_kv_heads, n_q * group, d) -> (n_q, n_heads, d)."""
    n_kv, rows, d = grouped.shape
    group = rows // n_q
    out = xp.empty((n_q, n_kv * group, d), dtype=xp.float32)
    out.reshape(n_q, n_kv, group, d)[...] = grouped.reshape(n_kv, n_q, group, d).transpose(1, 0, 2, 3)
    return out


def attend_grouped(
    xp: Any,
    grouped_q: Array,
    length: int,
    load: LoadBlock,
    spec: CacheSpec,
    block: int,
    exponent: int = 0,
    rows: int = ROWS,
    products: Optional[Products] = None,
) -> Array:
    """Causal attention of grouped, scaled, rotated queries over the keys ``load`` gives.

    grouped_q (h, n_q * group, d) from group_queries for h KV heads; the
    queries sit at the last n_q of ``length`` positions. load(start, stop)
    returns float32 K (rotated) and V (h, stop - start, d), both times
    2**-exponent (a decoder may skip its last pass; the scores and the softmax
    weights take the factor back, exactly). Key blocks are visited once, in
    order, and only those some query can see; each is scored against the query
    tiles that see it, with a running max and sum per row (the log-sum-exp
    merge across blocks). Returns (h, n_q * group, d) float32.

    ``products`` replaces the two matrix products, for blocks that ``load``
    gives in another form (the native kernels take K and V as stored).
    """
    n_kv, n_rows, d = grouped_q.shape
    group = spec.group_size
    n_q = n_rows // group
    first = length - n_q  # position of query 0
    window = spec.sliding_window
    lo, hi = visible_keys(length, n_q, window)
    per_tile = max(1, rows // group)
    tiles = [(a, min(a + per_tile, n_q)) for a in range(0, n_q, per_tile)]
    factor = xp.float32(2.0**exponent)
    if products is None:
        products = (
            lambda q, k: _products(xp, q, k, transpose=True),
            lambda p, v, acc: xp.add(acc, _products(xp, p, v, transpose=False), out=acc),
        )
    scores_of, accumulate = products

    run_max = xp.full((n_kv, n_rows), -np.inf, dtype=xp.float32)
    run_sum = xp.zeros((n_kv, n_rows), dtype=xp.float32)
    acc = xp.zeros((n_kv, n_rows, d), dtype=xp.float32)
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        k, v = load(start, stop)
        for a, b in tiles:
            pos_a, pos_b = first + a, first + b - 1  # first and last query position
            if start > pos_b or (window and stop - 1 < pos_a - window + 1):
                continue
            rows_ = slice(a * group, b * group)
            scores = scores_of(grouped_q[:, rows_], k)
            if exponent:
                scores *= factor
            if spec.softcap is not None:
                _softcap(xp, scores, spec.softcap)
            if stop - 1 > pos_a or (window and start < pos_b - window + 1):
                scores += _mask(xp, first + a, b - a, group, start, stop, window)
            state = (run_max[:, rows_], run_sum[:, rows_], acc[:, rows_])
            _merge(xp, scores, v, factor if exponent else None, *state, accumulate)
    acc /= run_sum[..., None]
    return acc


def _products(xp: Any, a: Array, b: Array, transpose: bool) -> Array:
    """a @ b.T (transpose) or a @ b per head, (h, r, n): matrix-vector products for few rows.

    With one or two rows, BLAS would pack the whole key block for a matrix
    product, which costs more than reading it once per row.
    """
    if a.shape[1] > GEMV_ROWS:
        return xp.matmul(a, b.transpose(0, 2, 1) if transpose else b)
    matrix = b if transpose else b.transpose(0, 2, 1)  # (h, n, d): rows of the result
    out = xp.empty((a.shape[0], a.shape[1], matrix.shape[1]), dtype=xp.float32)
    for r in range(a.shape[1]):
        out[:, r] = xp.matmul(matrix, a[:, r, :, None])[..., 0]
    return out


def _softcap(xp: Any, scores: Array, cap: float) -> None:
    """scores = cap * tanh(scores / cap), in place."""
    scores *= xp.float32(1.0 / cap)
    xp.tanh(scores, out=scores)
    scores *= xp.float32(cap)


def _mask(
    xp: Any, pos0: int, n_q: int, group: int, start: int, stop: int, window: Optional[int]
) -> Array:
    """0 where a row may see a key, -inf where not: (n_q * group, stop - start) float32."""
    row_pos = xp.repeat(xp.arange(pos0, pos0 + n_q), group)[:, None]
    key_pos = xp.arange(start, stop)[None, :]
    visible = key_pos <= row_pos
    if window:
        visible &= key_pos > row_pos - window
    return xp.where(visible, xp.float32(0.0), xp.float32(-np.inf))


def _merge(
    xp: Any,
    scores: Array,
    v: Array,
    v_factor: Optional[Any],
    run_max: Array,
    run_sum: Array,
    acc: Array,
    accumulate: Callable[[Array, Array, Array], Any],
) -> None:
    """Fold one block's scores (h, r, n) and V (h, n, d) into the running softmax state, in place.

    v_factor, when given, multiplies the weights for V only: V arrives scaled down by it.
    """
    new_max = xp.maximum(run_max, scores.max(axis=2))
    # A row that has seen no key yet keeps -inf; shift it by 0 so exp gives 0, not nan.
    shift = xp.where(new_max == -np.inf, xp.float32(0.0), new_max)
    scores -= shift[..., None]
    xp.exp(scores, out=scores)
    rescale = xp.exp(run_max - shift)
    run_sum *= rescale
    run_sum += scores.sum(axis=2)
    if v_factor is not None:
        scores *= v_factor
    acc *= rescale[..., None]
    accumulate(scores, v, acc)
    run_max[...] = new_max
