"""Helpers of the conformance suite: backend calls through the plugin's guard, reads, attend.

Every failure reads "{what}={measured}, but should be {expected} [{case}]" and
fits on one line; a backend that raises anything (``SystemExit`` and its own
``BaseException`` subclasses included), or returns the wrong shape or dtype,
fails the case with a diagnosis instead of a traceback into the suite. Results
are only read, never written: a read-only or non-contiguous array is legitimate.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

from pytest_longctx import CacheSpec, KVBackend, KVCache
from pytest_longctx.access.guard import call, fail, guarded
from pytest_longctx.measure.metrics import Verdict, judge
from pytest_longctx.reference import apply_rope, attention, farthest, plain_attention, plain_variants

EPS32 = float(np.finfo(np.float32).eps)


def case(backend: KVBackend, spec: CacheSpec) -> str:
    return f"{backend.name} {spec.kv_dtype} @ {spec.max_positions} positions, {spec.describe()}"


def host(backend: KVBackend, native: Any, what: str, shape: Tuple[int, ...], where: str) -> np.ndarray:
    """A backend result on the host as a float64 copy, its type, shape and dtype checked.

    NaN/Inf are left to the comparison, which names their count and first index.
    """
    __tracebackhide__ = True
    result = call(f"to_numpy({what})", lambda: np.asarray(backend.to_numpy(native)))
    if result.shape != tuple(shape):
        fail(f"{what} shape", result.shape, tuple(shape), where)
    if not np.issubdtype(result.dtype, np.floating):
        fail(f"{what} dtype", result.dtype, "a real floating type (float16, float32, float64)", where)
    return np.array(result, dtype=np.float64)  # a copy: the backend's buffer is never written


def read(backend: KVBackend, cache: KVCache, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
    spec = cache.spec
    shape = (stop - start, spec.n_kv_heads, spec.head_dim)
    where = case(backend, spec)
    pair = call(f"read(layer {layer}, {start}, {stop})", cache.read, layer, start, stop)
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        fail(f"read(layer {layer}, {start}, {stop}) result", type(pair).__name__, "a (K, V) pair", where)
    k, v = pair
    return (host(backend, k, f"read K of layer {layer}", shape, where),
            host(backend, v, f"read V of layer {layer}", shape, where))


def append(backend: KVBackend, cache: KVCache, layer: int, k: np.ndarray, v: np.ndarray, start: int) -> None:
    """Append host K/V for positions start.. to a layer; what the backend raises fails the case."""
    __tracebackhide__ = True
    native = [call("asarray", backend.asarray, x) for x in (k, v)]
    with guarded(f"append of positions {start}..{start + len(k) - 1}", where=case(backend, cache.spec)):
        cache.append(layer, *native)


def attend(backend: KVBackend, cache: KVCache, layer: int, q: np.ndarray) -> np.ndarray:
    spec = cache.spec
    native = call(f"asarray(queries for layer {layer})", backend.asarray, q)
    out = call(f"attend(layer {layer}, n_q={q.shape[0]})", cache.attend, layer, native)
    return host(backend, out, f"attend output of layer {layer}", (q.shape[0], spec.n_heads, spec.head_dim),
                case(backend, spec))


def judge_attention(got: np.ndarray, q: np.ndarray, spec: CacheSpec, k_true: np.ndarray, v_true: np.ndarray,
                    k_plains: Sequence[np.ndarray], v_plain: np.ndarray, factor: float) -> Verdict:
    """attend() output for queries at the last positions of keys 0..L-1, against the float64
    truth and the plain float32 yardstick: its envelope over ``plain_variants(spec)``
    (``k_plains``: stored K for each, from ``stored_k_variants``), each variant's queries
    rotated and its output rounded as that engine does."""
    length = k_true.shape[0]
    positions = np.arange(length - q.shape[0], length)
    truth = attention(apply_rope(q, positions, spec), k_true, v_true, spec)
    # attention() converts one key block at a time to float32; stored values are float32-exact.
    plains = [plain_attention(q, positions, k_plain, v_plain, spec, plain)
              for plain, k_plain in zip(plain_variants(spec), k_plains)]
    return equivalence(got, truth, farthest(plains, truth), factor, terms=length)


def verdict_line(verdict: Verdict, what: str, where: str) -> str:
    """A comparison's line in the suite's one shape, "{what}={measured}, but should be {expected} [{case}]"."""
    if verdict.nonfinite:
        first = f" (the first at index {verdict.where})" if verdict.where is not None else ""
        return f"{what}: NaN/Inf values={verdict.nonfinite}{first}, but should be 0 [{where}]"
    return verdict.message(what, where)  # "{what}: max|error|=..., but should be <= ..." or a malformed result's


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
