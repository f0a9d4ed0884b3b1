"""What every worker does with a delivery besides its own logic: answer it on its
``reply_to``, or dead-letter it with a reason. One copy of each, on the data path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter

from bridge.amqp import frames as F
from bridge.amqp.consumer import Consumer
from bridge.amqp.poison import H_DEAD_DETAIL, H_DEAD_EXCEPTION, H_DEAD_REASON
from bridge.amqp.publisher import Publisher
from bridge.errors import PublishFailed

log = logging.getLogger("bridge.amqp")


def reply(publisher: Publisher, request: F.Delivery, body: bytes) -> bool:
    """Answer an RPC request on its ``reply_to`` with its ``correlation_id``: not mandatory
    (RabbitMQ returns direct reply-to publishes under ``mandatory`` although it delivers
    them), not persistent; a lost reply is recovered by the caller's retry. False when the
    request has no ``reply_to``."""
    reply_to = request.reply_to
    if not reply_to:
        return False
    props = F.Properties(
        content_type="application/json", delivery_mode=1, correlation_id=request.correlation_id
    )
    fut = publisher.publish("", reply_to, body, props, mandatory=False)
    fut.add_done_callback(_reply_done)
    return True


def _reply_done(fut: object) -> None:
    exc = fut.exception() if not fut.cancelled() else None  # type: ignore[attr-defined]
    if exc is not None:
        log.info("reply not sent", extra={"error": str(exc)})


def dead_letter_properties(
    delivery: F.Delivery,
    reason: str,
    detail: str | None,
    *,
    extra: dict[str, object] | None = None,
    **changes: Any,
) -> F.Properties:
    """The delivery's properties for a dead letter: persistent, with ``x-dead-reason`` and
    (when there is one) a readable ``x-dead-detail`` added to its headers, and ``changes``
    to other properties. Headers that could not be decoded (the delivery's
    ``properties.error``) or cannot be encoded again (a value AMQP's types do not hold as
    decoded) are replaced by the reason alone, and the detail says so: a dead letter must
    not fail for the very headers that made it one."""
    props = delivery.properties
    headers = dict(props.headers or {})
    if props.error:
        detail = _dropped(detail, props.error)
    headers[H_DEAD_REASON] = reason
    if detail is not None:
        headers[H_DEAD_DETAIL] = detail[:500]
    if extra:
        headers.update(extra)
    out = props.copy(headers=headers, delivery_mode=2, **changes)
    try:
        out.encode()
    except F.EncodeError as exc:
        headers = {
            **(extra or {}),
            H_DEAD_REASON: reason,
            H_DEAD_DETAIL: _dropped(detail, exc)[:500],
        }
        out = props.copy(headers=headers, delivery_mode=2, **changes)
    return out


def _dropped(detail: str | None, why: object) -> str:
    note = f"original headers dropped: {why}"
    return f"{detail[:400]} ({note})" if detail else note


class DeadLetters:
    """A worker's dead-letter exchange for the deliveries it refuses: the delivery is
    published there (confirmed) with ``x-dead-reason``/``x-dead-detail`` and ``stamp`` added
    to its headers, then acknowledged on its consumer; if that publish fails, it is requeued
    (after a second, so a broken dead-letter exchange does not spin). A ``user_id`` that is
    not ``user``, the worker's own login, is dropped: RabbitMQ closes the channel on a
    ``user_id`` other than the publishing connection's user, and the producer's claim was
    checked when it published."""

    def __init__(
        self,
        publisher: Publisher,
        exchange: str,
        counter: Counter,
        *,
        user: str | None,
        logger: logging.Logger,
        stamp: dict[str, object] | None = None,
    ) -> None:
        self.publisher = publisher
        self.exchange = exchange
        self.counter = counter
        self.user = user
        self.log = logger
        self.stamp = dict(stamp or {})

    def carried(self, delivered: F.Delivery, headers: dict[str, Any]) -> F.Properties:
        """The delivery's properties with other headers, minus a foreign ``user_id``."""
        return self._own(delivered.properties.copy(headers=headers))

    def _own(self, props: F.Properties) -> F.Properties:
        if props.user_id is not None and props.user_id != self.user:
            props.user_id = None
        return props

    async def poison(
        self,
        consumer: Consumer | None,
        delivered: F.Delivery,
        reason: str,
        detail: str,
        exception: str | None,
    ) -> None:
        """A message a consumer gave up on (:mod:`bridge.amqp.consumer`): dead-lettered;
        ``consumer`` is None for a consumer that acknowledges on receipt."""
        extra: dict[str, object] | None = {H_DEAD_EXCEPTION: exception} if exception else None
        await self.reject(delivered, reason, detail, ack=consumer, extra=extra)

    async def reject(
        self,
        delivered: F.Delivery,
        reason: str,
        detail: str,
        *,
        ack: Consumer | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Dead-letter ``delivered`` with its reason, then acknowledge it on ``ack``, its
        consumer (None: it was acknowledged on receipt, and a failed publish is only logged)."""
        props = dead_letter_properties(
            delivered,
            reason,
            detail,
            extra={**self.stamp, **(extra or {})} or None,
        )
        try:
            await self.publisher.publish(
                self.exchange, delivered.routing_key, delivered.body, self._own(props)
            )
        except PublishFailed as exc:
            self.log.error(
                "dead-letter publish failed; requeueing" if ack else "dead-letter publish failed",
                extra={"reason": reason, "error": str(exc)},
            )
            if ack is not None:
                await asyncio.sleep(1)
                ack.nack(delivered, requeue=True)
            return
        self.counter.labels(reason).inc()
        self.log.warning("message dead-lettered", extra={"reason": reason, "detail": detail[:200]})
        if ack is not None:
            ack.ack(delivered)
