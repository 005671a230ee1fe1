"""The OpenVINO graphs of the "openvino" backend, built with opset13 from a CacheSpec.

Shared pieces: RoPE in the graph from host cos/sin rows, the attention mask of
a query chunk at the end of a longer cache, and attention with GQA by
broadcasting (Q as (1, n_kv, group, n_q, d), K/V unsqueezed to (1, n_kv, 1, L, d)).
Attention is opset13 ScaledDotProductAttention with an explicit mask, or, when
the spec has a softcap (which SDPA cannot express), its math form MatMul + Tanh
+ mask + Softmax + MatMul. ``causal=True`` is never used: it aligns the
triangle top-left, so a chunk of n_q queries at the end of L keys would see
keys 0..i instead of 0..L-n_q+i.

Two model families:

- state: the cache is model state (ReadValue/Concat/Assign per K and V), one
  infer request per layer; one call appends new K/V (possibly none) and attends
  queries (possibly none) over everything held.
- static: every shape fixed at compile time, as an NPU needs. ``store`` rotates a
  chunk of ``chunk`` positions and casts it to the cache type (the host writes it
  into its cache tensors); ``attend`` takes ``TAIL`` query rows, the whole
  (1, n_kv, max_positions, d) cache tensors and the length held, and masks the
  padding past the length out entirely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

import numpy as np

from pytest_longctx.spec import CacheSpec

# Query rows an attend takes at most (the suite asks up to 16); the static attend is compiled for it.
TAIL = 16

# OpenVINO element type name of each kv dtype the backend stores.
ELEMENT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class GraphConfig:
    """What one compiled model is built for: caches of the same config share it."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int
    style: str
    window: int  # 0: none
    softcap: float  # 0.0: none
    scale: float
    kv_dtype: str

    @classmethod
    def of(cls, spec: CacheSpec) -> "GraphConfig":
        return cls(spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.rotary_dim, spec.rope.style,
                   spec.sliding_window or 0, float(spec.softcap or 0.0), float(spec.scale), spec.kv_dtype)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def attention(self) -> str:
        """Which attention the graph runs, for info() and the certificate."""
        if self.softcap:
            return "math form (MatMul+Tanh+mask+Softmax+MatMul: SDPA has no softcap)"
        return "opset13 ScaledDotProductAttention, explicit mask"


def _ops() -> Any:
    import openvino.opset13 as op

    return op


def _i64(op: Any, values: Any) -> Any:
    return op.constant(np.array(values, np.int64))


def rotate(op: Any, x: Any, cos: Any, sin: Any, config: GraphConfig) -> Any:
    """x (n, heads, d) rotated with rows cos, sin (n, rotary_dim/2), all float32; past rotary_dim
    passes through. neox pairs element j with j + rotary_dim/2, gptj pairs adjacent elements."""
    r, d = config.rotary_dim, config.head_dim
    if r == 0:
        return x
    half = r // 2
    c, s = op.unsqueeze(cos, 1), op.unsqueeze(sin, 1)  # (n, 1, half)

    def cut(start: int, stop: int, step: int = 1) -> Any:
        return op.slice(x, _i64(op, [start]), _i64(op, [stop]), _i64(op, [step]), _i64(op, [2]))

    if config.style == "gptj":
        even, odd = cut(0, r, 2), cut(1, r, 2)  # (n, heads, half)
        first = op.subtract(op.multiply(even, c), op.multiply(odd, s))
        second = op.add(op.multiply(even, s), op.multiply(odd, c))
        pairs = op.concat([op.unsqueeze(first, 3), op.unsqueeze(second, 3)], 3)  # (n, heads, half, 2)
        rotated = op.reshape(pairs, _i64(op, [0, 0, r]), True)
    else:
        x1, x2 = cut(0, half), cut(half, r)
        rotated = op.concat([op.subtract(op.multiply(x1, c), op.multiply(x2, s)),
                             op.add(op.multiply(x2, c), op.multiply(x1, s))], 2)
    if r == d:
        return rotated
    return op.concat([rotated, cut(r, d)], 2)


