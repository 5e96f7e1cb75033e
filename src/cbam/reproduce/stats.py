"""Means, spreads and paired differences over seeds.

The gains the paper reports (0.1-2 points) are the size of seed-to-seed noise on small data,
so every figure comes with its spread. A difference to the baseline is taken seed by seed:
seed s gives both models the same initialisation recipe and data order, which removes the
noise they share, and a t interval on the per-seed differences says how sure the sign is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Student's t 0.975-quantiles for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df)).
_T975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851,
    2.364624252, 2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830,
    2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040,
    2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
    2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)  # fmt: skip
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975-quantile of Student's t with `df` degrees of freedom: the half-width of a
    two-sided 95% interval in standard errors. Exact to 9 digits up to df = 30, then a
    Cornish-Fisher expansion around the normal quantile (error below 1e-7)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)
    )


@dataclass(frozen=True)
class Estimate:
    """Mean and sample standard deviation (n - 1 in the denominator; nan for n < 2)."""

    mean: float
    std: float
    n: int


def describe(values: Sequence[float]) -> Estimate:
    if not values:
        return Estimate(math.nan, math.nan, 0)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return Estimate(statistics.fmean(values), std, len(values))


@dataclass(frozen=True)
class Difference:
    """Mean of per-seed differences (value - baseline) with its t-based 95% interval;
    `low`/`high` are None when fewer than two seeds make no interval."""

    mean: float
    std: float
    n: int
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies on one side of 0: a difference the seeds agree on."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float]
) -> Difference | None:
    """Differences paired by seed (keys), over the seeds both have; None when they share none."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    estimate = describe([values[s] - baseline[s] for s in seeds])
    if estimate.n < 2:
        return Difference(estimate.mean, math.nan, estimate.n, None, None)
    half = t_quantile_975(estimate.n - 1) * estimate.std / math.sqrt(estimate.n)
    return Difference(
        estimate.mean, estimate.std, estimate.n, estimate.mean - half, estimate.mean + half
    )
