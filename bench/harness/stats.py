"""Percentiles and medians of samples, and quantiles of /metrics histograms between scrapes."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def rnd(value: float, digits: int = 2) -> float:
    return round(value, digits)


def histogram_delta(
    before: dict[str, dict[tuple[tuple[str, str], ...], float]],
    after: dict[str, dict[tuple[tuple[str, str], ...], float]],
    name: str,
) -> dict[str, Any]:
    """Count, sum and bucket counts of a (label-less) histogram between two scrapes."""

    def one(sample: str, scrape: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> float:
        return sum(scrape.get(sample, {}).values())

    buckets: list[tuple[float, float]] = []
    for labels, value in after.get(f"{name}_bucket", {}).items():
        le = float(dict(labels)["le"])
        buckets.append((le, value - before.get(f"{name}_bucket", {}).get(labels, 0.0)))
    buckets.sort()
    return {
        "count": one(f"{name}_count", after) - one(f"{name}_count", before),
        "sum": one(f"{name}_sum", after) - one(f"{name}_sum", before),
        "buckets": buckets,
    }


def histogram_quantile(delta: dict[str, Any], q: float) -> float:
    """Prometheus-style quantile (linear within the bucket) from :func:`histogram_delta`."""
    count = delta["count"]
    if count <= 0:
        return float("nan")
    rank = q * count
    lower, below = 0.0, 0.0
    for le, cumulative in delta["buckets"]:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


# -- RabbitMQ --------------------------------------------------------------------------
