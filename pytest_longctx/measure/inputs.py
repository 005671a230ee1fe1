"""Seeded inputs: Gaussian K/V/Q and fresh slices for timed calls.

Every draw comes from the run's seed and the test's id, so a failing case
reruns with the same values. The planted needles of the equivalence group are
the suite's (``conformance/_needles.py``): they rotate with the reference, which
the plugin does not import.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..spec import CacheSpec

# Positions where float16 stops representing integers (2048), the 4K/8K/16K boundaries
# and the powers of two past them: RoPE is checked at each that fits.
CHECK_POSITIONS = (2047, 2048, 4095, 4096, 8191, 8192, 16383, 16384, 32767, 32768, 65535, 65536, 131071)


def seed_for(seed: int, key: str) -> np.random.SeedSequence:
    """A stable per-test seed: the run's seed and the test's id."""
    return np.random.SeedSequence([seed, zlib.crc32(key.encode())])


class Inputs:
    """Seeded generators; every call draws fresh values."""

    def __init__(self, seed: int, key: str = "") -> None:
        self.rng = np.random.default_rng(seed_for(seed, key))

    def normal(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)

    def kv(self, n: int, spec: CacheSpec) -> Tuple[np.ndarray, np.ndarray]:
        return self.normal(n, spec.n_kv_heads, spec.head_dim), self.normal(n, spec.n_kv_heads, spec.head_dim)

    def q(self, n: int, spec: CacheSpec) -> np.ndarray:
        return self.normal(n, spec.n_heads, spec.head_dim)

    def pool(self, spec: CacheSpec, size: int = 4096) -> "Pool":
        return Pool(self.kv(size, spec), self.q(size, spec))


def distinct_slices(size: int, n: int) -> int:
    """How many slices of ``n`` a pool of ``size`` positions gives before one repeats: the
    largest m <= size - n + 1 coprime to n, so that offsets k·n mod m are all different."""
    if n > size:
        raise ValueError(f"pool of {size} positions cannot give {n}")
    m = size - n + 1
    while m > 1 and math.gcd(m, n) != 1:
        m -= 1
    return m


class Pool:
    """Pre-drawn K/V/Q handed out as slices, so that drawing them costs nothing inside the
    timed region and no input is handed out twice.

    Slices of one length are consecutive (fresh memory, as a model's K/V would be) and
    never repeat: the k-th slice of length n starts at k·n mod m, m coprime to n, so the
    first m slices of each length are all different. ``repeated`` counts slices handed out
    beyond that (a pool too small for its workload; ``timed_pool_positions`` sizes it).
    """

    def __init__(self, kv: Tuple[Any, Any], q: Any, nbytes: Optional[int] = None) -> None:
        self.k, self.v = kv
        self.q_values = q
        # Host bytes of K (one side): a pool moved to a backend holds arrays the suite cannot ask.
        self.nbytes = self.k.nbytes if nbytes is None else nbytes
        self._calls: Dict[Tuple[str, int], int] = {}
        self.repeated = 0

    def _offset(self, kind: str, n: int) -> int:
        m = distinct_slices(self.k.shape[0], n)
        k = self._calls.get((kind, n), 0)
        self._calls[(kind, n)] = k + 1
        if k >= m:
            self.repeated += 1
        return (k * n) % m

    def kv(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        i = self._offset("kv", n)
        return self.k[i:i + n], self.v[i:i + n]

    def q(self, n: int) -> np.ndarray:
        i = self._offset("q", n)
        return self.q_values[i:i + n]
