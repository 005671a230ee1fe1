"""Rooflines: memory bandwidth and matrix-product rate where a backend computes.

A rate is judged as a fraction of these, so they are measured on the same host in the
same run; the per-backend figures are cached by the caller (see ``RooflineCache``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Tuple

import numpy as np
import psutil

from .timer import timed


@dataclass(frozen=True)
class Bandwidth:
    """Memory bandwidth where the cache lives: the roofline for fill and retrieve."""

    copy_gbps: float
    read_gbps: float
    nbytes: int
    method: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


_READ_ALIGN = 1024  # values per slice boundary of the parallel read (4 KiB)


class ParallelRead:
    """Streams a touched float32 buffer through ``np.max`` on every core the process may use,
    each thread a contiguous slice (NumPy's loops drop the GIL). No BLAS: OpenBLAS's workers
    keep spinning for ~0.1 s after a call, and a workload timed right after a gemv probe ran
    at 17.5 GB/s against 25 GB/s after this one (CPU decode attention, 2 cores, here)."""

    def __init__(self, src: np.ndarray) -> None:
        cores = available_cores()
        step = -(-src.size // cores // _READ_ALIGN) * _READ_ALIGN
        self._parts = [src[i:i + step] for i in range(0, src.size, step)]
        self.threads = len(self._parts)
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def __call__(self) -> None:
        if self._pool is None:  # one core, or closed
            for part in self._parts:
                np.max(part)
            return
        pending = [self._pool.submit(np.max, part) for part in self._parts[1:]]
        np.max(self._parts[0])
        for future in pending:
            future.result()

    def close(self) -> None:
        """Join the threads: a process that forks later (--longctx-isolate) should not carry
        idle threads whose locks its children would inherit."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def available_cores() -> int:
    """Cores this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, psutil.cpu_count() or 1)


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up: the least disturbed run."""
    fn()
    return min(timed(fn, _no_sync) for _ in range(max(1, repeats)))


def _no_sync() -> None:
    return None


def host_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> Bandwidth:
    """Host memory bandwidth measured with NumPy, best of ``repeats``.

    Copy counts the bytes read plus the bytes written (2 x nbytes per copy);
    read streams nbytes through ``np.add.reduce`` on one core or ``np.max`` on
    all of them (ParallelRead), whichever is faster on this host. ``nbytes`` is
    capped to 1/8 of the available memory, and at most 2 x nbytes is held.
    """
    cap = psutil.virtual_memory().available // 8
    floats = min(int(nbytes), cap) // 4 // _READ_ALIGN * _READ_ALIGN
    if floats <= 0:
        raise ValueError(f"host_bandwidth needs at least {4 * _READ_ALIGN} bytes, got {nbytes}")
    size = floats * 4
    src = np.empty(floats, dtype=np.float32)
    dst = np.empty_like(src)
    src.fill(1.0)  # touch every page so that page faults are not timed
    dst.fill(0.0)

    copy_s = _best_seconds(lambda: np.copyto(dst, src), repeats)
    del dst
    reduce_s = _best_seconds(lambda: np.add.reduce(src), repeats)
    parallel = ParallelRead(src)
    try:
        parallel_s = _best_seconds(parallel, repeats)
    finally:
        parallel.close()
    read_s, read_name = ((reduce_s, "add.reduce") if reduce_s <= parallel_s
                         else (parallel_s, f"max on {parallel.threads} threads"))
    return Bandwidth(
        copy_gbps=2 * size / copy_s / 1e9,
        read_gbps=size / read_s / 1e9,
        nbytes=size,
        method=f"host numpy: copyto, {read_name}",
    )


# The copy a fill is judged against: two touched buffers of this size, one way (the bytes
# copied per second), so a fill into prepared memory is compared with a copy between touched
# buffers. Larger than a CPU's last-level cache, small enough to probe between repeats.
PROBE_BYTES = 64 << 20


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache the C library reports (L3, else L2), or ``default``."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size and size > 0:
            return int(size)
    return default


@dataclass(frozen=True)
class Roofline:
    """One sample of the rates a workload is a fraction of: copy (one way) and streaming read."""

    copy_gbps: float
    read_gbps: float


class HostProbe:
    """Copy (one way) and streaming read of touched host buffers, cheap enough to sample
    beside every timed repeat: on a shared machine the bandwidth moves from one second to
    the next, so a fraction is taken against the sample next to it, not one from minutes ago.

    The read streams a buffer of its own, four times the last-level cache: read right
    after the copy, the copy's source was partly still cached and read 20% fast (median
    41.9 against 33.5-35.1 GB/s from memory, 30 samples each, up to 61 GB/s in a benchmark
    run, on this project's 2-core host with a 32 MiB L3)."""

    def __init__(self, nbytes: int = PROBE_BYTES) -> None:
        floats = max(_READ_ALIGN, int(nbytes) // 4 // _READ_ALIGN * _READ_ALIGN)
        self.nbytes = floats * 4
        self._src = np.ones(floats, dtype=np.float32)  # ones: touched
        self._dst = np.zeros_like(self._src)
        self._dst.fill(0.0)
        read_floats = max(floats, 4 * last_level_cache_bytes() // 4 // _READ_ALIGN * _READ_ALIGN)
        self._read_src = np.ones(read_floats, dtype=np.float32)
        self.read_nbytes = read_floats * 4
        self._read = ParallelRead(self._read_src)
        self.method = (f"host numpy: copyto between touched {self.nbytes >> 20} MiB buffers (one way), "
                       f"read of {self.read_nbytes >> 20} MiB through np.max on every core")

    def copy_gbps(self, tries: int = 2) -> float:
        return self.nbytes / min(timed(lambda: np.copyto(self._dst, self._src), _no_sync) for _ in range(tries)) / 1e9

    def read_gbps(self, tries: int = 2) -> float:
        return self.read_nbytes / min(timed(self._read, _no_sync) for _ in range(tries)) / 1e9

    def sample(self) -> Roofline:
        return Roofline(self.copy_gbps(), self.read_gbps())

    def close(self) -> None:
        self._read.close()


def measure_matmul(backend: Any) -> Tuple[float, str]:
    """FLOP/s of a large matrix product where the backend computes, and how it was measured.
    A device backend measures its own through an optional ``matmul_flops()`` (returning
    FLOP/s, or (FLOP/s, method)); any other gets the host's float32 BLAS on all its cores."""
    probe = getattr(backend, "matmul_flops", None)
    if not callable(probe):
        return host_matmul_flops(), "host numpy float32 matmul 1024x1024x1024, best of 3"
    found = probe()
    name = str(getattr(backend, "name", type(backend).__name__))
    return (float(found[0]), str(found[1])) if isinstance(found, tuple) else (float(found), f"{name}.matmul_flops()")


def host_matmul_flops(size: int = 1024, repeats: int = 3) -> float:
    a = np.ones((size, size), dtype=np.float32)
    b = np.ones((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    return 2 * size ** 3 / _best_seconds(lambda: np.matmul(a, b, out=out), repeats)


def measure_bandwidth(backend: Any) -> Bandwidth:
    """Bandwidth of the backend's memory: its own ``bandwidth()`` probe where it has one (a
    device), else ``host_bandwidth()``."""
    probe = getattr(backend, "bandwidth", None)
    if not callable(probe):
        return host_bandwidth()
    found = probe()
    if isinstance(found, Bandwidth):
        return found
    return Bandwidth(
        copy_gbps=float(found.copy_gbps),
        read_gbps=float(found.read_gbps),
        nbytes=int(getattr(found, "nbytes", 0)),
        method=str(getattr(found, "method", f"{getattr(backend, 'name', type(backend).__name__)}.bandwidth()")),
    )


@dataclass
class RooflineCache:
    """Rooflines measured once per backend selection and kept for the run (a session's state,
    or a command's own object). Keyed by the selection's full text, not the backend's name:
    ``cupy[device=1]`` and ``cupy`` are two GPUs, both named "cupy", with their own figures."""

    bandwidths: Dict[str, Bandwidth] = field(default_factory=dict)
    matmuls: Dict[str, Tuple[float, str]] = field(default_factory=dict)

    def bandwidth(self, selection: str, backend: Any) -> Bandwidth:
        if selection not in self.bandwidths:
            self.bandwidths[selection] = measure_bandwidth(backend)
        return self.bandwidths[selection]

    def matmul(self, selection: str, backend: Any) -> Tuple[float, str]:
        if selection not in self.matmuls:
            self.matmuls[selection] = measure_matmul(backend)
        return self.matmuls[selection]
