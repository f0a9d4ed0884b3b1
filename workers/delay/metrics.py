"""Prometheus metrics of the delay worker (names ``bridge_delay_*``).

Everything is updated on the worker's loop, the lanes' lateness histogram and busy counter
included, and the scrape runs on that loop too (the HTTP server's handler). The lateness
histogram is observed once per delivered message: it is this module's own
:class:`BatchHistogram` (plain counts per batch) rather than prometheus_client's
``Histogram`` (two locked increments per value), with the same exposition.

Topics are labels with bounded cardinality (``BRIDGE_DELAY__TOPIC_BY`` can make one per
tenant): the scheduled gauge shows the N largest topics and adds the rest up as ``other``;
the lateness histogram gives the first N topics stored a series each and the rest ``other``.
A topic's lateness series is created (at zero) at the first scrape that sees it stored, so
``rate()`` counts its first deliveries too when they fall due after that scrape.
"""

from __future__ import annotations

import heapq
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from workers.delay.config import DEAD_REASONS, DelaySettings
from workers.delay.ledger import Ledger

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


OTHER = "other"  # the label of every topic beyond the bound


class TopicLabels:
    """The first ``limit`` topics asked for keep their own label; later ones are ``other``.
    Thread-safe. A topic literally named ``other`` shares that series."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return len(self._known) >= self._limit

    def __call__(self, topic: str) -> str:
        if topic in self._known:
            return topic
        with self._lock:
            if len(self._known) < self._limit:
                self._known.add(topic)
                return topic
        return OTHER


def top_and_other(counts: dict[str, int], n: int) -> list[tuple[str, int]]:
    """The ``n`` largest ``counts`` and, if any are left, ``("other", their sum)``."""
    top = heapq.nlargest(n, counts.items(), key=lambda kv: kv[1]) if n > 0 else []
    rest = sum(counts.values()) - sum(c for _, c in top)
    if len(top) < len(counts):
        top.append((OTHER, rest))
    return top


class BatchHistogram(Collector):
    """A histogram with one label, observed a batch at a time: per series a plain list of
    bucket counts and the sum, no lock per value (prometheus_client's ``Histogram`` takes
    two per observation; the lanes observe every delivered message). Observed and
    scraped on the worker's loop only, so a scrape never sees half a batch."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Iterable[float]):
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        # per label value: one count per bucket (the last: above every bound), then the sum
        self._series: dict[str, list[float]] = {}

    def series(self, value: str) -> list[float]:
        """The series of ``value`` (created at zero)."""
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = [0] * (len(self.bounds) + 1) + [0.0]
        return series

    def observe(self, value: str, amounts: Iterable[float]) -> None:
        series = self._series.get(value) or self.series(value)
        bounds = self.bounds
        total = 0.0
        for amount in amounts:
            series[bisect_left(bounds, amount)] += 1  # the first bucket with le >= amount
            total += amount
        series[-1] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in self._series.items():
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, series, strict=False):  # the sum is left out
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric([value], buckets, sum_value=series[-1])
        yield family


