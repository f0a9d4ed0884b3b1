"""The channel on which a gateway replica reads the offline queues of its connected clients.

One :class:`~bridge.amqp.link.Channel` of the data path's link carries a ``basic.consume``
per client whose offline queue is being read (``gateway.offline.<client_id>``, see
:mod:`workers.gateway.offline`), so that a thousand returning clients cost one channel, not
a thousand (a link has at most 63). Prefetch is per consumer (``basic.qos`` with
``global`` false). Each delivery goes to the handler of its consumer tag, which writes it
to the client and acknowledges it (:meth:`OfflineReader.settle`); a delivery for a
subscription that has ended is returned to its queue (``basic.nack`` with requeue).

After a reconnect, or when the broker closed the channel, its setup consumes again every
subscription still wanted; what was delivered and not acknowledged the broker has put back
in its queue already (in its place), so it comes again. A consume the broker refuses with
404 (the queue expired meanwhile) ends that subscription (``on_gone``) and the channel is
opened again for the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from bridge.amqp import frames as F
from bridge.amqp.link import Channel, Link
from bridge.errors import LinkError

log = logging.getLogger("bridge.gateway")

NOT_FOUND = 404


class Subscription:
    """One queue read for one session: the handler gets its deliveries."""

    __slots__ = ("handler", "key", "queue", "tag")

    def __init__(self, key: str, queue: str, handler: Callable[[F.Delivery], None]) -> None:
        self.key = key  # the session id
        self.queue = queue
        self.handler = handler
        self.tag = ""  # consumer tag while consumed on the channel as it is now


class OfflineReader(Channel):
    """The consumes of the offline queues, multiplexed on one channel (see the module)."""

    link: Link  # the link itself (a Channel names it by the shape channels need)

    def __init__(
        self, link: Link, *, prefetch: int, on_gone: Callable[[Subscription], None]
    ) -> None:
        super().__init__(link, name="gateway offline replies")
        self.prefetch = prefetch
        self.on_gone = on_gone
        self.wanted: dict[str, Subscription] = {}  # by key: consumed again after a reopen
        self._by_tag: dict[str, Subscription] = {}
        self._tags = 0  # consumer tags are numbered here

    # -- the owner's side --------------------------------------------------------------

    async def subscribe(self, sub: Subscription) -> bool:
        """Consume ``sub.queue`` from now on (and after reconnects, until
        :meth:`unsubscribe`). False if the queue does not exist (then nothing is wanted)."""
        self.wanted[sub.key] = sub
        if not self.is_open:
            return True  # the setup consumes it
        try:
            await self._consume(sub)
        except LinkError as exc:
            if exc.code == NOT_FOUND:
                self.wanted.pop(sub.key, None)
                self.link.restart_channel(self, "an offline queue is gone")
                return False
            # the connection or the channel went: its setup consumes it again
        return True

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop consuming ``sub.queue``; its deliveries still on the way go back to it."""
        self.wanted.pop(sub.key, None)
        tag, sub.tag = sub.tag, ""
        if tag and self._by_tag.pop(tag, None) is not None and self.is_open:
            self.link.spawn(self._cancel(tag), f"cancel {sub.queue}")

    def settle(self, delivery: F.Delivery, *, ok: bool) -> None:
        """Acknowledge a delivery written to its client, or put it back in its queue."""
        if delivery.epoch != self.epoch or not self.is_open:
            return  # from before a reopen: the broker has put it back already
        frame = (
            F.ack_frame(self.number, delivery.delivery_tag, False)
            if ok
            else F.nack_frame(self.number, delivery.delivery_tag, False, True)
        )
        with contextlib.suppress(LinkError):
            self.write(frame)

    # -- the link's side ---------------------------------------------------------------

    async def setup(self) -> None:
        self._by_tag.clear()
        for sub in self.wanted.values():
            sub.tag = ""
        await self.call(F.BasicQos(prefetch_count=self.prefetch, global_=False), F.BasicQosOk)
        for sub in list(self.wanted.values()):
            try:
                await self._consume(sub)
            except LinkError as exc:
                if exc.code == NOT_FOUND:
                    # the channel is closed now: the link opens it again, without this one
                    self.wanted.pop(sub.key, None)
                    self.on_gone(sub)
                raise

    def on_event(self, event: Any) -> None:
        if type(event) is F.Delivery:
            event.epoch = self.epoch
            sub = self._by_tag.get(event.consumer_tag)
            if sub is None:
                self.settle(event, ok=False)  # unsubscribed meanwhile
                return
            sub.handler(event)
        elif isinstance(event, F.BasicCancel):
            # the broker cancelled it: its queue was deleted
            sub = self._by_tag.pop(event.consumer_tag, None)
            if sub is not None:
                sub.tag = ""
                self.wanted.pop(sub.key, None)
                self.on_gone(sub)

    def on_closed(self, code: int, text: str) -> None:
        self._by_tag.clear()

    def on_lost(self) -> None:
        self._by_tag.clear()

    # -- internals ---------------------------------------------------------------------

    async def _consume(self, sub: Subscription) -> None:
        # The tag is ours, known before the consume is sent: the broker may deliver in the
        # same read as its consume-ok, before this coroutine runs again, and a delivery for
        # a tag not known yet would go back to the queue behind the ones after it.
        self._tags += 1
        tag = sub.tag = f"gateway-offline-{self._tags}"
        self._by_tag[tag] = sub
        try:
            await self.call(
                F.BasicConsume(
                    queue=sub.queue, consumer_tag=tag, no_ack=False, exclusive=False, arguments={}
                ),
                F.BasicConsumeOk,
            )
        except BaseException:
            if self._by_tag.get(tag) is sub:
                del self._by_tag[tag]
                sub.tag = ""
            raise

    async def _cancel(self, tag: str) -> None:
        with contextlib.suppress(LinkError):
            await self.call(F.BasicCancel(consumer_tag=tag), F.BasicCancelOk)
