"""How the benchmarks summarise repeated runs: the median and range, the mean and spread."""

from __future__ import annotations

import statistics


def median_range(values: list[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)``."""
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low}-{high})"


def mean_spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``mean ± sample standard deviation`` (0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(spread)}"
