"""The host meter (other processes' CPU use over a timed region, in cores) and what the
throughput group does with it: a floor missed on a contended host is reported, not judged."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from pytest_longctx.measure.contention import CONTENDED_CORES, HostMeter, HostShare


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _spin_until(stop: "multiprocessing.synchronize.Event") -> None:
    while not stop.is_set():
        for _ in range(100000):
            pass


def test_own_work_is_not_counted_as_others() -> None:
    """This process spinning is its own use; what others add is whatever else runs (the test
    cannot make the host quiet, so it bounds only the part it controls: others < own + 1 core)."""
    with HostMeter() as meter:
        _spin(0.3)
    share = meter.share
    assert 0.29 <= share.seconds < 5 and share.cores >= 1
    assert share.others_cores < share.cores  # the spinning process itself is not in it


def test_another_busy_process_is_seen() -> None:
    """A second process spinning for the whole region takes about one core."""
    other = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,))
    other.start()
    try:
        time.sleep(0.5)  # started and spinning
        with HostMeter() as meter:
            time.sleep(1.0)  # this process idles; the other one spins
    finally:
        other.join()
    assert meter.share.others_cores >= 0.8, meter.share


def test_regions_add_up_and_contention_is_named() -> None:
    meter = HostMeter()
    for _ in range(2):
        with meter:
            _spin(0.05)
    assert 0.1 <= meter.share.seconds < 2
    loaded = HostShare(1.0, CONTENDED_CORES + 0.5, 2)
    assert loaded.contended() and loaded.describe() == f"other processes used {CONTENDED_CORES + 0.5:.1f} of 2 cores"
    assert not HostShare(1.0, 0.0, 2).contended() and not loaded.contended(None)
    assert not HostShare(0.01, 2.0, 2).contended()  # 10 ms ticks cannot measure a 10 ms region


SHAPE = "n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"


@pytest.mark.parametrize(("contended_from", "outcome"), [("0.5", "skipped"), ("none", "failed")])
def test_a_missed_floor_is_not_judged_on_a_contended_host(pytester: pytest.Pytester, contended_from: str,
                                                          outcome: str) -> None:
    """A fill floor no backend meets, with a process spinning on a core beside the run (qwen3's
    28 layers, so that the timed fill lasts long enough to measure contention): from
    half a core of contention on (the default) the case is skipped naming the figure and the
    contention, and the figures table says NOT JUDGED; with contention never counted (none) it
    fails, as on a quiet host."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    spinner = context.Process(target=_spin_until, args=(stop,))
    spinner.start()
    try:
        time.sleep(0.5)  # spinning before the timed region starts
        result = pytester.runpytest("--longctx-backend=cpu", "--longctx-shape=qwen3-0.6b", "--longctx-positions=4096",
                                    "--longctx-kv-dtype=float32", "--longctx-fill-floor=1e12", "-m",
                                    "longctx_throughput", "-k", "prefill_fill",
                                    f"--longctx-contended-cores={contended_from}", "-rs", "-p", "no:cacheprovider")
    finally:
        stop.set()
        spinner.join(10)
    assert result.parseoutcomes().get(outcome) == 1, result.stdout.str()
    if outcome == "skipped":
        result.stdout.fnmatch_lines(["*prefill fill*NOT JUDGED*",
                                     "*prefill-style fill (chunks of 512)=* positions/s, below >= * positions/s, "
                                     "measured while other processes used * of * cores: not judged on a contended host*"])
    else:
        result.stdout.fnmatch_lines(["*prefill fill*FAIL*"])
