"""The control RPC of the delay worker on ``delay.control``: cancel, counts and list.

Requests are parsed by :mod:`workers.delay.wire`; answers go to ``reply_to`` through the
default exchange (``mandatory`` off: a requester that left is not an error). Counts and
lists are read from SQLite (read-only connection), not from the in-memory window.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prometheus_client import Counter

from bridge.amqp.consumer import Consumer
from bridge.amqp.frames import Delivery
from bridge.amqp.messages import DeadLetters, reply
from bridge.amqp.publisher import Publisher
from bridge.errors import WireError, encode_error
from workers.delay import shards as sharding
from workers.delay import wire
from workers.delay.config import MISSING_REPLY_TO, DelaySettings
from workers.delay.ledger import Ledger
from workers.delay.shards import DelayShards
from workers.delay.store import DelayStore, Delete

log = logging.getLogger("bridge.delay")


class ControlServer:
    def __init__(
        self,
        ledger: Ledger,
        settings: DelaySettings,
        *,
        shards: DelayShards | None,
        replies: Publisher,
        dead: DeadLetters,
        cancelled: Counter,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.shards = shards
        self.replies = replies
        self.dead = dead
        self.cancelled = cancelled

    async def handle(self, message: Delivery, consumer: Consumer) -> None:
        s = self.settings
        if not message.reply_to:
            await self.dead.reject(
                message,
                MISSING_REPLY_TO,
                "a control request needs reply_to to be answered",
                ack=consumer,
            )
            return
        try:
            if self.shards is not None and not _is_local(message.body, s.max_control_bytes):
                body = wire.dumps(await self._sharded(message.body))
                reply(self.replies, message, body)
                consumer.ack(message)
                return
            request = wire.parse_request(
                message.body, max_bytes=s.max_control_bytes, list_max=s.list_max
            )
            if isinstance(request, wire.Cancel):
                body = wire.dumps(await self._cancel(request))
            elif isinstance(request, wire.Counts):
                body = wire.dumps(await self._counts())
            else:
                body = wire.dumps(await self._list(request))
        except WireError as exc:
            body = encode_error(exc.code, exc.message)
        reply(self.replies, message, body)
        consumer.ack(message)

    async def _sharded(self, raw: bytes) -> dict[str, Any]:
        """A request on the shared control queue: this shard's answer merged with the other
        shards' (see workers.delay.shards)."""
        s = self.settings
        shards = self.shards
        assert shards is not None
        cursor = None
        doc: Any = None
        if len(raw) <= s.max_control_bytes:
            try:
                doc = json.loads(raw)
            except (ValueError, RecursionError):
                doc = None
        if isinstance(doc, dict) and doc.get("op") == "list" and doc.get("after") is not None:
            cursor = sharding.decode_cursor(doc["after"])
            doc = {**doc, "after": None}
            raw = wire.dumps(doc)
        request = wire.parse_request(raw, max_bytes=s.max_control_bytes, list_max=s.list_max)
        me = shards.shard.index
        if isinstance(request, wire.Cancel):
            own = await self._cancel(request)
            replies, missing = await shards.gather(lambda i: doc, own)
            return sharding.DelayShards.merge_cancel(replies, missing)
        if isinstance(request, wire.Counts):
            own = await self._counts()
            replies, missing = await shards.gather(lambda i: doc, own)
            return sharding.DelayShards.merge_counts(replies, missing)
        mine = wire.ListPending(
            request.topic,
            request.limit,
            wire.decode_cursor(sharding.local_after(cursor, me)),
        )
        own = await self._list(mine)
        replies, missing = await shards.gather(
            lambda i: {**doc, "after": sharding.local_after(cursor, i)}, own
        )
        return sharding.DelayShards.merge_list(request.topic, request.limit, replies, missing)

    async def _cancel(self, request: wire.Cancel) -> dict[str, Any]:
        ledger = self.ledger
        store, scheduler, committer = ledger.store, ledger.scheduler, ledger.committer
        # Messages consumed before this request are stored, and in the window if they are
        # due soon (their commits' waiters have run): one admitted later than this look
        # would be sent although its row is cancelled.
        await ledger.commit_now()
        rows = await store.read(DelayStore.select, request.by, request.value)
        doomed: list[tuple[int, str]] = []
        in_flight = False
        for mid, topic in rows:
            if mid in ledger.deleting:
                continue  # confirmed at its target; the delete is being committed
            if scheduler.remove(mid) == "in_flight":
                in_flight = True
                continue
            doomed.append((mid, topic))  # removed from the window, or beyond it
        cancelled = 0
        if doomed:
            op = Delete(doomed)
            ledger.append(op)
            await committer.barrier()
            cancelled = op.deleted
        if cancelled:
            self.cancelled.inc(cancelled)
            return {"cancelled": True, "count": cancelled}
        return {"cancelled": False, "state": "in_flight" if in_flight else "sent_or_unknown"}

    async def _counts(self) -> dict[str, Any]:
        store = self.ledger.store
        counts = await store.read(DelayStore.counts)
        return {
            "topics": {
                topic: {"pending": n, "next_due_ms": first} for topic, (n, first) in counts.items()
            },
            "total": sum(n for n, _ in counts.values()),
        }

    async def _list(self, request: wire.ListPending) -> dict[str, Any]:
        store = self.ledger.store
        rows = await store.read(DelayStore.page, request.topic, request.after, request.limit)
        messages = [
            {
                "id": message_id,
                "mid": mid,
                "key": key,
                "due_ms": due,
                "routing_key": routing_key,
                "size": size,
                "exchange": exchange,
            }
            for mid, due, key, routing_key, message_id, size, exchange in rows
        ]
        last = rows[-1] if len(rows) == request.limit else None
        return {
            "topic": request.topic,
            "messages": messages,
            "next": wire.encode_cursor(last[1], last[0]) if last else None,
        }


def _is_local(raw: bytes, max_bytes: int) -> bool:
    """A shard's own question to another shard (``"local": true``), answered alone."""
    if len(raw) > max_bytes or b'"local"' not in raw:
        return False
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("local") is True
