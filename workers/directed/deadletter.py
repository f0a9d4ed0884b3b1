"""Consumed messages the directed worker refuses: to ``directed.dead`` with ``x-dead-reason``.

Used by the requests (invalid, refused by the core), the pulls and control queries (no
``reply_to``) and the consumers' poison handling (``processing_failed``, ``delivery_limit``:
:mod:`bridge.amqp.consumer`). On a sharded worker the dead letter names the shard.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from bridge.amqp.consumer import H_DEAD_EXCEPTION, Consumer
from bridge.amqp.frames import Delivery
from bridge.amqp.messages import dead_letter_properties
from bridge.amqp.publisher import Publisher
from bridge.errors import PublishFailed
from bridge.sharding import Shard
from workers.directed.config import H_DEAD_DETAIL, H_DEAD_REASON, H_SHARD

log = logging.getLogger("bridge.directed")


class DeadLetters:
    def __init__(self, publisher: Publisher, exchange: str, counter: Counter, shard: Shard) -> None:
        self.publisher = publisher
        self.exchange = exchange
        self.counter = counter
        self.shard = shard

    async def poison(
        self,
        consumer: Consumer | None,
        message: Delivery,
        reason: str,
        detail: str,
        exception: str | None,
    ) -> None:
        """A message a consumer gave up on (bridge.amqp.consumer): dead-lettered; ``consumer``
        is None for a consumer that acknowledges on receipt."""
        extra: dict[str, object] | None = {H_DEAD_EXCEPTION: exception} if exception else None
        await self.reject(message, reason, detail, ack=consumer, extra=extra)

    async def reject(
        self,
        message: Delivery,
        reason: str,
        detail: str,
        *,
        ack: Consumer | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Publish to the dead-letter exchange with the reason (confirmed), then acknowledge
        the delivery on ``ack``, its consumer (None: it was acknowledged on receipt); requeue
        it if the publish failed."""
        extra = dict(extra or {})
        if self.shard.sharded:
            extra[H_SHARD] = self.shard.index
        props = dead_letter_properties(
            message,
            reason,
            detail,
            reason_header=H_DEAD_REASON,
            detail_header=H_DEAD_DETAIL,
            extra=extra or None,
        )
        try:
            await self.publisher.publish(self.exchange, message.routing_key, message.body, props)
        except PublishFailed as exc:
            log.error(
                "dead-letter publish failed; requeueing",
                extra={"reason": reason, "error": str(exc)},
            )
            if ack is not None:
                await asyncio.sleep(1)
                ack.nack(message, requeue=True)
            return
        self.counter.labels(reason).inc()
        log.warning("message dead-lettered", extra={"reason": reason, "detail": detail[:200]})
        if ack is not None:
            ack.ack(message)
