"""Helpers of the conformance suite: guarded backend calls, fills, one message shape.

Every failure reads "{what}={measured}, but should be {expected} [{case}]" and
fits on one line; a backend that raises, or returns the wrong shape, fails the
case with a diagnosis instead of a traceback into the suite.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np
import pytest

from pytest_longctx import CacheSpec, KVBackend, KVCache
from pytest_longctx.metrics import Verdict, judge
from pytest_longctx.reference import apply_rope, attention

EPS32 = float(np.finfo(np.float32).eps)


def case(backend: KVBackend, spec: CacheSpec) -> str:
    return f"{backend.name} {spec.kv_dtype} @ {spec.max_positions} positions, {spec.describe()}"


def fail(what: str, measured: Any, expected: Any, where: str) -> None:
    __tracebackhide__ = True
    pytest.fail(f"{what}={measured}, but should be {expected} [{where}]", pytrace=False)


def call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call into the backend; any exception becomes a one-line failure naming the call."""
    __tracebackhide__ = True
    try:
        return fn(*args)
    except Exception as exc:
        pytest.fail(f"{what} raised {type(exc).__name__}: {exc}", pytrace=False)


def host(backend: KVBackend, native: Any, what: str, shape: Tuple[int, ...], where: str) -> np.ndarray:
    """A backend result on the host as float64, its shape and dtype checked."""
    __tracebackhide__ = True
    array = np.asarray(call(f"to_numpy({what})", backend.to_numpy, native))
    if array.shape != tuple(shape):
        fail(f"{what} shape", array.shape, tuple(shape), where)
    if not np.issubdtype(array.dtype, np.floating):
        fail(f"{what} dtype", array.dtype, "a floating type", where)
    return array.astype(np.float64)


def read(backend: KVBackend, cache: KVCache, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
    spec = cache.spec
    shape = (stop - start, spec.n_kv_heads, spec.head_dim)
    where = case(backend, spec)
    k, v = call(f"read(layer {layer}, {start}, {stop})", cache.read, layer, start, stop)
    return (host(backend, k, f"read K of layer {layer}", shape, where),
            host(backend, v, f"read V of layer {layer}", shape, where))


def attend(backend: KVBackend, cache: KVCache, layer: int, q: np.ndarray) -> np.ndarray:
    spec = cache.spec
    out = call(f"attend(layer {layer}, n_q={q.shape[0]})", cache.attend, layer, backend.asarray(q))
    return host(backend, out, f"attend output of layer {layer}", (q.shape[0], spec.n_heads, spec.head_dim),
                case(backend, spec))


def judge_attention(got: np.ndarray, q: np.ndarray, spec: CacheSpec, k_true: np.ndarray, v_true: np.ndarray,
                    k_plain: np.ndarray, v_plain: np.ndarray, factor: float) -> Verdict:
    """attend() output for queries at the last positions of keys 0..L-1, against the float64
    truth and the plain float32 yardstick (K rotated in float64 / stored as the cache stores it)."""
    length = k_true.shape[0]
    positions = np.arange(length - q.shape[0], length)
    truth = attention(apply_rope(q, positions, spec), k_true, v_true, spec)
    # attention() converts one key block at a time to float32; stored values are float32-exact.
    plain = attention(apply_rope(q, positions, spec, dtype=np.float32), k_plain, v_plain, spec, dtype=np.float32)
    return equivalence(got, truth, plain, factor, terms=length)


def equivalence(candidate: np.ndarray, reference: np.ndarray, plain: np.ndarray, factor: float,
                terms: int = 0) -> Verdict:
    """The FlashAttention-style criterion, with a floor for float32 rounding.

    The floor is (8 + sqrt(terms)) float32 ulps of the output's scale: a value
    summed over ``terms`` keys in float32 carries a rounding error that grows
    like sqrt(terms) (a random walk), whatever order a correct kernel sums in;
    the BLAS-blocked plain yardstick can be luckier than that.
    """
    scale = max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
    floor = EPS32 * (8 + np.sqrt(terms)) * scale
    return judge(candidate, reference, plain, factor=factor, floor=floor)
