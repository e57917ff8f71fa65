"""Uncertainty across seeds: 95% t-intervals of a mean and of a difference, and a claim's three outcomes.

A claim that compares runs is judged on an *effect* (a difference of two settings, a log-ratio, a fitted
rate, ...) measured once per seed. Its 95% interval is the Student t-interval over the seeds:

    mean ± t(0.975, n - 1) * s / sqrt(n)          (s: the sample standard deviation of the n values)

A difference of two settings is *paired* by seed when they share >= 2 seeds (the same seed gives both
the same data order and the same init stream, so the per-seed differences cancel that noise); else it
is Welch's interval (df from Welch-Satterthwaite, rounded down: conservative). One seed gives no
interval: its claims are inconclusive, never decided on one number.

The outcomes: `reproduced` (the whole interval on the claimed side of the threshold, or inside a claimed
band), `contradicted` (the whole interval on the other side, or outside the band), `inconclusive`
(the interval straddles it), and `missing` (the runs or the statistic the claim needs are not there).
No scipy: t(0.975, df) is tabled for df 1..30 (standard tables, 4 decimals) and, beyond, given by the
Cornish-Fisher expansion in 1/df (error < 1e-4 for df > 30). No torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

REPRODUCED, CONTRADICTED, INCONCLUSIVE, MISSING = "reproduced", "contradicted", "inconclusive", "missing"

# t(0.975, df): the two-sided 95% quantile of Student's t with df degrees of freedom.
T975 = {
    1: 12.7062,
    2: 4.3027,
    3: 3.1824,
    4: 2.7764,
    5: 2.5706,
    6: 2.4469,
    7: 2.3646,
    8: 2.3060,
    9: 2.2622,
    10: 2.2281,
    11: 2.2010,
    12: 2.1788,
    13: 2.1604,
    14: 2.1448,
    15: 2.1314,
    16: 2.1199,
    17: 2.1098,
    18: 2.1009,
    19: 2.0930,
    20: 2.0860,
    21: 2.0796,
    22: 2.0739,
    23: 2.0687,
    24: 2.0639,
    25: 2.0595,
    26: 2.0555,
    27: 2.0518,
    28: 2.0484,
    29: 2.0452,
    30: 2.0423,
}
Z975 = 1.959963984540054  # the standard normal's 0.975 quantile


def t975(df: float) -> float:
    """t(0.975, df); a fractional df (Welch) is rounded down, the conservative side. df < 1: NaN."""
    if not df >= 1:
        return math.nan
    d = math.floor(df)
    if d in T975:
        return T975[d]
    z = Z975  # Cornish-Fisher: t = z + g1/d + g2/d^2 + g3/d^3 (Abramowitz & Stegun 26.7.5)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / d + g2 / d**2 + g3 / d**3


@dataclass(frozen=True)
class Interval:
    """A mean over n seeds and its 95% interval [low, high] (NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    paired: bool = True

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2

    def text(self, fmt=None) -> str:
        """`mean [low, high]`, or `mean (1 seed: no interval)`."""
        f = fmt or (lambda x: f"{x:.3g}")
        if self.n < 2 or not math.isfinite(self.low):
            return f"{f(self.mean)} ({self.n} seed{'s' if self.n != 1 else ''}: no interval)"
        return f"{f(self.mean)} [{f(self.low)}, {f(self.high)}]"


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_interval(values: Iterable[float]) -> Interval:
    """The t-interval of the mean of `values` (non-finite values left out)."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def welch_interval(a: Iterable[float], b: Iterable[float]) -> Interval:
    """The interval of mean(a) - mean(b) for independent samples (Welch)."""
    xa, xb = _finite(a), _finite(b)
    if not xa or not xb:
        return Interval(math.nan, math.nan, math.nan, 0, paired=False)
    diff, n = statistics.fmean(xa) - statistics.fmean(xb), min(len(xa), len(xb))
    if len(xa) < 2 or len(xb) < 2:
        return Interval(diff, math.nan, math.nan, n, paired=False)
    va, vb = statistics.variance(xa) / len(xa), statistics.variance(xb) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, n, paired=False)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = t975(df) * se
    return Interval(diff, diff - half, diff + half, n, paired=False)


def difference(a: Mapping, b: Mapping) -> Interval:
    """mean(a) - mean(b) of two {seed: value} maps: paired over their common seeds when there are >= 2
    (both values finite), else Welch over all their seeds."""
    common = [s for s in a if s in b and math.isfinite(_num(a[s])) and math.isfinite(_num(b[s]))]
    if len(common) >= 2:
        return mean_interval(_num(a[s]) - _num(b[s]) for s in common)
    return welch_interval(a.values(), b.values())


def _num(x) -> float:
    return math.nan if x is None else float(x)


# ------------------------------------------------------------------------------------------------
# verdicts


def above(iv: Interval, threshold: float) -> str:
    """The claim `effect > threshold`."""
    if iv.n == 0:
        return MISSING
    if iv.low > threshold:
        return REPRODUCED
    if iv.high < threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def below(iv: Interval, threshold: float) -> str:
    """The claim `effect < threshold`."""
    if iv.n == 0:
        return MISSING
    if iv.high < threshold:
        return REPRODUCED
    if iv.low > threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def within(iv: Interval, lo: float, hi: float) -> str:
    """The claim `lo <= effect <= hi`: the whole interval inside the band, or wholly outside it."""
    if iv.n == 0:
        return MISSING
    if lo <= iv.low and iv.high <= hi:
        return REPRODUCED
    if iv.high < lo or iv.low > hi:
        return CONTRADICTED
    return INCONCLUSIVE


def all_of(*outcomes: str) -> str:
    """A claim made of several parts: missing or contradicted if any part is, reproduced if all are."""
    for worst in (MISSING, CONTRADICTED):
        if worst in outcomes:
            return worst
    return REPRODUCED if outcomes and all(o == REPRODUCED for o in outcomes) else INCONCLUSIVE
