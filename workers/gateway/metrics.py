"""Prometheus metrics of the gateway worker (names ``bridge_gateway_*``).

Per-frame counters are plain integers read at scrape time: a prometheus_client Counter takes
a lock on every ``inc``, which on the DATA path costs more than the rest of the frame's work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sized
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.amqp.link import Link
from bridge.metrics import LATENCY_BUCKETS
from workers.gateway.core import Balancer


class GatewayState(Protocol):
    """What the scrape reads of the gateway (its hub)."""

    @property
    def sessions(self) -> Sized: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def balancer(self) -> Balancer: ...


class WireCounters:
    """Hot-path counters, incremented as plain attributes."""

    __slots__ = ("accepted", "bytes_in", "bytes_out", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.accepted = 0
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0


class _StateCollector(Collector):
    def __init__(self, wire: WireCounters, state: GatewayState, link: Link) -> None:
        self.wire = wire
        self.state = state
        self.link = link

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        w = self.wire
        for name, doc, value in (
            ("accepted", "connections accepted (before HELLO)", w.accepted),
            ("frames_in", "frames received from clients", w.frames_in),
            ("frames_out", "frames sent to clients", w.frames_out),
            ("bytes_in", "bytes received from clients", w.bytes_in),
            ("bytes_out", "bytes sent to clients", w.bytes_out),
        ):
            yield CounterMetricFamily(f"bridge_gateway_{name}", doc, value=value)
        state = self.state
        yield GaugeMetricFamily(
            "bridge_gateway_connections", "open client connections", value=len(state.sessions)
        )
        yield GaugeMetricFamily(
            "bridge_gateway_publish_in_flight",
            "publishes waiting for the broker's confirm",
            value=state.in_flight,
        )
        balancer = state.balancer
        yield GaugeMetricFamily(
            "bridge_gateway_servers_alive",
            "servers taking new clients",
            value=len(balancer.alive()),
        )
        per_server = GaugeMetricFamily(
            "bridge_gateway_server_clients",
            "clients of this gateway associated with each server",
            labels=["server"],
        )
        for server, count in balancer.counts().items():
            per_server.add_metric([server], count)
        yield per_server
        now = time.monotonic()
        global_view = GaugeMetricFamily(
            "bridge_gateway_global_server_clients",
            "clients of all replicas per server, as this replica sees them (own live clients + "
            "other replicas' last reports + own assignments since)",
            labels=["server"],
        )
        for server, count in balancer.global_counts(now).items():
            global_view.add_metric([server], count)
        yield global_view
        yield GaugeMetricFamily(
            "bridge_gateway_peer_replicas",
            "other gateway replicas heard from within peer_ttl_s",
            value=len(balancer.replicas(now)),
        )
        link = self.link  # the data path's own connection (bridge.amqp.link.Link)
        yield CounterMetricFamily(
            "bridge_gateway_link_reconnects",
            "times the gateway's data-path AMQP connection was re-established",
            value=link.reconnects,
        )
        yield GaugeMetricFamily(
            "bridge_gateway_link_up",
            "1 while the data-path connection publishes and consumes replies",
            value=1 if link.ready else 0,
        )


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.wire = WireCounters()
        self.refused = Counter(
            "bridge_gateway_refused_total",
            "connections refused before or at HELLO, by reason",
            ["reason"],
            registry=registry,
        )
        self.closed = Counter(
            "bridge_gateway_closed_total",
            "sessions (after WELCOME) closed, by reason",
            ["reason"],
            registry=registry,
        )
        self.confirm_seconds = Histogram(
            "bridge_gateway_publish_confirm_seconds",
            "time from publish to the broker's confirm",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.publish_failures = Counter(
            "bridge_gateway_publish_failures_total",
            "publishes to server queues that failed, by reason",
            ["reason"],
            registry=registry,
        )
        self.undeliverable = Counter(
            "bridge_gateway_undeliverable_total",
            "server replies that found no session, by reason",
            ["reason"],
            registry=registry,
        )
        self.registry_messages = Counter(
            "bridge_gateway_registry_messages_total",
            "messages on the servers exchange, by op (malformed included)",
            ["op"],
            registry=registry,
        )
        self.server_loss = Counter(
            "bridge_gateway_server_loss_total",
            "clients of a server that deregistered or missed its heartbeats: moved, closed",
            ["action"],
            registry=registry,
        )
        self.passthrough = Counter(
            "bridge_gateway_passthrough_total",
            "connections that were not gateway clients, handed to the listener's passthrough "
            "address: relayed, upstream_failed",
            ["result"],
            registry=registry,
        )
        self.peer_messages = Counter(
            "bridge_gateway_peer_messages_total",
            "messages from other replicas: counts, leave, sticky, offline, claim, stale, malformed",
            ["kind"],
            registry=registry,
        )

        self.offline = Counter(
            "bridge_gateway_offline_replies_total",
            "replies for offline sticky clients: kept, delivered, overflow (queue full), "
            "failed (not kept)",
            ["event"],
            registry=registry,
        )

    def watch(self, state: GatewayState, link: Link) -> None:
        """Report the sessions, the publish window, the servers and the link at each scrape."""
        self.registry.register(_StateCollector(self.wire, state, link))