def visible(op: Any, positions: Any, length: Any, config: GraphConfig) -> Any:
    """Boolean (n_q, L): key j is visible to the query at absolute position p iff j <= p and,
    with a window W, p - j < W. ``positions`` (n_q,) and ``length`` (scalar) are int64."""
    keys = op.range(_i64(op, 0), length, _i64(op, 1), "i64")
    rows, cols = op.unsqueeze(positions, 1), op.unsqueeze(keys, 0)
    allowed = op.less_equal(cols, rows)
    if config.window:
        allowed = op.logical_and(allowed, op.less(op.subtract(rows, cols), _i64(op, config.window)))
    return allowed


def attention(op: Any, q: Any, k: Any, v: Any, allowed: Any, config: GraphConfig) -> Any:
    """q (n_q, heads, d) rotated; k, v (1, n_kv, L, d) float32; allowed (n_q, L).
    Returns (n_q, heads, d). GQA by broadcasting: no K/V is repeated per query head."""
    kv, g, d = config.n_kv_heads, config.group, config.head_dim
    q5 = op.unsqueeze(op.transpose(op.reshape(q, _i64(op, [0, kv, g, d]), True), [1, 2, 0, 3]), 0)
    k5, v5 = op.unsqueeze(k, 2), op.unsqueeze(v, 2)  # (1, n_kv, 1, L, d)
    zero, minus_inf = op.constant(np.float32(0.0)), op.constant(np.float32(-np.inf))
    mask = op.select(allowed, zero, minus_inf)  # (n_q, L), broadcast over heads
    scale = op.constant(np.float32(config.scale))
    if config.softcap:
        scores = op.multiply(op.matmul(q5, k5, False, True), scale)
        cap = op.constant(np.float32(config.softcap))
        scores = op.multiply(op.tanh(op.divide(scores, cap)), cap)
        weights = op.softmax(op.add(scores, mask), -1)
        out = op.matmul(weights, v5, False, False)
    else:
        out = op.scaled_dot_product_attention(q5, k5, v5, mask, scale, causal=False)
    # (1, n_kv, g, n_q, d) -> (n_q, heads, d)
    out = op.transpose(op.squeeze(out, _i64(op, [0])), [2, 0, 1, 3])
    return op.reshape(out, _i64(op, [0, config.n_heads, d]), True)


def _rope_inputs(op: Any, name: str, rows: Any, config: GraphConfig) -> List[Any]:
    half = config.rotary_dim // 2
    return [op.parameter([rows, half], np.float32, name=f"cos_{name}"),
            op.parameter([rows, half], np.float32, name=f"sin_{name}")] if half else []


def _rotated(op: Any, x: Any, rope: List[Any], config: GraphConfig) -> Any:
    return rotate(op, x, rope[0], rope[1], config) if rope else x


