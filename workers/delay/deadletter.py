"""Consumed messages the delay worker refuses: to ``delay.dead`` with ``x-dead-reason``.

Used by the ingress (invalid headers, beyond the horizon, ...), the control RPC (a request
without ``reply_to``) and the consumers' poison handling (``processing_failed``,
``delivery_limit``: :mod:`bridge.amqp.consumer`). The lanes dead-letter what fails at due time on their own connection
(:mod:`workers.delay.lanes`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter

from bridge.amqp.consumer import H_DEAD_EXCEPTION, Consumer
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.messages import dead_letter_properties
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

    async def poison(
        self,
        consumer: Consumer,
        delivered: Delivery,
        reason: str,
        detail: str,
        exception: str | None,
    ) -> None:
        """A message ``consumer`` gave up on (bridge.amqp.consumer): dead-lettered."""
        extra = {H_DEAD_EXCEPTION: exception} if exception else None
        await self.reject(delivered, consumer, reason, detail, extra=extra)

    async def reject(
        self,
        delivered: Delivery,
        consumer: Consumer,
        reason: str,
        detail: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Dead-letter a consumed message with its reason (confirmed), then acknowledge it;
        requeue it if the dead-letter publish failed."""
        props = dead_letter_properties(
            delivered,
            reason,
            detail,
            reason_header=H_DEAD_REASON,
            detail_header=H_DEAD_DETAIL,
            extra=extra,
        )
        if props.user_id is not None and props.user_id != self.user:
            props.user_id = None  # the broker would close the channel (see carried)
        try:
            await self.publisher.publish(
                self.exchange, delivered.routing_key, delivered.body, props
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
