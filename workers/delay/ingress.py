"""The ingress of the delay worker: messages published to ``delay.in`` (or its shard queue).

A delivery's headers are parsed (:func:`workers.delay.wire.parse_ingress`); a refused one is
dead-lettered with its reason; on sharded workers a keyless message that another shard owns
is forwarded to that shard's queue; the rest is journaled as an insert and acknowledged once
the commit that holds it is done. A message due within the window goes into it then.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter

from bridge.amqp.consumer import Consumer
from bridge.amqp.frames import Delivery
from bridge.amqp.messages import DeadLetters
from bridge.amqp.publisher import UNENCODABLE, Publisher
from bridge.errors import PublishFailed
from bridge.sharding import Shard, chx_header_bucket, header_hash_typed, shard_queue
from workers.delay.config import DelaySettings
from workers.delay.ledger import Ledger, ingress_linger_ms, now_ms
from workers.delay.shards import H_FORWARDED_FROM, digest_id, forwarded_headers
from workers.delay.store import Insert, KeyDelete, stored_properties
from workers.delay.wire import (
    INVALID_HEADERS,
    X_DELAY_KEY,
    Reject,
    parse_ingress,
    strip_control_headers,
    topic_of,
)

log = logging.getLogger("bridge.delay")


class Ingress:
    """Handles the ingress consumer's deliveries; :attr:`consumer` is set by the worker."""

    def __init__(
        self,
        ledger: Ledger,
        settings: DelaySettings,
        shard: Shard,
        *,
        forwards: Publisher,
        dead: DeadLetters,
        received: Counter,
        replaced: Counter,
        kick: Callable[[], None],
        misrouted: Callable[[], None] | None = None,
        broker_version: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.shard = shard
        self.forwards = forwards
        self.dead = dead
        self.received = received
        self._accepted = received.labels("accepted")
        self.replaced = replaced
        self.kick = kick
        # a keyed message reached a shard that does not own it: the ring is out of order
        self.misrouted = misrouted
        # the version the broker announced: how its consistent-hash exchange hashes a header
        self.broker_version = broker_version
        self.topic_rule = settings.topic_rule
        self.consumer: Consumer | None = None
        # the shared commit the latest deliveries wait for, and those deliveries: one
        # callback per commit acknowledges them all
        self._commit: asyncio.Future[None] | None = None
        self._waiting: list[tuple[Delivery, Insert, KeyDelete | None]] = []

    def on_delivery(self, delivered: Delivery) -> Coroutine[Any, Any, None] | None:
        """One ingress delivery. The common path (stored, then acknowledged after the
        commit) runs here and in :meth:`_stored` without a task of its own; a dead letter or
        a forward to another shard is returned as a coroutine, which the consumer runs as a
        task."""
        s = self.settings
        ledger = self.ledger
        scheduler = ledger.scheduler
        consumer = self.consumer
        assert consumer is not None
        properties = delivered.properties
        headers = properties.headers
        now = now_ms()
        if properties.error:
            decision: Any = Reject(INVALID_HEADERS, f"not decodable: {properties.error}")
        else:
            decision = parse_ingress(
                headers, now, horizon_ms=s.horizon_ms, default_target=s.default_target
            )
        if isinstance(decision, Reject):
            self.received.labels("rejected").inc()
            return self.dead.reject(delivered, decision.reason, decision.detail, ack=consumer)
        if self.shard.sharded:
            owner, new_id = self._owner(delivered, decision.key is not None)
            if owner != self.shard.index:
                if decision.key is not None and self.misrouted is not None:
                    self.misrouted()
                if not headers or H_FORWARDED_FROM not in headers:
                    return self._forward(delivered, decision.due_ms, owner, new_id)
                # forwarded here by a shard that thinks this one owns it: keep it (never
                # forward twice) and say that the shards disagree on the shard count
                log.error(
                    "forwarded message not owned by this shard: check SHARD_COUNT on every shard",
                    extra={"owner": owner, "shard": self.shard.index},
                )
        # What can fail for this input (a header value that cannot be written again) comes
        # before any change of state: the consumer requeues it, then gives it up (poison).
        # A stable id: a re-publish after a crash carries the same one.
        message_id = properties.message_id or uuid.uuid4().hex
        props = stored_properties(
            properties, strip_control_headers(headers), message_id, delivered.raw_properties
        )
        mid = ledger.next_mid()
        key = decision.key
        replace: KeyDelete | None = None
        if key is not None:
            scheduler.remove_key(key)
            replace = KeyDelete(key, mid, scheduler.key_mids(key))
            ledger.append(replace)
        exchange = decision.exchange
        topic = topic_of(self.topic_rule, exchange, delivered.routing_key, headers)
        op = Insert(
            mid=mid,
            due_ms=decision.due_ms,
            topic=topic,
            exchange=None if topic == exchange else exchange,
            routing_key=delivered.routing_key,
            key=key,
            message_id=message_id,
            props=props,
            body=delivered.body,
        )
        ledger.append(op)
        waiting = len(self._waiting) if self._commit is not None else 0
        commit = ledger.stored(ingress_linger_ms(s, decision.due_ms - now, waiting))
        if commit is not self._commit:
            self._commit, self._waiting = commit, []
            commit.add_done_callback(functools.partial(self._stored, self._waiting))
        self._waiting.append((delivered, op, replace))
        return None

    def _stored(
        self,
        waiting: list[tuple[Delivery, Insert, KeyDelete | None]],
        stored: asyncio.Future[None],
    ) -> None:
        """The commit that holds the ``waiting`` deliveries' inserts is done (or failed: the
        deliveries go back to the queue)."""
        consumer = self.consumer
        assert consumer is not None
        if self._commit is stored:
            self._commit = None
        error = None if stored.cancelled() else stored.exception()
        if stored.cancelled() or error is not None:
            log.error(
                "ingress commit failed; the messages go back to their queue",
                extra={"error": repr(error) if error else "cancelled", "messages": len(waiting)},
            )
            for delivered, _, _ in waiting:
                consumer.nack(delivered, requeue=True)
            return
        admitted = False
        admit = self.ledger.admit
        for delivered, op, replace in waiting:
            if op.in_window:
                # A keyless message's row goes into the window with it (its lane need not
                # read it back); a keyed one may be replaced by a row deleted in a later
                # commit, so its lane reads the store, which says whether it is still there.
                admit(op.mid, op.due_ms, op.topic, op.key, None if op.key else op.read_back())
                admitted = True
            if replace is not None and replace.deleted:
                self.replaced.inc(replace.deleted)
            consumer.ack(delivered)
        self._accepted.inc(len(waiting))
        if admitted:
            self.kick()

    def _owner(self, delivered: Delivery, keyed: bool) -> tuple[int, str | None]:
        """The shard that owns a message and, for a keyless one without an id, the stable id
        it is forwarded with. A keyed message's owner is the shard the exchange routes its
        ``x-delay-key`` to when the ring is in shard order (computed exactly, typed value
        and all), so while a reordered ring is repaired every version of a key still ends in
        one store; a keyless one's is its message_id's."""
        props = delivered.properties
        if keyed:
            raw = (props.headers or {}).get(X_DELAY_KEY)
            typed = header_hash_typed(self.broker_version())
            owner = chx_header_bucket(raw, self.shard.count, typed=typed)
            return (self.shard.index if owner is None else owner), None
        message_id = props.message_id
        if not message_id:
            message_id = digest_id(delivered.routing_key or "", props.headers, delivered.body)
            return self.shard.owner(message_id), message_id
        return self.shard.owner(message_id), None

    async def _forward(
        self, delivered: Delivery, due_ms: int, owner: int, new_id: str | None
    ) -> None:
        """A message that belongs to another shard: hand it to the owner's queue (confirmed)
        before acknowledging it here."""
        consumer = self.consumer
        assert consumer is not None
        headers = forwarded_headers(delivered.properties.headers, due_ms, self.shard)
        props = self.dead.carried(delivered, headers)
        if new_id is not None:
            props.message_id = new_id
        try:
            await self.forwards.publish(
                "",
                shard_queue(self.settings.in_queue, owner),
                delivered.body,
                props,
            )
        except PublishFailed as exc:
            if exc.reason == UNENCODABLE:  # its headers cannot be written again: never will
                self.received.labels("rejected").inc()
                await self.dead.reject(
                    delivered,
                    INVALID_HEADERS,
                    f"cannot be forwarded to shard {owner}: {exc.detail}",
                    ack=consumer,
                )
                return
            log.error(
                "forward to the key's shard failed; requeueing",
                extra={"owner": owner, "error": str(exc)},
            )
            await asyncio.sleep(1)
            consumer.nack(delivered)
            return
        self.received.labels("forwarded").inc()
        consumer.ack(delivered)
