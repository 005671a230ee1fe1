"""Measurement: timers, memory probes, a bandwidth probe, preflight and a lock.

This module only measures. Statistics beyond ``Stats`` and all presentation
(tables, JSON, HTML) live elsewhere, as in pytest-benchmark, so that a worker
can report plain numbers and the controller can render them.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import psutil

from .runcontrol import captured

try:  # POSIX only; elsewhere the lock degrades to a no-op.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

GiB = 1 << 30

__all__ = [
    "Bandwidth",
    "ExclusiveLock",
    "MemoryProbe",
    "MemorySample",
    "HostProbe",
    "Roofline",
    "Stats",
    "backend_bandwidth",
    "format_bytes",
    "host_bandwidth",
    "matmul_rate",
    "memory_available",
    "preflight",
    "release_free_memory",
    "timed",
]


# --------------------------------------------------------------------------
# Statistics of repeated timings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Summary of repeated samples; the median and IQR resist a noisy host."""

    n: int
    median: float
    mean: float
    stdev: float
    min: float
    max: float
    iqr: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        """Summarise samples (at least one); stdev and IQR are 0 for a single one."""
        data = [float(x) for x in samples]
        if not data:
            raise ValueError("Stats.of needs at least one sample")
        if len(data) > 1:
            q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
            stdev, iqr = statistics.stdev(data), q3 - q1
        else:
            stdev = iqr = 0.0
        return cls(
            n=len(data),
            median=statistics.median(data),
            mean=statistics.fmean(data),
            stdev=stdev,
            min=min(data),
            max=max(data),
            iqr=iqr,
        )

    @property
    def spread(self) -> float:
        """IQR relative to the median: how much to trust the median (0 = steady)."""
        if self.median:
            return self.iqr / abs(self.median)
        return 0.0 if self.iqr == 0 else math.inf

    def as_dict(self) -> Dict[str, float]:
        """Plain data, for xdist workeroutput and JSON."""
        return asdict(self)


# --------------------------------------------------------------------------
# Timer
# --------------------------------------------------------------------------


def timed(fn: Callable[[], Any], synchronize: Callable[[], None]) -> float:
    """Seconds taken by one call of ``fn``, device work included.

    ``synchronize`` runs before the clock starts, so queued work from earlier
    is not billed to ``fn``, and before it stops, so asynchronous device work
    that ``fn`` queued is.
    """
    synchronize()
    start = time.perf_counter_ns()
    fn()
    synchronize()
    return (time.perf_counter_ns() - start) / 1e9


# --------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    """Memory bandwidth where the cache lives: the roofline for fill and retrieve."""

    copy_gbps: float
    read_gbps: float
    nbytes: int
    method: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


_BANDWIDTH: Dict[str, Bandwidth] = {}
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
        pending = [self._pool.submit(np.max, part) for part in self._parts[1:]] if self._pool else []
        np.max(self._parts[0])
        for future in pending:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


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


@dataclass(frozen=True)
class Roofline:
    """One sample of the rates a workload is a fraction of: copy (one way) and streaming read."""

    copy_gbps: float
    read_gbps: float