def state_model(config: GraphConfig) -> Any:
    """Inputs k, v (n, n_kv, d) pre-RoPE, q (n_q, heads, d) pre-RoPE, their cos/sin rows;
    state k_cache, v_cache (1, n_kv, L, d) in the cache type; output (n_q, heads, d).
    The new positions are appended first, so queries see them."""
    import openvino as ov

    op = _ops()
    kv, d, elem = config.n_kv_heads, config.head_dim, ELEMENT[config.kv_dtype]
    k = op.parameter([-1, kv, d], np.float32, name="k")
    v = op.parameter([-1, kv, d], np.float32, name="v")
    q = op.parameter([-1, config.n_heads, d], np.float32, name="q")
    rope_k, rope_q = _rope_inputs(op, "k", -1, config), _rope_inputs(op, "q", -1, config)
    empty = op.convert(op.constant(np.zeros((1, kv, 0, d), np.float32)), elem)
    held, sinks = [], []
    for name, new in (("k_cache", _rotated(op, k, rope_k, config)), ("v_cache", v)):
        past = op.read_value(empty, name, getattr(ov.Type, elem), [1, kv, -1, d])
        new = op.convert(op.unsqueeze(op.transpose(new, [1, 0, 2]), 0), elem)
        both = op.concat([past, new], 2)
        sinks.append(op.assign(both, name))
        held.append(both if elem == "f32" else op.convert(both, "f32"))
    length = op.gather(op.shape_of(held[0], "i64"), _i64(op, 2), _i64(op, 0))
    n_q = op.gather(op.shape_of(q, "i64"), _i64(op, 0), _i64(op, 0))
    positions = op.range(op.subtract(length, n_q), length, _i64(op, 1), "i64")
    out = attention(op, _rotated(op, q, rope_q, config), held[0], held[1],
                    visible(op, positions, length, config), config)
    return ov.Model([out.output(0)], sinks, [k, v, q, *rope_k, *rope_q], "longctx_state")


def store_model(config: GraphConfig, chunk: int) -> Any:
    """Static: k, v (chunk, n_kv, d) pre-RoPE and cos/sin rows -> K rotated and V, both as
    (n_kv, chunk, d) in the cache type, ready to be copied into the cache tensors."""
    import openvino as ov

    op = _ops()
    kv, d, elem = config.n_kv_heads, config.head_dim, ELEMENT[config.kv_dtype]
    k = op.parameter([chunk, kv, d], np.float32, name="k")
    v = op.parameter([chunk, kv, d], np.float32, name="v")
    rope = _rope_inputs(op, "k", chunk, config)
    outs = [op.convert(op.transpose(x, [1, 0, 2]), elem) for x in (_rotated(op, k, rope, config), v)]
    return ov.Model([o.output(0) for o in outs], [k, v, *rope], "longctx_store")


def attend_model(config: GraphConfig, max_positions: int) -> Any:
    """Static: q (TAIL, heads, d) pre-RoPE with its cos/sin rows, the cache tensors (1, n_kv,
    max_positions, d) in the cache type, length and n_q (int64 (1,)). Query row i sits at
    position min(length - n_q + i, length - 1) (rows past n_q are padding, read from the
    last position); keys at or past length are never visible."""
    import openvino as ov

    op = _ops()
    kv, d, elem = config.n_kv_heads, config.head_dim, ELEMENT[config.kv_dtype]
    q = op.parameter([TAIL, config.n_heads, d], np.float32, name="q")
    rope = _rope_inputs(op, "q", TAIL, config)
    caches = [op.parameter([1, kv, max_positions, d], getattr(ov.Type, elem), name=name)
              for name in ("k_cache", "v_cache")]
    length = op.parameter([1], np.int64, name="length")
    n_q = op.parameter([1], np.int64, name="n_q")
    held = [c if elem == "f32" else op.convert(c, "f32") for c in caches]
    last = op.subtract(length, _i64(op, [1]))
    rows = op.range(_i64(op, 0), _i64(op, TAIL), _i64(op, 1), "i64")
    positions = op.minimum(op.add(rows, op.subtract(length, n_q)), last)
    allowed = visible(op, positions, _i64(op, max_positions), config)
    out = attention(op, _rotated(op, q, rope, config), held[0], held[1], allowed, config)
    return ov.Model([out.output(0)], [q, *rope, *caches, length, n_q], "longctx_attend")


def executed_attention(compiled: Any) -> Tuple[str, ...]:
    """The attention-related layer types the plugin actually runs (after its own fusions or
    decompositions of SDPA), read from the runtime model."""
    kinds = set()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else node.get_type_name()
        if kind in ("ScaledDotProductAttention", "ScaledAttn", "MatMul", "Softmax", "Subgraph", "MHA"):
            kinds.add(kind)
    return tuple(sorted(kinds))
