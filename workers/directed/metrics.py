"""Prometheus metrics of the directed worker (names ``bridge_directed_*``)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.metrics import LATENCY_BUCKETS
from bridge.store import GroupCommitter
from workers.directed.config import DirectedSettings
from workers.directed.state import CoreState


def top_backlog(core: CoreState, n: int) -> list[tuple[str, int]]:
    """The ``n`` targets with the most queued ids."""
    if n <= 0:
        return []
    return heapq.nlargest(n, ((t, core.backlog(t)) for t in core.targets()), key=lambda kv: kv[1])


class _StateCollector(Collector):
    """Gauges computed at scrape time from the core, including a bounded per-target backlog."""

    def __init__(
        self,
        core: CoreState,
        committer: GroupCommitter[Any],
        cache_bytes: Callable[[], int],
        backlog_targets: int,
    ) -> None:
        self.core = core
        self.committer = committer
        self.cache_bytes = cache_bytes
        self.backlog_targets = backlog_targets

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "bridge_directed_commit_failures",
            "state commits that failed (disk full, read-only, I/O error) and are retried; "
            "nothing is acknowledged meanwhile",
            value=self.committer.failures,
        )
        core = self.core
        yield GaugeMetricFamily(
            "bridge_directed_messages",
            "messages whose content is stored",
            value=core.alive_messages,
        )
        yield GaugeMetricFamily(
            "bridge_directed_targets",
            "targets with a queue or an ack buffer",
            value=core.target_count,
        )
        backlog = GaugeMetricFamily(
            "bridge_directed_backlog_messages",
            "queued ids per target (only the largest N targets, BRIDGE_DIRECTED__BACKLOG_METRIC_TARGETS)",
            labels=["target"],
        )
        for target, count in top_backlog(core, self.backlog_targets):
            backlog.add_metric([target], count)
        yield backlog
        yield GaugeMetricFamily(
            "bridge_directed_cache_bytes", "content cache size", value=self.cache_bytes()
        )


class DirectedMetrics:
    def __init__(self, registry: CollectorRegistry, settings: DirectedSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.requests = Counter(
            "bridge_directed_requests_total",
            "requests consumed, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "bridge_directed_dead_letters_total",
            "messages dead-lettered, by reason",
            ["reason"],
            registry=registry,
        )
        self.pulls = Counter(
            "bridge_directed_pulls_total", "pulls answered, by case", ["kind"], registry=registry
        )
        # resolved once: labels() on every pull showed up in profiles
        self.pull_kind = {
            k: self.pulls.labels(k)
            for k in ("fresh", "ack_fresh", "resend", "ack_only", "empty", "error")
        }
        self.redeliveries = Counter(
            "bridge_directed_redeliveries_total",
            "batches sent again (record id mismatch)",
            registry=registry,
        )
        self.acks = Counter(
            "bridge_directed_acknowledgements_total",
            "message deliveries acknowledged by targets",
            registry=registry,
        )
        self.expired = Counter(
            "bridge_directed_expirations_total",
            "target deliveries lost to content TTL",
            registry=registry,
        )
        self.overflow_drops = Counter(
            "bridge_directed_overflow_drops_total",
            "ids dropped from full target queues",
            registry=registry,
        )
        self.consumers_restored = Counter(
            "bridge_directed_consumers_restored_total",
            "times a queue the worker consumes was declared and consumed again after the "
            "broker cancelled the consumer (queue deleted)",
            registry=registry,
        )
        self.pulls_forwarded = Counter(
            "bridge_directed_pulls_forwarded_total",
            "sharded mode: pulls that reached a shard not owning their target and were handed "
            "to the owner (should stay 0; see docs/operations.md)",
            registry=registry,
        )
        self.http_pulls = Counter(
            "bridge_directed_http_pulls_total",
            "requests to the HTTP pull API, by HTTP status (401/403: authentication; 413, 429, "
            "503: refused; 200: replies and error replies)",
            ["status"],
            registry=registry,
        )
        self.http_relayed = Counter(
            "bridge_directed_http_relayed_total",
            "sharded mode: HTTP pulls for another shard's target, relayed to it through the "
            "pull exchange (expected: a replica answers for every target)",
            registry=registry,
        )
        self.pull_seconds = Histogram(
            "bridge_directed_pull_seconds",
            "pull handling time (long-poll waits included)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "bridge_directed_commit_seconds",
            "group commit duration",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def watch(
        self, core: CoreState, committer: GroupCommitter[Any], cache_bytes: Callable[[], int]
    ) -> None:
        """Report the core's state (messages, targets, backlog), the commit failures and the
        cache at each scrape."""
        self.registry.register(
            _StateCollector(core, committer, cache_bytes, self.settings.backlog_metric_targets)
        )

    def on_commit(self, items: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
