"""What every worker does with a delivery besides its own logic: answer it on its
``reply_to``, or dead-letter it with a reason. One copy of each, on the data path."""

from __future__ import annotations

import logging

from bridge.amqp import frames as F
from bridge.amqp.publisher import Publisher

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
    detail: str,
    *,
    reason_header: str,
    detail_header: str,
    extra: dict[str, object] | None = None,
) -> F.Properties:
    """The delivery's properties for a dead-letter exchange: persistent, with the reason
    and a readable detail added to its headers. Headers that could not be decoded (the
    delivery's ``properties.error``) or cannot be encoded again (a value AMQP's types do
    not hold as decoded) are replaced by the reason alone, and the detail says so: a dead
    letter must not fail for the very headers that made it one."""
    props = delivery.properties
    headers = dict(props.headers or {})
    if props.error:
        detail = f"{detail[:400]} (original headers dropped: {props.error})"
    headers[reason_header] = reason
    headers[detail_header] = detail[:500]
    if extra:
        headers.update(extra)
    out = props.copy(headers=headers, delivery_mode=2)
    try:
        out.encode()
    except F.EncodeError as exc:
        headers = {
            **(extra or {}),
            reason_header: reason,
            detail_header: f"{detail[:400]} (original headers dropped: {exc})"[:500],
        }
        out = props.copy(headers=headers, delivery_mode=2)
    return out