class _StateCollector(Collector):
    """Gauges computed at scrape time, including the bounded per-topic scheduled count."""

    def __init__(
        self, ledger: Ledger, scheduled_topics: int, track: Callable[[Iterable[str]], None]
    ) -> None:
        self.ledger = ledger
        self.scheduled_topics = scheduled_topics
        self.track = track

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        ledger = self.ledger
        scheduler = ledger.scheduler
        counts = dict(ledger.topic_counts)
        self.track(counts)
        yield CounterMetricFamily(
            "bridge_delay_commit_failures",
            "state commits that failed (disk full, read-only, I/O error) and are retried; "
            "nothing is acknowledged meanwhile",
            value=ledger.committer.failures,
        )
        scheduled = GaugeMetricFamily(
            "bridge_delay_scheduled_messages",
            "stored messages not yet confirmed at their target, per topic (the N largest "
            "topics, BRIDGE_DELAY__SCHEDULED_METRIC_TOPICS; the rest added up as 'other')",
            labels=["topic"],
        )
        for topic, count in top_and_other(counts, self.scheduled_topics):
            scheduled.add_metric([topic], count)
        yield scheduled
        yield GaugeMetricFamily(
            "bridge_delay_stored_messages",
            "stored messages not yet confirmed at their target, all topics",
            value=ledger.stored_total,
        )
        yield GaugeMetricFamily(
            "bridge_delay_window_messages",
            "messages held in the in-memory window (pending and in flight)",
            value=len(scheduler),
        )
        yield GaugeMetricFamily(
            "bridge_delay_active_lanes",
            "lanes in use (more are started when due topics wait, up to LANES)",
            value=scheduler.active_lanes,
        )
        yield GaugeMetricFamily(
            "bridge_delay_busy_lanes",
            "sender lanes publishing a batch right now",
            value=len(scheduler.busy_lanes()),
        )


class DelayMetrics:
    def __init__(self, registry: CollectorRegistry, settings: DelaySettings) -> None:
        self.settings = settings
        self.registry = registry
        self.received = Counter(
            "bridge_delay_received_total",
            "messages consumed from the ingress queue, by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("accepted", "rejected"):
            self.received.labels(outcome)
        self.published = Counter(
            "bridge_delay_published_total",
            "messages confirmed by the broker at their target exchange",
            registry=registry,
        )
        self.dead_letters = Counter(
            "bridge_delay_dead_letters_total",
            "messages dead-lettered to the dead-letter exchange, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in DEAD_REASONS:
            self.dead_letters.labels(reason)
        self.cancelled = Counter(
            "bridge_delay_cancelled_total",
            "messages cancelled by the control RPC",
            registry=registry,
        )
        self.replaced = Counter(
            "bridge_delay_replaced_total",
            "pending messages replaced by a newer one with the same x-delay-key",
            registry=registry,
        )
        self.consumer_restored = Counter(
            "bridge_delay_ingress_restored_total",
            "times the ingress queue was declared and consumed again after the broker "
            "cancelled the consumer (queue deleted)",
            registry=registry,
        )
        self.retries = Counter(
            "bridge_delay_publish_retries_total",
            "publishes that failed transiently and will be retried",
            registry=registry,
        )
        self.lateness = BatchHistogram(
            "bridge_delay_lateness_seconds",
            "publish time minus due time, per topic (the first N topics stored, "
            "BRIDGE_DELAY__LATENESS_METRIC_TOPICS; the rest as 'other')",
            "topic",
            LATENCY_BUCKETS,
        )
        registry.register(self.lateness)
        self._lateness_label = TopicLabels(settings.lateness_metric_topics)
        self.lane_busy = Counter(
            "bridge_delay_lane_busy_seconds_total",
            "time each sender lane spent on batches",
            ["lane"],
            registry=registry,
        )
        self._busy_children = [self.lane_busy.labels(str(i)) for i in range(settings.lanes)]
        self.commit_seconds = Histogram(
            "bridge_delay_commit_seconds",
            "group commit duration",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def watch(self, ledger: Ledger) -> None:
        """Report the ledger's state (stored, window, lanes) at each scrape."""
        self.registry.register(
            _StateCollector(ledger, self.settings.scheduled_metric_topics, self.track_topics)
        )

    def track_topics(self, topics: Iterable[str]) -> None:
        """Create the lateness series of stored topics (at zero) while labels are left."""
        label = self._lateness_label
        for topic in topics:
            if label.full:
                return
            self.lateness.series(label(topic))

    def observe_lateness(self, topic: str, seconds: Iterable[float]) -> None:
        """The lateness of a batch of one topic's messages (one label lookup for all)."""
        self.lateness.observe(self._lateness_label(topic), seconds)

    def add_busy(self, lane: int, seconds: float) -> None:
        self._busy_children[lane].inc(seconds)
