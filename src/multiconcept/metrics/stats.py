"""Error bars: mean ± standard error, and a paired difference with its 95% interval.

Evidence tables report the mean over sources × seeds with its standard error
(sample standard deviation / √n). A claim "A beats B" compares the two on the
same units (same source, prompt and seed) and reports the mean paired
difference with Student's t interval; an interval that contains zero is
written as "no measurable difference", whatever the sign of the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def _values(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


@dataclass(frozen=True)
class Estimate:
    mean: float
    sem: float | None  # None below two values
    n: int

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.sem is None else f" ± {self.sem:.{digits}f}")


def mean_sem(values: Sequence[float | None]) -> Estimate:
    v = _values(values)
    if not v:
        raise ValueError("mean_sem of no values")
    m = sum(v) / len(v)
    if len(v) < 2:
        return Estimate(m, None, len(v))
    var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
    return Estimate(m, math.sqrt(var / len(v)), len(v))


@dataclass(frozen=True)
class Difference:
    mean: float  # mean of a − b over the paired units
    low: float
    high: float
    n: int
    level: float

    @property
    def measurable(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, a: str, b: str, digits: int = 3) -> str:
        f = f"+.{digits}f"
        interval = f"{self.mean:{f}}, {self.level:.0%} interval [{self.low:{f}}, {self.high:{f}}], n {self.n}"
        if not self.measurable:
            return f"{a} vs {b}: no measurable difference ({interval})"
        return f"{a} {'above' if self.mean > 0 else 'below'} {b} ({interval})"


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> Difference:
    """Student's t interval of mean(a − b); units where either value is missing are dropped."""
    from scipy.stats import t

    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(d) < 2:
        raise ValueError(f"a paired interval needs at least two pairs, got {len(d)}")
    est = mean_sem(d)
    half = float(t.ppf(0.5 + level / 2, len(d) - 1)) * est.sem
    return Difference(est.mean, est.mean - half, est.mean + half, len(d), level)