class HostProbe:
    """Copy (one way) and streaming read of touched host buffers, cheap enough to sample
    beside every timed repeat: on a shared machine the bandwidth moves from one second to
    the next, so a fraction is taken against the sample next to it, not one from minutes ago."""

    method = (f"host numpy: copyto between touched {PROBE_BYTES >> 20} MiB buffers (one way), "
              "read through np.max on every core")

    def __init__(self, nbytes: int = PROBE_BYTES) -> None:
        floats = max(_READ_ALIGN, int(nbytes) // 4 // _READ_ALIGN * _READ_ALIGN)
        self.nbytes = floats * 4
        self._src = np.ones(floats, dtype=np.float32)  # ones: touched
        self._dst = np.zeros_like(self._src)
        self._dst.fill(0.0)
        self._read = ParallelRead(self._src)

    def copy_gbps(self, tries: int = 2) -> float:
        return self.nbytes / min(timed(lambda: np.copyto(self._dst, self._src), _no_sync) for _ in range(tries)) / 1e9

    def read_gbps(self, tries: int = 2) -> float:
        return self.nbytes / min(timed(self._read, _no_sync) for _ in range(tries)) / 1e9

    def sample(self) -> Roofline:
        return Roofline(self.copy_gbps(), self.read_gbps())


_MATMUL: Dict[str, Tuple[float, str]] = {}


def matmul_rate(backend: Any) -> Tuple[float, str]:
    """FLOP/s of a large matrix product where the backend computes, and how it was measured;
    once per process and backend name. A device backend measures its own through an
    optional ``matmul_flops()`` (returning FLOP/s, or (FLOP/s, method)); any other gets the
    host's float32 BLAS on all its cores."""
    key = str(getattr(backend, "name", type(backend).__name__))
    if key not in _MATMUL:
        probe = getattr(backend, "matmul_flops", None)
        if callable(probe):
            found = probe()
            _MATMUL[key] = (float(found[0]), str(found[1])) if isinstance(found, tuple) else (
                float(found), f"{key}.matmul_flops()")
        else:
            _MATMUL[key] = (host_matmul_flops(), "host numpy float32 matmul 1024x1024x1024, best of 3")
    return _MATMUL[key]


def host_matmul_flops(size: int = 1024, repeats: int = 3) -> float:
    a = np.ones((size, size), dtype=np.float32)
    b = np.ones((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    return 2 * size ** 3 / _best_seconds(lambda: np.matmul(a, b, out=out), repeats)


def backend_bandwidth(backend: Any) -> Bandwidth:
    """Bandwidth of the backend's memory, measured once per process and backend name.

    A device backend measures its own memory through an optional
    ``bandwidth()`` method; any other backend gets ``host_bandwidth()``.
    """
    key = str(getattr(backend, "name", type(backend).__name__))
    cached = _BANDWIDTH.get(key)
    if cached is None:
        cached = _BANDWIDTH[key] = _measure_backend_bandwidth(backend, key)
    return cached


def _measure_backend_bandwidth(backend: Any, key: str) -> Bandwidth:
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
        method=str(getattr(found, "method", f"{key}.bandwidth()")),
    )


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    """Memory seen at one instant, by each of the three observers."""

    traced: int
    traced_peak: int
    rss: int
    device: Optional[int]


_PROCESS: Optional[psutil.Process] = None


def _rss() -> int:
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():
        _PROCESS = psutil.Process()
    return int(_PROCESS.memory_info().rss)


def _device_in_use(backend: Any) -> Optional[int]:
    if backend is None:
        return None
    used = backend.memory_in_use()
    return None if used is None else int(used)


# What each observer cannot resolve, so what a figure it made may exceed the truth by.
# Measured here (scripted: CorrectBackend's float32 cache, 2 and 8 layers x 4096 and 16384
# positions, 10 rounds each after 400 MB of heap was freed, baseline after malloc_trim):
# tracemalloc counted the KV bytes plus 0.004 to 0.022 MiB (the fill's bookkeeping); RSS
# counted them plus 1.56 to 2.44 MiB (page tables, arenas). A device allocator rounds blocks
# up (CuPy's pool and torch's caching allocator, up to 20 MiB for large blocks).
PROBE_SLACK = {"tracemalloc": 1 << 20, "RSS": 4 << 20, "device allocator": 20 << 20}


@dataclass(frozen=True)
class Held:
    """Bytes held, and the observer that saw them (it decides how precise the figure is)."""

    bytes: int
    probe: str  # a key of PROBE_SLACK

    @property
    def slack(self) -> int:
        return PROBE_SLACK[self.probe]


class MemoryProbe:
    """Bytes a block of code leaves held, and its peak, where the backend keeps them.

    Host backends are observed twice because neither observer sees everything:
    tracemalloc sees every NumPy buffer the moment it is allocated, even pages
    never touched (which RSS does not count yet), but is blind to native
    allocations (C/C++ extensions, mmap); RSS sees those once their pages are
    touched. The larger of the two deltas is the bytes held. Device backends
    report their own ``memory_in_use()``.

    Tracing slows allocation, so keep timed sections outside the probe::

        with MemoryProbe(backend) as probe:
            cache = backend.open_cache(spec)
            fill(cache)
            held = probe.held()
    """

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend
        self._started_tracing = False
        self._baseline: Optional[MemorySample] = None
        self._max_rss = 0
        self._max_device: Optional[int] = None

    def __enter__(self) -> "MemoryProbe":
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self._started_tracing = True
        # Freed heap the C allocator keeps would be reused by the cache without a page
        # fault: RSS would not see it. Hand it back first, so the baseline is what is in use.
        release_free_memory()
        self._max_rss, self._max_device = 0, None
        self._baseline = self.sample()
        tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False

    @property
    def baseline(self) -> MemorySample:
        if self._baseline is None:
            raise RuntimeError("MemoryProbe is used outside its 'with' block")
        return self._baseline

    @property
    def is_device(self) -> bool:
        return self.baseline.device is not None

    def sample(self) -> MemorySample:
        """The memory now; every sample also feeds ``peak()``."""
        traced, traced_peak = (0, 0)
        if tracemalloc.is_tracing():
            traced, traced_peak = tracemalloc.get_traced_memory()
        now = MemorySample(traced, traced_peak, _rss(), _device_in_use(self.backend))
        self._max_rss = max(self._max_rss, now.rss)
        if now.device is not None:
            highest = self._max_device
            self._max_device = now.device if highest is None else max(highest, now.device)
        return now

    def held(self) -> int:
        """Bytes held now beyond the baseline (never negative)."""
        return self.held_by().bytes

    def held_by(self) -> Held:
        """Bytes held now beyond the baseline, and which observer saw them: tracemalloc's
        exact count unless RSS shows more than its own noise beyond it (memory allocated
        where tracemalloc cannot see: native code, torch, mmap). Freed temporaries the C
        allocator still holds are handed back first: they are not the cache's."""
        if self.baseline.device is None:
            release_free_memory()
        base, now = self.baseline, self.sample()
        if base.device is not None and now.device is not None:
            return Held(max(0, now.device - base.device), "device allocator")
        traced, rss = max(0, now.traced - base.traced), max(0, now.rss - base.rss)
        if rss > traced + PROBE_SLACK["RSS"]:
            return Held(rss, "RSS")
        return Held(traced, "tracemalloc")

    def peak(self) -> int:
        """Most bytes held at once since the baseline.

        Host: the tracemalloc peak, or the largest sampled RSS, or held now.
        Device: the largest sampled ``memory_in_use()`` (the device is only
        seen when sampled, so sample inside long operations for a true peak).
        """
        base, held = self.baseline, self.held()
        if base.device is not None and self._max_device is not None:
            return max(held, self._max_device - base.device)
        traced_peak = self.sample().traced_peak - base.traced
        return max(held, traced_peak, self._max_rss - base.rss)


class ProcessPeak:
    """Peak resident memory of this process over a stretch of work, above its start.

    A whole-model runtime allocates inside native code, out of tracemalloc's
    sight, and may free its scratch before returning, so RSS afterwards
    misses it. Linux keeps the high-water mark (VmHWM) and resets it to the
    current RSS when 5 is written to /proc/self/clear_refs; where that is not
    allowed a thread samples RSS every few milliseconds instead.
    """

    _STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start_rss = 0
        self._sampled = 0
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ProcessPeak":
        gc.collect()
        self.start_rss = _rss()
        if not self._reset_high_water_mark():
            self._sampled, self._stop = self.start_rss, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()

    def _reset_high_water_mark(self) -> bool:
        try:
            with open(self._CLEAR, "w") as f:
                f.write("5")
            return self._high_water_mark() is not None
        except OSError:
            return False

    def _high_water_mark(self) -> Optional[int]:
        with open(self._STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, _rss())

    @property
    def method(self) -> str:
        return "sampled RSS" if self._stop is not None else "VmHWM"

    def peak(self) -> int:
        """Highest RSS since entering, in bytes (absolute, not above the start)."""
        if self._stop is not None:
            self._sampled = max(self._sampled, _rss())
            return self._sampled
        return max(self._high_water_mark() or 0, _rss())

    def growth(self) -> int:
        """Peak RSS above the RSS at entry."""
        return max(0, self.peak() - self.start_rss)


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the system (glibc
    ``malloc_trim``), so that memory a closed cache freed shows as freed: what the
    allocator merely keeps for reuse is not a leak."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: List[Any] = []


def _malloc_trim() -> Any:
    if not _TRIM:
        try:
            import ctypes

            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):  # not glibc
            _TRIM.append(None)
    return _TRIM[0]


def memory_available(backend: Any = None) -> Tuple[int, str]:
    """Bytes free where the backend's cache will live, and the name of that place.

    Device backends may offer ``memory_available()``; without it (or for host
    backends) the host's available memory is what bounds the cache.
    """
    if _device_in_use(backend) is not None:
        probe = getattr(backend, "memory_available", None)
        free = probe() if callable(probe) else None
        if free is not None:
            return int(free), _device_place(backend)
    return int(psutil.virtual_memory().available), "host"


def _device_place(backend: Any) -> str:
    with captured() as caught:  # info() is descriptive only; never fail a preflight on it
        kind = backend.info().device_kind
    if caught.error is not None:
        kind = ""
    return kind if kind and kind != "cpu" else "device"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def cache_preflight(backend: Any, spec: Any, working_bytes: int = 0) -> Optional[str]:
    """Whether a cache of ``spec`` (at max_positions) fits where it will live, beside
    ``working_bytes`` on the host; None if it fits, else the one-line reason."""
    needed = spec.kv_bytes(spec.max_positions)
    if backend.memory_in_use() is None:
        return preflight(needed + working_bytes)
    return preflight(working_bytes) or preflight(needed, backend)


def preflight(
    needed: int,
    backend: Any = None,
    *,
    reserve: float = 0.10,
    reserve_bytes: int = 512 << 20,
) -> Optional[str]:
    """None if ``needed`` bytes fit with a reserve to spare, else why not, in one line.

    Called before anything large is allocated, so that a too-large case is
    skipped with a reason instead of driving the host out of memory.
    """
    available, place = memory_available(backend)
    kept = max(reserve * available, reserve_bytes)
    if needed <= available - kept:
        return None
    reason = f"needs {_gib(needed)} of {place} memory, {_gib(available)} free"
    if needed <= available:
        reason += f" ({_gib(int(kept))} kept in reserve)"
    return reason


def format_bytes(n: int) -> str:
    """Bytes in binary units with one decimal: '1.9 GiB', '512.0 MiB', '100 B'."""
    sign, size = ("-" if n < 0 else ""), abs(int(n))
    if size < 1024:
        return f"{sign}{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{sign}{value:.1f} {unit}"


# --------------------------------------------------------------------------
# Cross-process lock
# --------------------------------------------------------------------------


def _default_lock_path() -> str:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"pytest-longctx-{user}.lock")


