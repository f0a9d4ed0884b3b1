"""The control RPC of the delay worker on ``delay.control``: cancel, counts and list.

Requests are parsed by :mod:`workers.delay.control`; answers go to ``reply_to`` through the
default exchange (``mandatory`` off: a requester that left is not an error). Counts and
lists are read from SQLite (read-only connection), not from the in-memory window.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from workers.delay import control
from workers.delay.acks import Slot
from workers.delay.config import MISSING_REPLY_TO, REPLY_CONTENT_TYPE
from workers.delay.lanes import OutgoingMessage
from workers.delay.store import DelayStore, Delete, build_properties, props_of

if TYPE_CHECKING:
    from workers.delay.worker import DelayWorker

log = logging.getLogger("bridge.delay")


class ControlRpc:
    def __init__(self, worker: DelayWorker, reply_channel: AbstractChannel) -> None:
        self.worker = worker
        self.reply_channel = reply_channel

    async def _reply(self, message: AbstractIncomingMessage, body: bytes) -> None:
        assert message.reply_to
        props: dict[str, Any] = {"content_type": REPLY_CONTENT_TYPE, "delivery_mode": 1}
        if message.correlation_id:
            props["correlation_id"] = message.correlation_id
        reply = OutgoingMessage(body, build_properties(props, None))
        try:
            await self.reply_channel.default_exchange.publish(
                reply, routing_key=message.reply_to, mandatory=False
            )
        except Exception as exc:  # the requester is gone or the channel is reconnecting
            log.info("reply not sent", extra={"reply_to": message.reply_to, "error": str(exc)})

    async def handle(self, message: AbstractIncomingMessage, slot: Slot) -> None:
        w = self.worker
        s = w.settings
        if not message.reply_to:
            await w.dead_letter_delivery(
                message.body,
                props_of(message),
                message.headers,
                message.routing_key or "",
                slot,
                MISSING_REPLY_TO,
                "a control request needs reply_to to be answered",
            )
            return
        try:
            request = control.parse_request(
                message.body, max_bytes=s.max_control_bytes, list_max=s.list_max
            )
            if isinstance(request, control.Cancel):
                body = control.dumps(await self._cancel(request))
            elif isinstance(request, control.Counts):
                body = control.dumps(await self._counts())
            else:
                body = control.dumps(await self._list(request))
        except control.ControlError as exc:
            body = control.encode_error(exc.code, exc.message)
        await self._reply(message, body)
        await w._acks.ack(slot)

    async def _cancel(self, request: control.Cancel) -> dict[str, Any]:
        w = self.worker
        store, scheduler, committer = w.store, w.scheduler, w.committer
        assert store is not None and scheduler is not None and committer is not None
        await committer.barrier()  # messages consumed before this request are stored
        rows = await store.read(DelayStore.select, request.by, request.value)
        doomed: list[tuple[int, str]] = []
        in_flight = False
        for mid, topic in rows:
            if mid in w._deleting:
                continue  # confirmed at its target; the delete is being committed
            if scheduler.remove(mid) == "in_flight":
                in_flight = True
                continue
            doomed.append((mid, topic))  # removed from the window, or beyond it
        cancelled = 0
        if doomed:
            op = Delete(doomed)
            w._journal.append(op)
            await committer.barrier()
            cancelled = op.deleted
        if cancelled:
            w.metrics.cancelled.inc(cancelled)
            return {"cancelled": True, "count": cancelled}
        return {"cancelled": False, "state": "in_flight" if in_flight else "sent_or_unknown"}

    async def _counts(self) -> dict[str, Any]:
        store = self.worker.store
        assert store is not None
        counts = await store.read(DelayStore.counts)
        return {
            "topics": {
                topic: {"pending": n, "next_due_ms": first} for topic, (n, first) in counts.items()
            },
            "total": sum(n for n, _ in counts.values()),
        }

    async def _list(self, request: control.ListPending) -> dict[str, Any]:
        store = self.worker.store
        assert store is not None
        rows = await store.read(DelayStore.page, request.topic, request.after, request.limit)
        messages = [
            {
                "id": message_id,
                "mid": mid,
                "key": key,
                "due_ms": due,
                "routing_key": routing_key,
                "size": size,
            }
            for mid, due, key, routing_key, message_id, size in rows
        ]
        last = rows[-1] if len(rows) == request.limit else None
        return {
            "topic": request.topic,
            "messages": messages,
            "next": control.encode_cursor(last[1], last[0]) if last else None,
        }
