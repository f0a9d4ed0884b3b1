"""Replies from the servers to their clients: consumed from the gateway's reply queue and
written to the session named in ``x-session``; a reply nobody can take (no such session,
session gone, headers that cannot be decoded) is kept in ``gateway.undeliverable`` with
``x-dead-reason``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from bridge.amqp import header_str
from bridge.amqp.consumer import H_DEAD_EXCEPTION
from bridge.amqp.frames import Delivery
from bridge.amqp.messages import dead_letter_properties
from bridge.amqp.publisher import Publisher
from workers.gateway.config import (
    DEAD_INVALID_HEADERS,
    DEAD_NO_SESSION,
    DEAD_SESSION_GONE,
    DEAD_TOO_LARGE,
    H_CLOSE,
    H_SESSION,
    GatewaySettings,
)
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.offline import OfflineReplies
from workers.gateway.session import OPEN, Session

log = logging.getLogger("bridge.gateway")


def _truthy(value: Any) -> bool:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and value is not None


class Replies:
    def __init__(
        self,
        sessions: dict[str, Session],
        publisher: Publisher,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        offline: OfflineReplies | None = None,
    ) -> None:
        self.sessions = sessions
        self.publisher = publisher
        self.settings = settings
        self.metrics = metrics
        self.offline = offline  # keeps replies for sticky clients that are offline
        if offline is not None:
            offline.dead = self._undeliverable

    def on_reply(self, delivery: Delivery) -> None:
        properties = delivery.properties
        if properties.headers is None and properties.error is not None:
            # The headers table could not be decoded (nested too deep, malformed): which
            # session it is for is unknown. Kept for an operator; the next reply goes on.
            self._undeliverable(delivery, DEAD_INVALID_HEADERS, properties.error)
            return
        reason = self._route_reply(properties.headers, delivery.body)
        if reason == DEAD_SESSION_GONE and self.offline is not None and self.offline.keep(delivery):
            return  # kept for its client_id, until it connects again
        if reason is not None:
            self._undeliverable(delivery, reason)

    def _route_reply(self, headers: dict[str, Any] | None, body: bytes) -> str | None:
        """Write a reply to its session; the undeliverable reason if there is none."""
        if not headers:
            return DEAD_NO_SESSION
        sid = header_str(headers.get(H_SESSION))
        if not sid:
            return DEAD_NO_SESSION
        session = self.sessions.get(sid)
        if session is None or session.state != OPEN:
            return DEAD_SESSION_GONE
        close = _truthy(headers.get(H_CLOSE))
        if body or not close:
            try:
                session.send_data(body)
            except ValueError:  # longer than the listener's length prefix can say
                return DEAD_TOO_LARGE
        if close:
            session.close_gracefully("server_close")
        return None

    async def failed(
        self, delivery: Delivery, reason: str, detail: str, exception: str | None
    ) -> None:
        """Handling a reply raised (the consumer's poison, bridge.amqp.consumer): kept, not
        lost (replies are consumed with no_ack)."""
        self._undeliverable(
            delivery, reason, detail, {H_DEAD_EXCEPTION: exception} if exception else None
        )

    def _undeliverable(
        self,
        delivery: Delivery,
        reason: str,
        detail: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Keep a reply nobody can take in ``gateway.undeliverable``: its body, properties
        and headers, persistent, with ``x-dead-reason`` (and ``x-dead-detail`` when there is
        one), as every dead letter (:func:`bridge.amqp.messages.dead_letter_properties`:
        headers that cannot be decoded or written again are dropped, the detail says so).
        ``reply_to``, ``expiration``, ``user_id`` and ``cluster_id`` are not carried over:
        the kept reply answers nobody, must not expire on the server's TTL, and a
        ``user_id`` other than the gateway's would make the broker close the publishing
        channel."""
        self.metrics.undeliverable.labels(reason).inc()
        properties = dead_letter_properties(
            delivery,
            reason,
            detail,
            extra=extra,
            reply_to=None,
            expiration=None,
            user_id=None,
            cluster_id=None,
        )
        # encodable: dead_letter_properties dropped whatever headers were not
        fut = self.publisher.publish(
            "", self.settings.undeliverable_queue, delivery.body, properties.encode()
        )
        fut.add_done_callback(functools.partial(_undeliverable_done, reason))


def _undeliverable_done(reason: str, fut: asyncio.Future[None]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.error(
            "undeliverable reply could not be kept", extra={"reason": reason, "error": str(exc)}
        )