class _LockFile:
    """One open lock file per path and process, with a stack of held modes.

    flock locks belong to an open file description, so two descriptors of the
    same file in one process would block each other; sharing one descriptor
    lets a timed (exclusive) section nest inside a shared one. Converting
    between modes is not atomic: another process may run in between.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None
        self.modes: List[int] = []

    def _strongest(self) -> int:
        return fcntl.LOCK_EX if fcntl.LOCK_EX in self.modes else fcntl.LOCK_SH

    def acquire(self, mode: int) -> None:
        before = self._strongest() if self.modes else None
        if self.fd is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self.modes.append(mode)
        after = self._strongest()
        if after != before:
            try:
                fcntl.flock(self.fd, after)
            except BaseException:  # e.g. interrupted while waiting: restore what was held
                self.modes.pop()
                self._settle(None)
                raise

    def release(self) -> None:
        before = self._strongest()
        self.modes.pop()
        self._settle(before)

    def _settle(self, before: Optional[int]) -> None:
        """Drop the file when nothing is held, else hold the strongest mode still wanted."""
        if self.fd is None:
            return
        if not self.modes:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        elif self._strongest() != before:
            fcntl.flock(self.fd, self._strongest())


_LOCK_FILES: Dict[str, _LockFile] = {}
_LOCK_FILES_GUARD = threading.Lock()


def _forget_lock_files() -> None:
    """In a forked child: the inherited descriptors share the parent's locks; drop them."""
    for held in _LOCK_FILES.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _LOCK_FILES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lock_files)


