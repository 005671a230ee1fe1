"""Unit tests of the measurement layer: timers, memory probes, preflight, lock, bandwidth."""

from __future__ import annotations

import ctypes
import math
import mmap
import multiprocessing
import threading
import time
import tracemalloc
from types import SimpleNamespace
from typing import List, Optional

import numpy as np
import pytest

from pytest_longctx.measure import bandwidth, lock, memory
from pytest_longctx.measure.bandwidth import Bandwidth, RooflineCache, host_bandwidth
from pytest_longctx.measure.lock import ExclusiveLock
from pytest_longctx.measure.memory import MemoryProbe, memory_available
from pytest_longctx.measure.preflight import preflight
from pytest_longctx.measure.stats import Stats
from pytest_longctx.measure.timer import timed
from pytest_longctx.measure.units import format_bytes

MiB = 1 << 20
GiB = 1 << 30


class FakeDevice:
    """A device backend whose memory counter the test moves by hand."""

    name = "fake-device"

    def __init__(self, used: int = 1000, free: Optional[int] = None) -> None:
        self.used = used
        self.free = free
        self.bandwidth_calls = 0

    def memory_in_use(self) -> Optional[int]:
        return self.used

    def memory_available(self) -> Optional[int]:
        return self.free

    def info(self) -> SimpleNamespace:
        return SimpleNamespace(device_kind="gpu")

    def bandwidth(self) -> SimpleNamespace:
        self.bandwidth_calls += 1
        return SimpleNamespace(copy_gbps=3000.0, read_gbps=2500.0)


class FakeHost:
    name = "fake-host"

    def memory_in_use(self) -> Optional[int]:
        return None


# ----------------------------------------------------------------- Stats


def test_stats_of_known_samples() -> None:
    stats = Stats.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats.n, stats.median, stats.mean, stats.min, stats.max) == (5, 3.0, 3.0, 1.0, 5.0)
    assert stats.stdev == pytest.approx(math.sqrt(2.5))
    assert stats.iqr == pytest.approx(2.0)  # quartiles 2 and 4
    assert stats.spread == pytest.approx(2.0 / 3.0)
    assert stats.as_dict() == {
        "n": 5, "median": 3.0, "mean": 3.0, "stdev": stats.stdev,
        "min": 1.0, "max": 5.0, "iqr": stats.iqr,
    }


def test_stats_single_sample_and_empty() -> None:
    stats = Stats.of([0.25])
    assert (stats.n, stats.median, stats.stdev, stats.iqr, stats.spread) == (1, 0.25, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        Stats.of([])


# ----------------------------------------------------------------- timed


def test_timed_synchronizes_before_start_and_before_stop() -> None:
    calls: List[str] = []

    def sync() -> None:
        calls.append("sync")
        if len(calls) == 3:  # the closing sync: queued device work, must be counted
            time.sleep(0.02)

    def fn() -> None:
        calls.append("fn")

    seconds = timed(fn, sync)
    assert calls == ["sync", "fn", "sync"]
    assert 0.02 <= seconds < 5.0


# ----------------------------------------------------------------- MemoryProbe


def test_probe_sees_untouched_numpy_allocation_through_tracemalloc() -> None:
    with MemoryProbe(FakeHost()) as probe:
        array = np.empty(64 * MiB, dtype=np.uint8)  # never touched: RSS does not see it
        now = probe.sample()
        assert now.traced - probe.baseline.traced >= 64 * MiB
        assert now.device is None
        assert probe.held() >= 64 * MiB
        del array
        assert probe.held() < 8 * MiB
        assert probe.peak() >= 64 * MiB


def test_probe_sees_touched_native_allocation_through_rss() -> None:
    with MemoryProbe() as probe:
        region = mmap.mmap(-1, 64 * MiB)  # native: invisible to tracemalloc
        view = (ctypes.c_char * (64 * MiB)).from_buffer(region)
        ctypes.memset(ctypes.addressof(view), 1, 64 * MiB)
        now = probe.sample()
        assert now.traced - probe.baseline.traced < 1 * MiB
        assert probe.held() >= 60 * MiB
        del view
        region.close()


def test_probe_uses_device_deltas() -> None:
    device = FakeDevice(used=1000)
    with MemoryProbe(device) as probe:
        assert probe.is_device and probe.baseline.device == 1000
        device.used += 500
        assert probe.held() == 500
        device.used += 1000
        probe.sample()
        device.used -= 1200
        assert probe.held() == 300
        assert probe.peak() == 1500
        device.used = 0
        assert probe.held() == 0  # never negative


def test_probe_stops_tracemalloc_only_if_it_started_it() -> None:
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc was started outside the test")
    with MemoryProbe():
        assert tracemalloc.is_tracing()
    assert not tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        with MemoryProbe():
            pass
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------- preflight


def test_preflight_accepts_small_sizes() -> None:
    assert preflight(1 * MiB) is None


def test_preflight_refuses_more_than_free_naming_both_numbers() -> None:
    free, place = memory_available()
    assert place == "host" and free > 0
    reason = preflight(2 * free)
    assert reason == f"needs {2 * free / GiB:.1f} GiB of host memory, {free / GiB:.1f} GiB free"


def test_preflight_message_and_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(available=int(7.1 * GiB))
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: fake)
    assert preflight(int(9.4 * GiB)) == "needs 9.4 GiB of host memory, 7.1 GiB free"
    assert preflight(int(7.0 * GiB)) == (
        "needs 7.0 GiB of host memory, 7.1 GiB free (0.7 GiB kept in reserve)"
    )
    assert preflight(int(6.0 * GiB)) is None


