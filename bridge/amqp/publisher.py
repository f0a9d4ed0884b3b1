"""Publishing on a :class:`~bridge.amqp.link.Link`: windowed, pipelined, one socket write
per flush, one outcome per message.

``publish`` queues the message and returns a future at once. Once per event-loop turn the
publisher encodes everything queued (method, content header and body frames, the method
frame cached per target) and writes it with one ``transport.write``; with confirms on, at
most ``window`` publishes are unconfirmed, the rest wait in the queue (in order). The
future resolves when the broker confirms, or fails with :class:`~bridge.errors.PublishFailed`
with a reason from :mod:`bridge.amqp.confirms` (or ``unencodable``, decided before
anything is written). Without confirms the future resolves once written.

While the link is down, blocked by a resource alarm, or its socket buffer is full,
publishes wait in the queue; :meth:`Publisher.expire` (run by the link's owner, or every
second by :meth:`Publisher.start_expiry`) fails those that waited longer than
``timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bridge.amqp import frames as F
from bridge.amqp.channel import Channel
from bridge.amqp.confirms import TIMEOUT, ConfirmTracker, Outcome
from bridge.amqp.link import Link
from bridge.errors import PublishFailed

log = logging.getLogger("bridge.amqp.publisher")

UNENCODABLE = "unencodable"

# exchange, routing key, body, encoded properties, message id, mandatory, future, queued at
_Queued = tuple[str, str, bytes, bytes, "str | None", bool, "asyncio.Future[None]", float]


async def settled(futures: list[asyncio.Future[None]]) -> list[BaseException | None]:
    """Wait until every publish in ``futures`` has its outcome; each one's error or None.

    Cheaper than ``gather`` for a batch: confirms mostly settle in publish order, so one
    await on the last (the others are done by then, or awaited in turn) instead of a
    callback per future. A publish future is never cancelled, so only the waiting caller's
    own cancellation ends this early."""
    for fut in reversed(futures):
        if not fut.done():
            try:  # not contextlib.suppress: it costs more, once per batch on a hot path
                await fut
            except Exception:  # its outcome is read below
                pass
    return [fut.exception() for fut in futures]


class Publisher(Channel):
    """One publishing channel of a link (see the module)."""

    link: Link

    def __init__(
        self,
        link: Link,
        *,
        name: str = "publisher",
        confirms: bool = True,
        window: int = 1024,
        timeout: float = 30.0,
        confirm_seconds: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(link, name=name)
        self.confirms = confirms
        self.window = window
        self.timeout = timeout
        self.confirm_seconds = confirm_seconds
        self.tracker = ConfirmTracker()
        self.published = 0
        self.flushes = 0
        self._queue: deque[_Queued] = deque()
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        self._flush_scheduled = False
        self._expiry: asyncio.TimerHandle | None = None

    # -- the caller's side -------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: F.Properties | bytes | None = None,
        *,
        mandatory: bool = True,
        message_id: str | None = None,
    ) -> asyncio.Future[None]:
        """Queue one publish. ``properties`` may be given encoded
        (:meth:`~bridge.amqp.frames.Properties.encode`), then ``message_id`` must be the
        one inside them (returns are matched by it)."""
        fut: asyncio.Future[None] = self.link.loop.create_future()
        if properties is None:
            encoded = b"\x00\x00"
        elif isinstance(properties, F.Properties):
            try:
                encoded = properties.encode()
            except F.EncodeError as exc:
                fut.set_exception(PublishFailed(UNENCODABLE, str(exc)))
                return fut
            message_id = properties.message_id
        else:
            encoded = properties
        self._queue.append(
            (exchange, routing_key, body, encoded, message_id, mandatory, fut, time.monotonic())
        )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.link.request_flush(self)
        return fut

    @property
    def in_flight(self) -> int:
        """Publishes written and not confirmed yet."""
        return len(self.tracker)

    @property
    def queued(self) -> int:
        """Publishes waiting to be written."""
        return len(self._queue)

    def start_expiry(self, every_s: float = 1.0) -> None:
        """Fail publishes older than ``timeout`` every ``every_s`` (see :meth:`expire`)."""

        def tick() -> None:
            self.expire(time.monotonic())
            self._expiry = self.link.loop.call_later(every_s, tick)

        if self._expiry is None:
            self._expiry = self.link.loop.call_later(every_s, tick)

    def stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def expire(self, now: float) -> int:
        """Fail what waited longer than ``timeout``, unwritten or unconfirmed."""
        failed = self._deliver(self.tracker.expire(now, self.timeout))
        queue = self._queue
        while queue and now - queue[0][7] > self.timeout:
            fut = queue.popleft()[6]
            if not fut.done():
                fut.set_exception(
                    PublishFailed(TIMEOUT, f"not written within {self.timeout:g}s: {self._why()}")
                )
                failed += 1
        return failed

    def fail_all(self, why: str) -> None:
        """Fail everything queued and unconfirmed (shutdown)."""
        self.stop_expiry()
        self._deliver(self.tracker.on_connection_lost(why))
        while self._queue:
            fut = self._queue.popleft()[6]
            if not fut.done():
                fut.set_exception(PublishFailed("connection_lost", why))

    def _why(self) -> str:
        link = self.link
        if not link.connected:
            return "broker not connected"
        if link.blocked is not None:
            return f"broker blocks publishing ({link.blocked})"
        if not self.is_open:
            return "channel reopening"
        return "publish window full"

    # -- the link's side ---------------------------------------------------------------

    async def setup(self) -> None:
        if self.confirms:
            await self.call(F.ConfirmSelect(), F.ConfirmSelectOk)

    def on_writable(self) -> None:
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self.link.request_flush(self)

    def on_event(self, event: Any) -> None:
        if isinstance(event, F.BasicAck):
            self._deliver(self.tracker.on_ack(event.delivery_tag, event.multiple))
            self.on_writable()
        elif isinstance(event, F.BasicNack):
            self._deliver(self.tracker.on_nack(event.delivery_tag, event.multiple))
            self.on_writable()
        elif isinstance(event, F.Returned):
            self.tracker.on_return(
                event.reply_code,
                event.reply_text,
                event.exchange,
                event.routing_key,
                event.properties.message_id,
            )

    def on_closed(self, code: int, text: str) -> None:
        failed, resend = self.tracker.on_channel_closed(code, text)
        self._deliver(failed)
        # never read by the broker (it discards a closing channel's frames): written again,
        # first, in their order, once the channel is open again
        self._queue.extendleft(reversed(resend))

    def on_lost(self) -> None:
        self._deliver(self.tracker.on_connection_lost())

    def _deliver(self, outcomes: list[Outcome]) -> int:
        failed = 0
        now = time.monotonic()
        observe = self.confirm_seconds
        for queued, error in outcomes:
            fut = queued[6]
            if observe is not None:
                observe(now - queued[7])
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
                failed += 1
        return failed

    def flush(self) -> None:
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue = self._queue
        if not queue or not self.is_open or not self.link.can_publish:
            return
        room = self.window - len(self.tracker) if self.confirms else len(queue)
        if room <= 0:
            return  # confirms make room, and flush again
        number = self.number
        frame_max = self.link.frame_max
        methods = self._methods
        tracker = self.tracker
        confirms = self.confirms
        out: list[bytes] = []
        written: list[asyncio.Future[None]] = []
        while queue and room > 0:
            queued = queue.popleft()
            exchange, routing_key, body, props, message_id, mandatory, fut, queued_at = queued
            if fut.done():  # the caller gave up on it
                continue
            key = (exchange, routing_key, mandatory)
            method = methods.get(key)
            if method is None:
                try:
                    method = F.publish_frame(number, exchange, routing_key, mandatory)
                except F.EncodeError as exc:
                    fut.set_exception(PublishFailed(UNENCODABLE, str(exc)))
                    continue
                if len(methods) > 10_000:
                    methods.clear()
                methods[key] = method
            out.append(method)
            out.append(F.content_frames(number, props, body, frame_max))
            if confirms:
                tracker.sent(queued, exchange, routing_key, message_id, queued_at)
            else:
                written.append(fut)
            room -= 1
        if not out:
            return
        self.link.write(b"".join(out))
        self.flushes += 1
        self.published += len(out) // 2
        for fut in written:
            if not fut.done():
                fut.set_result(None)
        if queue and room > 0:
            self.on_writable()

    def close(self) -> None:
        self.fail_all("publisher closed")