class ExclusiveLock:
    """A reader-writer lock between processes, through ``fcntl.flock`` on a file.

    Timed sections hold it exclusively so that pytest-xdist workers never
    measure against each other; every other test holds it shared, so they run
    in parallel with each other but never during a timing. Re-entrant within
    a process (an exclusive section may nest in a shared one); a no-op where
    ``fcntl`` is missing. Not meant to be shared between threads.
    """

    def __init__(self, path: "Optional[str | os.PathLike[str]]" = None) -> None:
        self.path = os.path.abspath(os.fspath(path) if path is not None else _default_lock_path())

    def _file(self) -> _LockFile:
        with _LOCK_FILES_GUARD:
            held = _LOCK_FILES.get(self.path)
            if held is None:
                held = _LOCK_FILES[self.path] = _LockFile(self.path)
            return held

    @contextlib.contextmanager
    def _hold(self, mode_name: str) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        held = self._file()
        held.acquire(getattr(fcntl, mode_name))
        try:
            yield
        finally:
            held.release()

    def shared(self) -> "contextlib.AbstractContextManager[None]":
        """Held alongside other shared holders; waits while anyone holds it exclusively."""
        return self._hold("LOCK_SH")

    def exclusive(self) -> "contextlib.AbstractContextManager[None]":
        """Held alone; waits until every shared and exclusive holder has left."""
        return self._hold("LOCK_EX")
