"""The fan-out requests of the directed worker: messages published to ``directed.requests``.

A request is parsed (:func:`workers.directed.wire.parse_request`), its target groups resolved
once, and submitted to the core; its content is journaled with it and the delivery is
acknowledged after the commit that holds both (a redelivery is a duplicate by its
``message_id``). A refused request is dead-lettered with its reason. On a sharded worker
every shard sees every request and keeps its own targets; shard 0 alone dead-letters an
invalid one, so it is reported once.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.amqp.consumer import Consumer
from bridge.amqp.frames import Delivery
from bridge.amqp.messages import DeadLetters
from bridge.errors import WireError
from bridge.sharding import Shard
from workers.directed import wire
from workers.directed.config import DirectedSettings
from workers.directed.ledger import Ledger, now_ms
from workers.directed.metrics import DirectedMetrics
from workers.directed.replies import json_safe
from workers.directed.store import Content


class Requests:
    """Handles the request consumer's deliveries; :attr:`consumer` is set by the worker."""

    def __init__(
        self,
        ledger: Ledger,
        settings: DirectedSettings,
        shard: Shard,
        *,
        dead: DeadLetters,
        metrics: DirectedMetrics,
        wake: Callable[[list[str]], None],
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.shard = shard
        self.dead = dead
        self.metrics = metrics
        self.wake = wake  # the long polls of these targets answer now
        self.consumer: Consumer | None = None

    async def on_delivery(self, message: Delivery) -> None:
        consumer = self.consumer
        assert consumer is not None
        shard = self.shard
        try:
            if message.properties.error:
                raise WireError("invalid_headers", message.properties.error)
            req = wire.parse_request(
                body=message.body,
                headers=message.headers,
                content_type=message.content_type,
                message_id=message.message_id,
                settings=self.settings,
            )
            targets = req.targets
            if req.groups:  # resolved now, once: a later change does not touch this request
                targets = self.ledger.groups.resolve(req.targets, req.groups)
        except WireError as exc:
            if shard.index != 0:
                # Every shard sees every request and finds the same fault: shard 0 alone
                # dead-letters it, so it is reported once.
                self.metrics.requests.labels("rejected_by_shard_0").inc()
                consumer.ack(message)
                return
            self.metrics.requests.labels("rejected").inc()
            await self.dead.reject(message, exc.code, exc.message, ack=consumer)
            return
        if shard.sharded:
            targets = [t for t in targets if shard.owns(t)]
            if not targets:
                self.metrics.requests.labels("no_local_targets").inc()
                consumer.ack(message)
                return
        core = self.ledger.core
        now = now_ms()
        core.expire(now)  # content past its TTL must not count toward a full queue
        result = core.submit(req.message_id, targets, now, req.ttl_ms)
        if result.status == "rejected":
            self.metrics.requests.labels("rejected").inc()
            reason = result.reason or "rejected"
            where = (
                f" by shard {shard.index} of {shard.count} (its {len(targets)} "
                "targets; the other shards decide for theirs)"
                if shard.sharded
                else ""
            )
            await self.dead.reject(
                message, reason, f"request {req.message_id} refused{where}: {reason}", ack=consumer
            )
            return
        if result.status == "accepted":
            assert result.mid is not None
            content = Content(
                body=req.body,
                props={
                    "content_type": req.content_type,
                    "content_encoding": message.content_encoding,
                    "headers": json_safe(req.headers),
                },
            )
            self.ledger.add_content(result.mid, content)
            self.metrics.overflow_drops.inc(len(result.dropped))
            self.wake(targets)
        await self.ledger.committed()
        self.metrics.requests.labels(result.status).inc()
        consumer.ack(message)

    async def poison(
        self, message: Delivery, reason: str, detail: str, exception: str | None
    ) -> None:
        """A request the consumer gave up on: counted as rejected, dead-lettered."""
        self.metrics.requests.labels("rejected").inc()
        await self.dead.poison(self.consumer, message, reason, detail, exception)
