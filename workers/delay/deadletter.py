"""Consumed messages the delay worker refuses: to ``delay.dead`` with ``x-dead-reason``.

Used by the ingress (invalid headers, beyond the horizon, ...) and the control RPC (a request
without ``reply_to``). The lanes dead-letter what fails at due time on their own connection
(:mod:`workers.delay.lanes`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter

from bridge.amqp.consumer import Consumer
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.publisher import Publisher
from bridge.errors import PublishFailed
from workers.delay.config import H_DEAD_DETAIL, H_DEAD_REASON

log = logging.getLogger("bridge.delay")


class DeadLetters:
    def __init__(
        self, publisher: Publisher, exchange: str, counter: Counter, user: str | None
    ) -> None:
        self.publisher = publisher
        self.exchange = exchange
        self.counter = counter
        self.user = user

    def carried(self, delivered: Delivery, headers: dict[str, Any]) -> Properties:
        """The delivery's properties with other headers, minus a ``user_id`` that is not the
        worker's (the broker would close the channel; see ``lanes.carried_properties``)."""
        props = delivered.properties.copy(headers=headers)
        if props.user_id is not None and props.user_id != self.user:
            props.user_id = None
        return props

    async def reject(
        self, delivered: Delivery, consumer: Consumer, reason: str, detail: str
    ) -> None:
        """Dead-letter a consumed message with its reason (confirmed), then acknowledge it;
        requeue it if the dead-letter publish failed."""
        dead_headers = dict(delivered.properties.headers or {})
        dead_headers[H_DEAD_REASON] = reason
        dead_headers[H_DEAD_DETAIL] = detail[:500]
        try:
            await self.publisher.publish(
                self.exchange,
                delivered.routing_key,
                delivered.body,
                self.carried(delivered, dead_headers),
            )
        except PublishFailed as exc:
            log.error(
                "dead-letter publish failed; requeueing",
                extra={"reason": reason, "error": str(exc)},
            )
            await asyncio.sleep(1)
            consumer.nack(delivered)
            return
        self.counter.labels(reason).inc()
        log.warning("message dead-lettered", extra={"reason": reason, "detail": detail[:200]})
        consumer.ack(delivered)