def test_preflight_on_a_device_backend() -> None:
    device = FakeDevice(used=0, free=8 * GiB)
    assert memory_available(device) == (8 * GiB, "gpu")
    assert preflight(10 * GiB, device) == "needs 10.0 GiB of gpu memory, 8.0 GiB free"
    assert memory_available(FakeDevice(free=None))[1] == "host"  # no figure: fall back


def test_format_bytes() -> None:
    assert format_bytes(100) == "100 B"
    assert format_bytes(12 * 1024) == "12.0 KiB"
    assert format_bytes(512 * MiB) == "512.0 MiB"
    assert format_bytes(int(1.9 * GiB)) == "1.9 GiB"
    assert format_bytes(-2048) == "-2.0 KiB"


# ----------------------------------------------------------------- ExclusiveLock


def _hold(path: str, mode: str, held, release, seconds: float) -> None:
    with getattr(ExclusiveLock(path), mode)():
        held.set()
        release.wait(seconds)


def _acquire(path: str, mode: str, started, acquired) -> None:
    started.set()
    with getattr(ExclusiveLock(path), mode)():
        acquired.set()


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


@pytest.mark.skipif(lock.fcntl is None, reason="no fcntl: the lock is a no-op")
def test_exclusive_waits_for_shared_holders(tmp_path) -> None:
    ctx, path = _context(), str(tmp_path / "lock")
    started, acquired = ctx.Event(), ctx.Event()
    with ExclusiveLock(path).shared():
        child = ctx.Process(target=_acquire, args=(path, "exclusive", started, acquired))
        child.start()
        assert started.wait(10)
        assert not acquired.wait(0.3), "exclusive was granted while a shared holder held the lock"
    assert acquired.wait(10), "exclusive was not granted after the shared holder left"
    child.join(10)
    assert child.exitcode == 0


@pytest.mark.skipif(lock.fcntl is None, reason="no fcntl: the lock is a no-op")
def test_shared_holders_coexist_and_wait_for_exclusive(tmp_path) -> None:
    ctx, path = _context(), str(tmp_path / "lock")
    held, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(path, "shared", held, release, 10))
    child.start()
    assert held.wait(10)
    started, acquired = threading.Event(), threading.Event()
    sharer = threading.Thread(target=_acquire, args=(path, "shared", started, acquired), daemon=True)
    sharer.start()
    # Granted while the other process still holds it shared (it is released only below).
    assert acquired.wait(10), "a second shared holder waited for the first"
    release.set()
    sharer.join(10)
    child.join(10)

    held, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(path, "exclusive", held, release, 10))
    child.start()
    assert held.wait(10)
    started, acquired = threading.Event(), threading.Event()
    waiter = threading.Thread(target=_acquire, args=(path, "shared", started, acquired))
    waiter.start()
    assert started.wait(10)
    assert not acquired.wait(0.3), "shared was granted while another process held it exclusively"
    release.set()
    assert acquired.wait(10), "shared was not granted after the exclusive holder left"
    waiter.join(10)
    child.join(10)


def test_lock_nests_within_one_process(tmp_path) -> None:
    """Nested holds in one process convert instead of deadlocking; run in a thread with a
    timeout, so that a regression fails here instead of hanging the run."""
    path = str(tmp_path / "lock")
    steps: List[str] = []

    def nest() -> None:
        outer, inner = ExclusiveLock(path), ExclusiveLock(path)
        with outer.shared():
            with inner.exclusive():  # same process: converts instead of deadlocking
                with outer.shared():
                    steps.append("shared in exclusive")
            with inner.shared():
                steps.append("shared in shared")
        with inner.exclusive():
            steps.append("exclusive again")

    worker = threading.Thread(target=nest, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), f"nested holds deadlocked after {steps}"
    assert steps == ["shared in exclusive", "shared in shared", "exclusive again"]


# ----------------------------------------------------------------- bandwidth


