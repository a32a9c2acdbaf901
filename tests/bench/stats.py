"""Small statistics helpers (no numpy needed for the figures themselves)."""

from __future__ import annotations

import math
import statistics


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100), nearest-rank: a value that was actually observed."""
    values = sorted(values)
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def summary(values) -> dict:
    """median, min, max and the relative spread (max-min)/median of repeated measurements."""
    values = list(values)
    if not values:
        return {"n": 0, "median": math.nan, "min": math.nan, "max": math.nan, "spread": math.nan}
    med = median(values)
    return {"n": len(values), "median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else math.nan,
            "values": values}


def latency_summary(seconds) -> dict:
    """p50/p99/max in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else math.nan,
            "mean_ms": statistics.fmean(ms) if ms else math.nan}
