"""Metric helpers shared by workers: bucket layout, bounded-cardinality gauges."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Sub-millisecond resolution at the bottom (a local publish confirm or a pull answered from
# memory), up to the 30 s of a long poll at the top.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def top_n(items: Iterable[tuple[str, float]], n: int) -> list[tuple[str, float]]:
    """The n largest (label, value) pairs: per-label gauges must not grow with the label set."""
    if n <= 0:
        return []
    return heapq.nlargest(n, items, key=lambda kv: kv[1])


class ScrapeCollector(Collector):
    """Gauges computed at scrape time by ``produce()`` (kept out of the hot path)."""

    def __init__(self, produce: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self.produce = produce

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self.produce()