def test_host_bandwidth_is_plausible() -> None:
    found = host_bandwidth(8 * MiB, repeats=3)
    assert 0 < found.nbytes <= 8 * MiB
    assert 0.1 < found.copy_gbps < 10_000
    assert 0.1 < found.read_gbps < 10_000
    assert found.method.startswith("host numpy")


def test_the_read_probe_streams_a_buffer_of_its_own_past_the_last_level_cache() -> None:
    """Read right after the copy, the copy's source was partly cached and read 20% fast: the
    read probe has its own buffer, four times the last-level cache, and says so."""
    probe = bandwidth.HostProbe(1 * MiB)
    try:
        assert not np.shares_memory(probe._read_src, probe._src)
        assert not np.shares_memory(probe._read_src, probe._dst)
        assert probe.read_nbytes >= max(probe.nbytes, 4 * bandwidth.last_level_cache_bytes() - 4096)
        assert f"read of {probe.read_nbytes >> 20} MiB" in probe.method
        sample = probe.sample()
        assert 0.1 < sample.copy_gbps < 10_000 and 0.1 < sample.read_gbps < 10_000
    finally:
        probe.close()


def test_last_level_cache_size_falls_back_when_the_c_library_does_not_say(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bandwidth.last_level_cache_bytes() > 0

    def unknown(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(bandwidth.os, "sysconf", unknown)
    assert bandwidth.last_level_cache_bytes(default=5 * MiB) == 5 * MiB


def test_roofline_cache_prefers_the_backend_and_measures_once_per_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    host = Bandwidth(copy_gbps=20.0, read_gbps=30.0, nbytes=1, method="stub")
    monkeypatch.setattr(bandwidth, "host_bandwidth", lambda: host)
    monkeypatch.setattr(bandwidth, "host_matmul_flops", lambda: 5e9)
    cache, device = RooflineCache(), FakeDevice()
    first = cache.bandwidth("fake-device", device)
    assert (first.copy_gbps, first.read_gbps, first.method) == (3000.0, 2500.0, "fake-device.bandwidth()")
    assert cache.bandwidth("fake-device", device) is first and device.bandwidth_calls == 1
    assert cache.bandwidth("fake-host", FakeHost()) is host
    assert cache.matmul("fake-host", FakeHost()) == (5e9, "host numpy float32 matmul 1024x1024x1024, best of 3")


def test_two_selections_of_one_backend_class_get_their_own_rooflines() -> None:
    """Two GPUs are both named "cupy": the cache is keyed by the selection text, so the second
    is measured, not handed the first one's figure."""
    cache, gpu0, gpu1 = RooflineCache(), FakeDevice(), FakeDevice()
    gpu1.bandwidth = lambda: SimpleNamespace(copy_gbps=900.0, read_gbps=800.0)  # type: ignore[method-assign]
    assert gpu0.name == gpu1.name
    assert cache.bandwidth("fake-device", gpu0).copy_gbps == 3000.0
    assert cache.bandwidth("fake-device[device=1]", gpu1).copy_gbps == 900.0
    assert sorted(cache.bandwidths) == ["fake-device", "fake-device[device=1]"]


TWO_DEVICES = '''
from types import SimpleNamespace

from pytest_longctx.backends.numpy_backend import NumpyBackend


class Device(NumpyBackend):
    """The NumPy backend posing as one of two GPUs of one class: same name, own bandwidth."""

    name = "fakegpu"

    def __init__(self, device=0):
        super().__init__()
        self.device = int(device)
        self.probes = 0

    def bandwidth(self):
        self.probes += 1
        return SimpleNamespace(copy_gbps=100.0 * (self.device + 1), read_gbps=50.0 * (self.device + 1),
                               nbytes=1, method=f"probe of device {self.device}")
'''


def test_a_session_measures_each_selection_of_one_backend_class_once(pytester: pytest.Pytester) -> None:
    """Through the plugin: ``longctx_measure.bandwidth()`` of ``Device[device=1]`` is its own
    figure, probed once however many cases ask, though both backends are named "fakegpu"."""
    pytester.makepyfile(twodevices=TWO_DEVICES)
    pytester.makepyfile(test_rooflines="""
        def test_bandwidth(longctx_backend, longctx_measure):
            first = longctx_measure.bandwidth()
            assert longctx_measure.bandwidth() is first and longctx_backend.probes == 1
            assert first.method == f"probe of device {longctx_backend.device}"
            assert first.copy_gbps == 100.0 * (longctx_backend.device + 1)
    """)
    pytester.syspathinsert()
    result = pytester.runpytest("-p", "no:cacheprovider", "--longctx-backend=twodevices:Device[device=0]",
                                "--longctx-backend=twodevices:Device[device=1]", "-q", "test_rooflines.py")
    result.assert_outcomes(passed=2)
