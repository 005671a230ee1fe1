"""Memory probes: bytes a block of code leaves held, its peak, and what is free where a
backend keeps its cache. Three observers (tracemalloc, RSS, a device allocator), each
with the slack it cannot resolve."""

from __future__ import annotations

import gc
import os
import threading
import tracemalloc
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import psutil

from ..access.runcontrol import captured


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
