"""Statistics of repeated timings: the one summary every timed figure is reported with."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, Sequence


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
