"""Deliberately broken backends: each one defect that reached users, and the suite must catch.

``CorrectBackend`` is the minimal example's float32 NumPy backend (copied, not
imported, so that editing the example cannot weaken these tests), with its
steps split into small methods. Every broken backend overrides one of them;
its docstring names the real-world bug class it stands for (docs/questions.md
lists them). The last group misbehaves at the API
instead: wrong output shape, a factory that raises, a dtype it claims but
refuses, a device that is not there.

Name them on the command line as ``broken_backends:Float16Angles`` with this
directory on ``sys.path``.
"""

from __future__ import annotations

import dataclasses

import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from pytest_longctx import (
    BackendInfo,
    BackendUnavailable,
    CacheSpec,
    ContextLimitExceeded,
    NotSupported,
    rope_frequencies,
)

# ----------------------------------------------------------------------------- correct


class CorrectCache:
    """A float32 cache holding K rotated at absolute positions (the minimal example)."""

    alloc_factor = 1  # how many caches' worth of storage is allocated
    storage: Dict[str, Any] = {"float32": np.float32}  # kv dtype -> the NumPy type that holds it

    def __init__(self, spec: CacheSpec) -> None:
        if spec.kv_dtype not in self.storage:
            raise NotSupported(f"only {', '.join(self.storage)}, not {spec.kv_dtype}")
        self.spec, self.rope = spec, rope_frequencies(spec)
        shape = (spec.n_layers, self.alloc_factor * spec.max_positions, spec.n_kv_heads, spec.head_dim)
        dtype = self.storage[spec.kv_dtype]
        self.k, self.v = np.empty(shape, dtype), np.empty(shape, dtype)
        self.lengths = [0] * spec.n_layers

    # The steps broken backends override.

    def angles(self, start: int, n: int) -> np.ndarray:
        return np.arange(start, start + n)[:, None, None] * self.rope.inv_freq  # float64

    def style(self) -> str:
        return self.spec.rope.style

    def kv_head_of(self) -> np.ndarray:
        """For each query head, the KV head it reads."""
        return np.arange(self.spec.n_heads) // self.spec.group_size

    def visible(self, pos: np.ndarray, keys: np.ndarray) -> np.ndarray:
        window = self.spec.sliding_window
        return (keys <= pos) & ((keys > pos - window) if window else True)

    def softmax(self, scores: np.ndarray) -> np.ndarray:
        """The softmax's numerators exp(score - max), each at most 1: normalised after the sum."""
        return np.exp(scores - scores.max(-1, keepdims=True))

    def weighted_sum(self, weights: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The unnormalised output sum_k weight·V (n_q, n_heads, d), accumulated in float32."""
        return np.einsum("hqk,khd->qhd", weights, v, dtype=np.float32)

    # The contract.

    def cos_sin(self, start: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """The rotary tables of positions start .. start+n-1, the attention factor applied."""
        angles, factor = self.angles(start, n), self.rope.attention_factor
        return np.cos(angles) * factor, np.sin(angles) * factor

    def rotate(self, x: np.ndarray, start: int) -> np.ndarray:
        half = self.rope.rotary_dim // 2
        cos, sin = self.cos_sin(start, len(x))
        out = np.array(x, dtype=np.float32)
        if self.style() == "neox":
            first, second = slice(0, half), slice(half, 2 * half)
        else:
            first, second = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        a, b = x[..., first], x[..., second]
        out[..., first], out[..., second] = a * cos - b * sin, a * sin + b * cos
        return out

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        n, start = len(k), self.lengths[layer]
        if start + n > self.spec.max_positions:
            raise ContextLimitExceeded(layer, start, n, self.spec.max_positions)
        self.k[layer, start:start + n], self.v[layer, start:start + n] = self.rotate(k, start), v
        self.lengths[layer] = start + n

    def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
        s, length, n_q = self.spec, self.lengths[layer], len(q)
        q = self.rotate(q, length - n_q)
        heads = self.kv_head_of()
        k, v = self.k[layer, :length][:, heads], self.v[layer, :length][:, heads]  # (keys, n_heads, d)
        scores = np.einsum("qhd,khd->hqk", q, k) * np.float32(s.scale)
        if s.softcap:
            scores = s.softcap * np.tanh(scores / s.softcap)
        pos, keys = np.arange(length - n_q, length)[:, None], np.arange(length)[None, :]
        scores = np.where(self.visible(pos, keys), scores, -np.inf).astype(np.float32)
        weights = self.softmax(scores)  # (n_heads, n_q, keys)
        with np.errstate(over="ignore", invalid="ignore"):  # a broken step's Inf/NaN reaches the output
            return self.weighted_sum(weights, v) / weights.sum(-1, dtype=np.float32).T[..., None]

    def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.k[layer, start:stop], self.v[layer, start:stop]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def close(self) -> None:
        self.k = self.v = None


class CorrectBackend:
    """The reference-quality float32 backend every broken one departs from by one defect."""

    name = "correct"
    Cache: Any = CorrectCache
    kv_dtypes: Tuple[str, ...] = ("float32",)

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, device_kind="cpu", kv_dtypes=self.kv_dtypes)

    def open_cache(self, spec: CacheSpec) -> Any:
        return self.Cache(spec)

    asarray = to_numpy = staticmethod(np.asarray)

    def synchronize(self) -> None:
        pass

    def memory_in_use(self) -> Optional[int]:
        return None


# ----------------------------------------------------------------------------- equivalence


class Float16Angles(CorrectBackend):
    """RoPE angles computed in float16: positions and inv_freq cast before the product.

    Bug class 1 (transformers PR 29285, vLLM PR 1004, candle PR 3520): past 2048
    float16 no longer holds every integer position, and the angle's relative
    error of 2^-11 becomes radians at long positions.
    """

    name = "float16-angles"

    class Cache(CorrectCache):
        def angles(self, start: int, n: int) -> np.ndarray:
            positions = np.arange(start, start + n).astype(np.float16)
            product = positions[:, None, None] * self.rope.inv_freq.astype(np.float16)
            return product.astype(np.float64)


class Int16Positions(CorrectBackend):
    """Positions held in int16: past 32767 they wrap to -32768 and K is rotated there.

    Bug class of TPU inference PR #2756 (71 to 95% of the output "concentrated at end of
    prompt"): every position below 32768 is right, so only a cache longer than that shows it.
    """

    name = "int16-positions"

    class Cache(CorrectCache):
        def angles(self, start: int, n: int) -> np.ndarray:
            positions = np.arange(start, start + n).astype(np.int16)  # wraps modulo 2^16
            return positions[:, None, None] * self.rope.inv_freq


class SwappedPairing(CorrectBackend):
    """neox (first half with second half) and gptj (even with odd) pairing swapped.

    The rotate-half versus interleaved confusion of converted checkpoints: every
    key is rotated in the wrong planes.
    """

    name = "swapped-pairing"

    class Cache(CorrectCache):
        def style(self) -> str:
            return "gptj" if self.spec.rope.style == "neox" else "neox"


class DynamicBasePerAppend(CorrectBackend):
    """Dynamic NTK whose base follows the length at each append, not the cache's.

    The transformers versus vLLM divergence (vLLM issue 3488): transformers rescales
    the base from the current sequence length, so keys appended before the cache grew
    past original_max_positions keep the unscaled base while later ones get a larger
    one. The contract fixes the base once per cache, from its max_positions.
    """

    name = "dynamic-base-per-append"

    class Cache(CorrectCache):
        def angles(self, start: int, n: int) -> np.ndarray:
            if self.spec.rope.kind != "dynamic":
                return super().angles(start, n)
            grown = max(start + n, self.spec.rope.original_max_positions)
            inv_freq = rope_frequencies(self.spec.replace(max_positions=grown)).inv_freq
            return np.arange(start, start + n)[:, None, None] * inv_freq


class Llama3WrongFactor(CorrectBackend):
    """Llama 3 scaling with another model's factor (8 for 32, or 32 for 8).

    llama-models issue 241: Llama 3.2 1B/3B shipped with factor 32 while code written for
    3.1 assumed 8. Only the low-frequency dimensions change, so a model degrades only from
    about 80K tokens on; the angles are wrong from the first long position on, and that is
    what a kernel-level check sees.
    """

    name = "llama3-wrong-factor"

    class Cache(CorrectCache):
        def __init__(self, spec: CacheSpec) -> None:
            super().__init__(spec)
            rope = spec.rope
            if rope.kind == "llama3":
                wrong = dataclasses.replace(rope, factor=8.0 if rope.factor != 8.0 else 32.0)
                self.rope = rope_frequencies(spec.replace(rope=wrong))


class LongRopeFactorsPerAppend(CorrectBackend):
    """LongRoPE's short or long factors chosen at each append from the length so far.

    vLLM issue 27414, llama.cpp issue 24823: a prompt prefilled in chunks gets the short
    factors on the chunks that end within original_max_positions and the long ones on the
    rest. The contract fixes them once per cache, from its max_positions; a cache filled in
    one append past the original context cannot show the difference.
    """

    name = "longrope-factors-per-append"

    class Cache(CorrectCache):
        def angles(self, start: int, n: int) -> np.ndarray:
            if self.spec.rope.kind != "longrope":
                return super().angles(start, n)
            so_far = rope_frequencies(self.spec.replace(max_positions=start + n)).inv_freq
            return np.arange(start, start + n)[:, None, None] * so_far


class CorrectFloat16Cache(CorrectCache):
    """The correct cache storing K and V in float16 too; scores and sums stay float32."""

    storage = {"float32": np.float32, "float16": np.float16}


class CorrectFloat16Backend(CorrectBackend):
    """Not broken: the correct backend with a float16 cache, the one that the float16
    accumulator departs from."""

    name = "correct-float16"
    Cache: Any = CorrectFloat16Cache
    kv_dtypes = ("float32", "float16")


# Keys per block of an attention kernel: each block's sum is float32, the running total is not.
KERNEL_BLOCK = 256


class Float16OutputAccumulator(CorrectFloat16Backend):
    """For float16 caches, the unnormalised output is accumulated in float16, block by block.

    llama.cpp PR #17746, Metal PR #13975 ("overflows F16 at large context (more than 32k)"):
    random mean-zero V keeps the sum small; same-sign V drives it past float16's 65504, and
    from then on the output is Inf or NaN.
    """

    name = "float16-accumulator"

    class Cache(CorrectFloat16Cache):
        def weighted_sum(self, weights: np.ndarray, v: np.ndarray) -> np.ndarray:
            if self.spec.kv_dtype != "float16":
                return super().weighted_sum(weights, v)
            total = np.zeros((weights.shape[1], weights.shape[0], v.shape[-1]), np.float16)
            for start in range(0, v.shape[0], KERNEL_BLOCK):
                block = slice(start, start + KERNEL_BLOCK)
                part = np.einsum("hqk,khd->qhd", weights[..., block], v[block], dtype=np.float32)
                with np.errstate(over="ignore"):
                    total = (total + part).astype(np.float16)  # rounded to float16, Inf past 65504
            return total.astype(np.float32)


class WrongGQAMapping(CorrectBackend):
    """Query head h reads KV head h % n_kv_heads instead of h // group_size.

    Grouped-query attention with the repeat_kv layout confused (repeat versus
    repeat_interleave): the output stays plausible, the heads read the wrong keys.
    """

    name = "wrong-gqa"

    class Cache(CorrectCache):
        def kv_head_of(self) -> np.ndarray:
            return np.arange(self.spec.n_heads) % self.spec.n_kv_heads


class CausalOffByOne(CorrectBackend):
    """Causal mask off by one: a query also sees the next position inside a chunk.

    Chunked prefill differing from one-shot prefill (bug class 7, vLLM 5952):
    only a query with a later query in the same chunk can see the future.
    """

    name = "causal-off-by-one"

    class Cache(CorrectCache):
        def visible(self, pos: np.ndarray, keys: np.ndarray) -> np.ndarray:
            window = self.spec.sliding_window
            return (keys <= pos + 1) & ((keys > pos - window) if window else True)


class WindowOffByOne(CorrectBackend):
    """Sliding window off by one: a query sees W+1 keys (``>=`` for ``>``).

    Stale positions leaking into the output (bug class 8): the key just
    outside the window still counts.
    """

    name = "window-off-by-one"

    class Cache(CorrectCache):
        def visible(self, pos: np.ndarray, keys: np.ndarray) -> np.ndarray:
            window = self.spec.sliding_window
            return (keys <= pos) & ((keys >= pos - window) if window else True)


class NoMaxSubtraction(CorrectBackend):
    """Softmax without subtracting the maximum: exp() of a logit near 200 overflows.

    Bug class 3 (llama.cpp PR 17746, NaN perplexity at 64K): large logits turn
    into Inf/Inf = NaN in float32.
    """

    name = "no-max-subtraction"

    class Cache(CorrectCache):
        def softmax(self, scores: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                return np.exp(scores)


# ----------------------------------------------------------------------------- limits


class Paged256(CorrectBackend):
    """Not broken: a backend whose caches come in pages of 256 positions, as it says in info()."""

    name = "paged-256"

    def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, device_kind="cpu", kv_dtypes=self.kv_dtypes, position_granularity=256)


class RingBuffer(CorrectBackend):
    """A full cache wraps around and overwrites position 0 instead of raising.

    Bug class 5 and 6 (context shift corruption, llama.cpp 4097; FlashAttention
    2709): appending past capacity must fail loudly, not recycle the oldest slot.
    """

    name = "ring-buffer"

    class Cache(CorrectCache):
        def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
            n, start, size = len(k), self.lengths[layer], self.spec.max_positions
            if start + n <= size:
                return super().append(layer, k, v)
            slots = np.arange(start, start + n) % size
            self.k[layer, slots], self.v[layer, slots] = self.rotate(k, start), v
            self.lengths[layer] = size


class HalfAppliedChunk(CorrectBackend):
    """A chunk crossing the limit is half applied: what fits is stored, then it raises.

    Bug class 5: the error is loud but the cache is no longer as it was, so a
    caller that retries with a smaller chunk stores positions twice.
    """

    name = "half-applied"

    class Cache(CorrectCache):
        def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
            n, start = len(k), self.lengths[layer]
            room = self.spec.max_positions - start
            if n > room:
                if room > 0:
                    super().append(layer, k[:room], v[:room])
                raise ContextLimitExceeded(layer, start, n, self.spec.max_positions)
            super().append(layer, k, v)


# ----------------------------------------------------------------------------- memory


class DoubleAllocation(CorrectBackend):
    """Allocates twice the storage it needs (a capacity doubled 'for headroom').

    Over-reserved KV pools (bug class 4's large pools; vLLM's gpu_memory_utilization
    surprises): the cache costs twice the analytic size.
    """

    name = "double-allocation"

    class Cache(CorrectCache):
        alloc_factor = 2


class KeepsEveryInput(CorrectBackend):
    """Keeps a new buffer on every append: a copy of each pre-RoPE K chunk beside the cache.

    The cache that holds its inputs "for recomputation" (1.5x analytic): at a small
    shape the excess is smaller than a fixed slack, so only a bound that follows what the
    probe resolves catches it at every size.
    """

    name = "keeps-every-input"

    class Cache(CorrectCache):
        def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
            CorrectCache.append(self, layer, k, v)
            self.__dict__.setdefault("kept", []).append(np.array(k, dtype=np.float32))


# ----------------------------------------------------------------------------- the API


class WrongShape(CorrectBackend):
    """attend returns (n_heads, n_q, head_dim) instead of (n_q, n_heads, head_dim).

    A transposed output: the suite must say which call returned which shape,
    not crash inside its own comparison.
    """

    name = "wrong-shape"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            return super().attend(layer, q).swapaxes(0, 1)


class RaisingFactory(CorrectBackend):
    """The factory itself raises (a driver that crashes on initialisation)."""

    name = "raising-factory"

    def __init__(self) -> None:
        raise RuntimeError("driver crashed while initialising")


class ClaimsFloat16(CorrectBackend):
    """info() claims float16, which open_cache refuses with NotSupported.

    An advertised dtype that is not implemented: reported as not supported, not failed.
    """

    name = "claims-float16"
    kv_dtypes = ("float16",)


class Unavailable(CorrectBackend):
    """The factory raises BackendUnavailable (no device, driver or library here)."""

    name = "unavailable"

    def __init__(self) -> None:
        raise BackendUnavailable("no such device on this machine")


# ----------------------------------------------------------------------------- throughput


class CopyOnAppend(CorrectBackend):
    """Every append copies the whole layer into a new, longer array (np.concatenate).

    A cache grown by concatenation: per-position fill cost grows with the length,
    while at small lengths the absolute floors still pass.
    """

    name = "copy-on-append"

    class Cache(CorrectCache):
        def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
            start = self.lengths[layer]
            # The realloc-and-copy of a grown array: every position so far is copied again.
            self.k[layer, :start], self.v[layer, :start] = self.k[layer, :start].copy(), self.v[layer, :start].copy()
            CorrectCache.append(self, layer, k, v)


def _frozen(cache: CorrectCache, layer: int) -> CorrectCache:
    """A view of one layer of ``cache`` as it is now: attend on it later sees this length only."""
    view = CorrectCache.__new__(CorrectCache)
    view.spec, view.rope, view.lengths = cache.spec, cache.rope, [cache.lengths[layer]]
    view.k, view.v = cache.k[layer:layer + 1], cache.v[layer:layer + 1]
    return view


class _Lazy:
    """An attend result whose work runs only when it is converted to the host."""

    def __init__(self, work: Any) -> None:
        self.work = work

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.work()
        return out if dtype is None else out.astype(dtype)


class DeferredAttend(CorrectBackend):
    """``attend`` returns a lazy object computed on ``to_numpy``; ``synchronize`` waits for nothing.

    A lazy-evaluation runtime (or an asynchronous device whose synchronize is a no-op)
    timed without forcing the result: the timed figure measures only the queuing.
    """

    name = "deferred-attend"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> Any:
            view = _frozen(self, layer)
            return _Lazy(lambda: CorrectCache.attend(view, 0, q))


_QUEUE: List[threading.Thread] = []


class _Queued:
    """A result of queued work: ready once its worker has finished."""

    def __init__(self, worker: threading.Thread, box: Dict[str, np.ndarray]) -> None:
        self.worker, self.box = worker, box

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self.worker.join()
        out = self.box["out"]
        return out if dtype is None else out.astype(dtype)


class QueuedAttend(CorrectBackend):
    """Not broken: a GPU-like backend whose attend queues work on a worker thread and whose
    ``synchronize`` waits for it (as torch.cuda.synchronize does), so its timed figures
    include the work and must not be flagged as deferred."""

    name = "queued-attend"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> Any:
            view, box = _frozen(self, layer), {}
            worker = threading.Thread(target=lambda: box.update(out=CorrectCache.attend(view, 0, q)))
            worker.start()
            _QUEUE.append(worker)
            return _Queued(worker, box)

    def synchronize(self) -> None:
        while _QUEUE:
            _QUEUE.pop().join()


# Every defect above that is one override of CorrectCache (the rest break the factory or info).
CACHE_DEFECTS = ("Float16Angles", "Int16Positions", "SwappedPairing", "DynamicBasePerAppend",
                 "LongRopeFactorsPerAppend", "Llama3WrongFactor", "Float16OutputAccumulator", "WrongGQAMapping",
                 "CausalOffByOne",
                 "WindowOffByOne", "NoMaxSubtraction", "RingBuffer", "HalfAppliedChunk", "DoubleAllocation",
                 "KeepsEveryInput", "WrongShape", "CopyOnAppend", "DeferredAttend")
