"""Robust summaries of repeated timings: medians, quartiles and paired ratios.

The benchmark times its variants in interleaved rounds (A B C, B C A, ...), so a slow moment of
a noisy machine hits every variant of that round. Ratios are taken within each round and then
summarised by their median, which cancels drift that a ratio of two overall medians would not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of a sample (seconds, bytes or ratios), and its size."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = the middle half within 5%)."""
        return (self.q3 - self.q1) / self.median if self.median else math.inf


def summarize(values: Sequence[float]) -> Summary:
    return Summary(
        quantile(values, 0.5), quantile(values, 0.25), quantile(values, 0.75), len(values)
    )


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """values[i] / baseline[i] for each round i: the ratio measured under the same conditions."""
    if len(values) != len(baseline):
        raise ValueError(f"unpaired samples: {len(values)} values, {len(baseline)} baselines")
    return [v / b for v, b in zip(values, baseline, strict=True)]


def rotations(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of variants in each round: a rotation per round, so that every variant runs
    first, second, ... equally often (its position after a given neighbour also varies)."""
    k = len(names)
    return [[names[(r + i) % k] for i in range(k)] for r in range(rounds)]
