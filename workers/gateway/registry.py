"""The servers' registry: ``register``, ``heartbeat`` and ``deregister`` messages on the
servers exchange (fanout), consumed by every gateway on a queue of its own.

A server is taken into service once its queue is declared; a deregister takes it out (new
clients go elsewhere; its clients are moved or closed, ``on_server_loss``). Malformed messages are counted and
logged, never fatal: anyone may publish to the exchange.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from bridge.amqp.frames import Delivery
from workers.gateway.config import OP_DEREGISTER, REGISTRY_OPS, SERVER_ID_RE
from workers.gateway.hub import GatewayHub
from workers.gateway.metrics import GatewayMetrics

log = logging.getLogger("bridge.gateway")


class ServerRegistry:
    def __init__(self, hub: GatewayHub, metrics: GatewayMetrics) -> None:
        self.hub = hub
        self.metrics = metrics
        self._lock = asyncio.Lock()

    async def on_message(self, message: Delivery) -> None:
        try:
            doc = json.loads(message.body)
            op = doc["op"]
            server_id = doc["server_id"]
            if op not in REGISTRY_OPS:
                raise ValueError(f"unknown op {op!r}")
            if not isinstance(server_id, str) or not SERVER_ID_RE.match(server_id):
                raise ValueError(f"server_id {server_id!r} is not [A-Za-z0-9._:@-]{{1,200}}")
        except (ValueError, KeyError, TypeError) as exc:
            self.metrics.registry_messages.labels("malformed").inc()
            log.warning(
                "malformed message on the servers exchange ignored",
                extra={"error": str(exc)[:200], "body": message.body[:200]},
            )
            return
        self.metrics.registry_messages.labels(op).inc()
        # One at a time, in delivery order: a deregister must not overtake its register.
        async with self._lock:
            if op == OP_DEREGISTER:
                self.hub.balancer.deregister(server_id, time.monotonic())
                log.info("server deregistered", extra={"server": server_id})
                self.hub.server_lost(server_id, "deregistered")
                return
            try:
                await self.hub.declare_server_queue(server_id)
            except Exception as exc:
                log.error(
                    "cannot declare the server's queue; not taking it into service",
                    extra={"server": server_id, "error": str(exc)},
                )
                return
            if self.hub.balancer.register(server_id, time.monotonic()):
                log.info("server alive", extra={"server": server_id, "op": op})
                self.hub.server_up.set()
                self.hub.server_up.clear()
