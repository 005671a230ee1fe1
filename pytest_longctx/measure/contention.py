"""How much of the host other processes took while a timed region ran.

An absolute rate floor (positions/s, ops/s, tokens/s) judges a backend on this
host. When other processes take the cores it runs on, a correct backend misses
it: ONNX Runtime at qwen3-0.6b and 16384 positions filled at 85 positions/s
against the floor of 125 with load 14 on this 2-core machine, and cleared it
in runs with one memory-bound process beside it. Such a miss says nothing
about the backend, so the suite reports the figure with the contention and
does not judge it; the certificate then holds the floor as not shown, never
as met.

Measured with psutil: the machine's busy CPU seconds over the region minus
those of this process and its waited-for children, per wall second, in cores.
Work a backend hands to another process (a server) counts as others'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import psutil

# Other processes' use, in cores, from which a missed floor is not judged (the default of
# --longctx-contended-cores). Half a core: a quiet host's background stays far below it, one
# busy process beside the run takes a whole core.
CONTENDED_CORES = 0.5
# CPU times tick every 10 ms (USER_HZ 100), so a shorter region cannot tell half a core from none:
# below this, contention is not claimed and a missed floor is judged.
MIN_REGION_SECONDS = 0.25


def _busy(times: "psutil._common.scputimes") -> float:
    """Seconds the CPUs were not idle (iowait is idle; guest time is already in user)."""
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _own(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


@dataclass(frozen=True)
class HostShare:
    """Other processes' CPU use over a timed region."""

    seconds: float
    others_cores: float
    cores: int

    def contended(self, threshold: Optional[float] = CONTENDED_CORES) -> bool:
        """Others used at least ``threshold`` cores over a region long enough to tell; never
        when the threshold is None."""
        return (threshold is not None and self.seconds >= MIN_REGION_SECONDS
                and self.others_cores >= threshold)

    def describe(self) -> str:
        return f"other processes used {self.others_cores:.1f} of {self.cores} cores"

    def as_dict(self) -> dict:
        return {"others_cores": round(self.others_cores, 3), "cores": self.cores,
                "seconds": round(self.seconds, 6)}


class HostMeter:
    """``with HostMeter() as meter: ...`` then ``meter.share``; regions may be added up by
    entering the same meter again (the timed steps of one figure)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._seconds = self._others = 0.0
        self._start: Optional[tuple] = None

    def __enter__(self) -> "HostMeter":
        self._start = (time.monotonic(), _busy(psutil.cpu_times()), _own(self._process))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = self._start
        self._seconds += time.monotonic() - wall
        self._others += max(0.0, (_busy(psutil.cpu_times()) - busy) - (_own(self._process) - own))
        self._start = None

    @property
    def share(self) -> HostShare:
        seconds = max(self._seconds, 1e-9)
        return HostShare(self._seconds, self._others / seconds, psutil.cpu_count() or 1)
