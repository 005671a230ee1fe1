"""Workloads shared by the suite and the benchmark: filling a cache, device-resident inputs.

A fill records what it appended (views into a pool, no copies) so that reads can
be checked against it, and records an error instead of raising so that a test
can say at which position a backend failed.
"""

from __future__ import annotations

import statistics

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ..access.runcontrol import captured, raised
from ..protocol import KVBackend, KVCache
from ..spec import CacheSpec
from .inputs import Inputs, Pool
from .timer import timed


# Pools are larger than a CPU's last-level cache, so that inputs come from memory as a
# real model's K/V for each layer would, not from a chunk that stays cached.
POOL_BYTES = 64 << 20


def timed_pool_positions(spec: CacheSpec, positions: int, chunk: int = 512, decode: int = 128,
                         early: int = 0) -> int:
    """Positions of K/V for the pool of a timed fill: up to POOL_BYTES (at most ``positions``),
    and at least enough that no timed append gets an input twice (see ``Pool``): one slice
    of ``chunk`` per layer and chunk of the prefill-style fill, one of 1 per layer and
    position of the first ``early`` and the last ``decode`` positions."""
    per_position = 2 * spec.n_kv_heads * spec.head_dim * 4
    chunk = max(1, min(chunk, positions))
    prefill_calls = spec.n_layers * -(-max(0, positions - decode - early) // chunk)
    needed = max(prefill_calls + 2 * chunk, spec.n_layers * (decode + early) + 1)
    return max(1, min(positions, max(1024, POOL_BYTES // per_position)), needed)


def native_pool(backend: KVBackend, inputs: Inputs, spec: CacheSpec, size: int) -> Pool:
    """A pool of ``size`` positions already on the backend's device, so that moving inputs
    is never timed. Fills whose content only has to be distinct can use a small one."""
    pool = inputs.pool(spec, size)
    return Pool((backend.asarray(pool.k), backend.asarray(pool.v)), backend.asarray(pool.q_values), pool.nbytes)


@dataclass
class Fill:
    """What a fill appended to each layer, so that reads can be checked against it."""

    spec: CacheSpec
    length: int = 0  # positions appended to every filled layer
    chunks: List[Tuple[int, int, Any, Any]] = field(default_factory=list)  # (start, layer, k, v)
    error: Optional[str] = None

    def values(self, backend: KVBackend, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """The pre-RoPE K and V appended to ``layer`` at positions start .. stop-1 (float64)."""
        ks, vs = [], []
        for first, chunk_layer, k, v in self.chunks:
            lo, hi = max(start, first), min(stop, first + k.shape[0])
            if chunk_layer == layer and lo < hi:
                ks.append(np.asarray(backend.to_numpy(k[lo - first:hi - first]), dtype=np.float64))
                vs.append(np.asarray(backend.to_numpy(v[lo - first:hi - first]), dtype=np.float64))
        return np.concatenate(ks), np.concatenate(vs)


def fill(cache: KVCache, pool: Pool, layers: range, positions: int, chunk: int,
         timer: Optional[Callable[[Callable[[], None]], float]] = None,
         seconds: Optional[List[float]] = None, keep: bool = False, into: Optional[Fill] = None) -> Fill:
    """Append ``positions`` more positions in chunks to every layer in ``layers``.

    Each layer gets its own inputs from the pool. With ``timer``, each chunk
    (through all layers) is timed into ``seconds``. ``into`` continues an
    earlier fill of the same cache. Errors are recorded, not raised, so the
    tests that read the fill can say what happened at which position.
    """
    record = into if into is not None else Fill(cache.spec)
    end = record.length + positions
    while record.length < end:
        start, n = record.length, min(chunk, end - record.length)
        inputs = [(layer, *pool.kv(n)) for layer in layers]

        def step() -> None:
            for layer, k, v in inputs:
                cache.append(layer, k, v)

        with captured() as caught:
            if timer is None:
                step()
            else:
                seconds.append(timer(step))
        if caught.error is not None:
            record.error = raised(f"append of {n} at position {start}", caught.error)
            break
        if keep:
            record.chunks += [(start, layer, k, v) for layer, k, v in inputs]
        record.length = start + n
    return record


def fill_traffic(spec: CacheSpec) -> int:
    """Bytes one position moves when filled: the float32 K and V read, the stored bytes written.

    Counted like the copy probe (read + write), so the fraction of copy
    bandwidth compares like with like.
    """
    return spec.position_bytes() + 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * 4


@dataclass
class TimedFill:
    """A cache filled prefill-style then decode-style, with each step's seconds.

    ``early_seconds`` are decode-style steps at the first positions: against
    ``decode_seconds`` (the same step at the last positions of the same cache) they
    show whether an append costs more the longer the cache is.
    """

    fill: Fill
    chunk: int
    prefill_seconds: List[float] = field(default_factory=list)
    decode_seconds: List[float] = field(default_factory=list)
    early_seconds: List[float] = field(default_factory=list)
    # Seconds open_cache took (allocation and the backend's preparation of its memory), timed
    # apart: the fill is timed from its return, so a cache that prepares its pages at open is
    # not billed for them twice, and one that does not pays them in its first chunks.
    open_seconds: Optional[float] = None


def timed_fill(backend: KVBackend, cache: KVCache, pool: Pool, chunk: int, decode: int,
               early: int = 0) -> TimedFill:
    """One position at a time for the first ``early`` positions, then chunks through all
    layers to max_positions − decode, then one position at a time to max_positions."""
    spec = cache.spec

    def timer(step: Callable[[], None]) -> float:
        return timed(step, backend.synchronize)

    layers = range(spec.n_layers)
    early_seconds: List[float] = []
    record = fill(cache, pool, layers, early, 1, timer=timer, seconds=early_seconds, keep=True)
    prefill_seconds: List[float] = []
    if record.error is None:
        fill(cache, pool, layers, spec.max_positions - decode - early, chunk,
             timer=timer, seconds=prefill_seconds, keep=True, into=record)
    run = TimedFill(record, chunk, prefill_seconds, early_seconds=early_seconds)
    if record.error is None:
        fill(cache, pool, layers, decode, 1, timer=timer, seconds=run.decode_seconds, keep=True, into=record)
    return run


def time_retrieve(backend: KVBackend, cache: KVCache, rng: np.random.Generator, repeats: int,
                  batch: int = 64, samples: Optional[List[Tuple[int, int, Any]]] = None
                  ) -> Tuple[List[float], List[float]]:
    """Seconds per random single-position read (one figure per batch), and per whole-layer read
    delivered to the host (see ``delivered``).

    No (layer, position) is read twice while timed, and whole-layer reads take different
    layers while there are enough. A read may return a view; delivering it into host memory it
    owns makes the figure the cost of getting the values out, not of making a view. With
    ``samples``, one timed read of each batch, drawn at random, is kept there as (layer,
    position, result) for checking against what was appended (MLPerf TEST01's idea).
    """
    spec = cache.spec
    n = cache.length(0)
    cells = spec.n_layers * n
    picks = rng.choice(cells, size=batch * repeats, replace=cells < batch * repeats)
    batches = [(picks[i * batch:(i + 1) * batch] // n, picks[i * batch:(i + 1) * batch] % n) for i in range(repeats)]
    kept = rng.integers(batch, size=repeats)
    op_seconds = []
    for b, keep in zip(batches, kept):
        reads: List[Any] = []
        op_seconds.append(timed(lambda b=b, reads=reads: reads.extend(
            cache.read(int(layer), int(p), int(p) + 1) for layer, p in zip(*b)), backend.synchronize) / batch)
        if samples is not None:
            samples.append((int(b[0][keep]), int(b[1][keep]), reads[keep]))
    layers = rng.choice(spec.n_layers, size=repeats, replace=spec.n_layers < repeats)
    layer_seconds = [timed(lambda layer=layer: delivered(backend, cache.read(int(layer), 0, n)), backend.synchronize)
                     for layer in layers]
    return op_seconds, layer_seconds


def delivered(backend: KVBackend, arrays: Any) -> List[np.ndarray]:
    """The arrays a read returned, as host arrays that own their memory.

    Only the backend's ``to_numpy`` touches its arrays (they may be torch tensors, CuPy
    arrays or a type the suite has never seen); the suite's own copy is made only of a
    NumPy result that is a view, so that a host backend's view costs what getting the
    values out costs, and a device backend's transfer is not paid twice.
    """
    out = []
    for native in arrays:
        array = np.asarray(backend.to_numpy(native))
        out.append(array if array.flags.owndata else array.copy())
    return out


@dataclass
class TimedAttend:
    """One timed attend call: the token it belonged to, its layer, its query row, its output."""

    token: int
    layer: int
    query: int
    output: Any


def time_decode_attention(backend: KVBackend, cache: KVCache, queries: Any,
                          repeats: int) -> Tuple[List[float], List[TimedAttend]]:
    """Seconds per token (one query through every layer), after a warm-up token.

    Every call gets the next query (fresh input); returns every timed call, with its
    output, so that any of them can be checked against the reference afterwards.
    """
    spec = cache.spec
    calls = iter(range(queries.shape[0]))
    kept: List[TimedAttend] = []

    def token(number: int) -> None:
        for layer in range(spec.n_layers):
            i = next(calls)
            out = cache.attend(layer, queries[i:i + 1])
            if number >= 0:
                kept.append(TimedAttend(number, layer, i, out))

    token(-1)  # warm-up, not timed, not kept
    seconds = [timed(lambda number=number: token(number), backend.synchronize) for number in range(repeats)]
    return seconds, kept


@dataclass
class RepeatProbe:
    """Seconds of the TEST04 probe, triplet by triplet: a fresh query, the repeated one, and a
    second fresh query (the control: how much two fresh calls differ on this machine now)."""

    fresh: List[float]
    repeated: List[float]
    control: List[float]

    def speedup(self) -> float:
        """How much faster the repeated query was answered: median of per-triplet ratios."""
        return statistics.median(f / max(r, 1e-9) for f, r in zip(self.fresh, self.repeated))

    def noise(self) -> float:
        """How far apart two fresh calls were (>= 1): a speed-up up to this factor is the machine's."""
        ratio = statistics.median(f / max(c, 1e-9) for f, c in zip(self.fresh, self.control))
        return max(ratio, 1 / max(ratio, 1e-9))


def time_repeated_input(backend: KVBackend, cache: KVCache, layer: int, queries: Any,
                        triplets: int) -> RepeatProbe:
    """MLPerf TEST04's probe: attend on ``layer`` with a query already answered, each time
    beside two fresh ones, in ``triplets`` triplets whose order rotates (so that whatever a
    place in the sequence gains on a shared machine, each kind of call has it as often).
    ``queries[0]`` is the repeated one; ``queries[1:2 * triplets + 1]`` are fresh.
    """
    repeated = queries[0:1]
    cache.attend(layer, repeated)  # answered once: a cache of answers now holds it
    probe = RepeatProbe([], [], [])
    for i in range(triplets):
        calls = [(probe.fresh, queries[1 + 2 * i:2 + 2 * i]), (probe.repeated, repeated),
                 (probe.control, queries[2 + 2 * i:3 + 2 * i])]
        for seconds, query in calls[i % 3:] + calls[:i % 3]:
            seconds.append(timed(lambda query=query: cache.attend(layer, query), backend.synchronize))
    return probe


def time_conversion(backend: KVBackend, timed_results: List[Any], materialized: Any) -> Tuple[List[float], List[float]]:
    """Seconds to bring each of ``timed_results`` to the host, each paired with converting
    ``materialized`` (a native array of the same shape that surely exists).

    A result whose work was deferred past its timed region (a lazy object, or a device
    whose ``synchronize`` waits for nothing) does that work here: a conversion that costs
    much more than the materialized one's is work the timed figure did not see.
    """
    def convert(x: Any) -> Callable[[], Any]:
        return lambda: np.asarray(backend.to_numpy(x))

    pending, ready = [], []
    for result in timed_results:
        pending.append(timed(convert(result), backend.synchronize))
        ready.append(timed(convert(materialized), backend.synchronize))
    return pending, ready
