"""Causal (optionally windowed, soft-capped) GQA attention over a long KV sequence.

Exact softmax attention, computed with BLAS matmuls per KV-head group and
chunked over keys with an online (log-sum-exp) softmax, so a 131072-position
cache needs only a few blocks of scores in memory at a time. Chunking changes
results only at rounding level (~1e-16 in float64), which the tests check.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from pytest_longctx.spec import CacheSpec

from .rope import apply_rope

# Query rows (queries x heads of one group) scored against one key block at a
# time; bounds the score matrix at _ROWS x block values when n_q is large.
_ROWS = 1024


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: CacheSpec) -> None:
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"q, k, v should be 3-D, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] != spec.n_heads or q.shape[2] != spec.head_dim:
        raise ValueError(f"q should be (n_q, {spec.n_heads}, {spec.head_dim}), got {q.shape}")
    if k.shape[1:] != (spec.n_kv_heads, spec.head_dim):
        raise ValueError(f"k should be (L, {spec.n_kv_heads}, {spec.head_dim}), got {k.shape}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v should be ({k.shape[0]}, {spec.n_kv_heads}, ...), got {v.shape}")
    if not 0 < q.shape[0] <= k.shape[0]:
        raise ValueError(f"n_q={q.shape[0]} should be between 1 and L={k.shape[0]}")


def _attend_rows(
    q: np.ndarray,
    row_pos: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spec: CacheSpec,
    dtype: np.dtype,
    block: int,
) -> np.ndarray:
    """Rows q (r, d) at positions row_pos against one KV head k, v (L, d), online softmax.

    Runs only over keys some row can see; each key block is cast to ``dtype``
    on its own, so inputs stored in another precision are never copied whole.
    """
    window = spec.sliding_window
    scale = dtype.type(spec.scale)
    cap = dtype.type(spec.softcap) if spec.softcap is not None else None
    first = max(0, int(row_pos.min()) - window + 1) if window else 0
    last = int(row_pos.max()) + 1

    running_max = np.full(q.shape[0], -np.inf, dtype=dtype)
    denom = np.zeros(q.shape[0], dtype=dtype)
    acc = np.zeros((q.shape[0], v.shape[1]), dtype=dtype)
    for start in range(first, last, block):
        stop = min(start + block, last)
        kb = k[start:stop].astype(dtype)
        vb = v[start:stop].astype(dtype)
        scores = (q @ kb.T) * scale
        if cap is not None:
            scores = cap * np.tanh(scores / cap)
        key_pos = np.arange(start, stop)
        visible = key_pos[None, :] <= row_pos[:, None]
        if window:
            visible &= key_pos[None, :] >= row_pos[:, None] - window + 1
        scores = np.where(visible, scores, -np.inf)

        new_max = np.maximum(running_max, scores.max(axis=1))
        # A row that has seen no key yet keeps -inf; shift it by 0 so exp gives 0, not nan.
        shift = np.where(np.isfinite(new_max), new_max, 0).astype(dtype)
        rescale = np.exp(running_max - shift)
        weights = np.exp(scores - shift[:, None])
        denom = denom * rescale + weights.sum(axis=1)
        acc = acc * rescale[:, None] + weights @ vb
        running_max = new_max
    return acc / denom[:, None]


def attention(
    q_rot: ArrayLike,
    k_rot: ArrayLike,
    v: ArrayLike,
    spec: CacheSpec,
    *,
    dtype: DTypeLike = np.float64,
    block: int = 4096,
) -> np.ndarray:
    """Softmax attention of the last n_q positions over L cached keys.

    q_rot (n_q, n_heads, d) is already rotated; k_rot and v are (L, n_kv_heads, d).
    Query i sits at position L - n_q + i and sees keys j <= its position (and
    j >= position - W + 1 with a sliding window W). Scores are (q.k)*scale, then
    softcap c*tanh(s/c), mask, softmax, times V. Query head h reads KV head
    h // group_size. Returns (n_q, n_heads, d) in ``dtype``.
    """
    dtype = np.dtype(dtype)
    q_rot, k_rot, v = np.asarray(q_rot), np.asarray(k_rot), np.asarray(v)
    _check_shapes(q_rot, k_rot, v, spec)
    if block < 1:
        raise ValueError(f"block={block}, but should be >= 1")
    n_q, length, group = q_rot.shape[0], k_rot.shape[0], spec.group_size
    positions = np.arange(length - n_q, length)
    queries_per_chunk = max(1, _ROWS // group)

    out = np.empty((n_q, spec.n_heads, v.shape[2]), dtype=dtype)
    for kv_head in range(spec.n_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        for lo in range(0, n_q, queries_per_chunk):
            hi = min(lo + queries_per_chunk, n_q)
            # Rows ordered (query, head in group), matching reshape of (n, group, d).
            rows = q_rot[lo:hi, heads].astype(dtype).reshape((hi - lo) * group, -1)
            row_pos = np.repeat(positions[lo:hi], group)
            result = _attend_rows(rows, row_pos, k_rot[:, kv_head], v[:, kv_head], spec, dtype, block)
            out[lo:hi, heads] = result.reshape(hi - lo, group, -1)
    return out


def attend(q: ArrayLike, k: ArrayLike, v: ArrayLike, spec: CacheSpec, *, dtype: DTypeLike = np.float64) -> np.ndarray:
    """Attention for pre-RoPE inputs: K rotated at 0..L-1, q at the last n_q positions."""
    q, k = np.asarray(q), np.asarray(k)
    length, n_q = k.shape[0], q.shape[0]
    q_rot = apply_rope(q, np.arange(length - n_q, length), spec, dtype=dtype)
    k_rot = apply_rope(k, np.arange(length), spec, dtype=dtype)
    return attention(q_rot, k_rot, v, spec, dtype=dtype)
