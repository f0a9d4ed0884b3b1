"""The gateway's own AMQP connection for its per-message traffic.

One TCP connection to the broker, an ``asyncio.Protocol``: channel 1 publishes client
messages to the server queues (confirm mode, ``mandatory``), channel 2 consumes the
gateway's reply queue. Per message it does what a hand-written client would: a publish is
one ``bytes`` appended to a write buffer that is flushed once per event-loop iteration,
confirms and deliveries are decoded by :mod:`workers.gateway.amqp_codec` without pamqp
objects, and no task or lock exists per message. pamqp encodes and decodes the rest
(handshake, channel setup, closes, returns).

It is the same contract as :class:`~workers.gateway.amqp_io.BatchPublisher` +
:class:`~workers.gateway.amqp_io.RawConsumer` (the worker takes either, setting
``amqp_link``):

- ``publish`` returns a future resolved at the broker's confirm, or failed with
  :class:`~bridge.errors.PublishFailed` ("nacked", "unroutable", "channel_error" when the
  channel or connection is lost with the publish unconfirmed, "timeout" from ``expire``);
- while the connection is down, publishes wait for the reconnect (``expire`` fails those
  older than ``timeout``); the link reconnects with backoff, declares the reply queue again
  (same arguments) and consumes it again;
- a channel the broker closes (e.g. 404, 403) is opened again, the publishes it had
  unconfirmed fail; the connection stays;
- a full socket buffer towards the broker (``pause_writing``) holds the publishes back, so
  the gateway's publish window fills and the sessions stop reading their sockets.

Replies are consumed with ``no_ack`` and an exclusive consumer, as before (see
docs/gateway.md, "Reply queue acknowledgements").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands as spec
from pamqp.commands import Basic

from bridge.errors import PublishFailed
from workers.gateway import amqp_codec as codec
from workers.gateway.amqp_io import Prepared, Properties

log = logging.getLogger("bridge.gateway")

PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2

# (tag, future, message id, routing key, queued at (monotonic))
_Entry = list[Any]
_NO_ENTRY: Any = None
# routing key, body, properties, future, queued at
_Queued = tuple[str, bytes, "Properties | Prepared", "asyncio.Future[None]", float]


class LinkError(Exception):
    """The broker refused the link (handshake, channel, consumer); ``code`` is AMQP's."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def _parse_url(url: str) -> dict[str, Any]:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an AMQP URL: {u.scheme}://")
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    query = urllib.parse.parse_qs(u.query)
    heartbeat: int | None = None
    if "heartbeat" in query:  # as aio-pika reads it from the same URL
        heartbeat = int(query["heartbeat"][0])
    return {
        "heartbeat": heartbeat,
        "host": u.hostname or "localhost",
        "port": u.port or (5671 if u.scheme == "amqps" else 5672),
        "user": urllib.parse.unquote(u.username or "guest"),
        "password": urllib.parse.unquote(u.password or "guest"),
        "vhost": vhost,
        "tls": u.scheme == "amqps",
    }


class _Protocol(asyncio.Protocol):
    """Bytes in and out for one connection of the :class:`AmqpLink`."""

    def __init__(self, link: AmqpLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.decoder = codec.Decoder()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.last_read = link.loop.time()
        try:
            events = self.decoder.feed(data)
        except codec.FrameError as exc:
            log.error("broker sent an undecodable frame; reconnecting", extra={"error": str(exc)})
            if self.transport is not None:
                self.transport.abort()
            return
        link.handle(self, events)

    def pause_writing(self) -> None:
        self.link.write_paused = True

    def resume_writing(self) -> None:
        self.link.write_paused = False
        self.link.schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.link.connection_lost(self, exc)


class AmqpLink:
    """Publishes with confirms and one reply-queue consumer on a connection of its own."""

    def __init__(
        self,
        url: str,
        reply_queue: str,
        on_reply: Callable[[codec.Delivery], None],
        *,
        reply_queue_arguments: dict[str, Any] | None = None,
        timeout: float = 30.0,
        heartbeat_s: int = 30,
        confirm_seconds: Callable[[float], None] | None = None,
        name: str = "gateway",
    ) -> None:
        self.url = url
        self.params = _parse_url(url)
        self.reply_queue = reply_queue
        self.reply_queue_arguments = reply_queue_arguments
        self.on_reply = on_reply
        self.timeout = timeout
        self.heartbeat_s = (
            heartbeat_s if self.params["heartbeat"] is None else self.params["heartbeat"]
        )
        self.confirm_seconds = confirm_seconds
        self.name = name
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self.batches = 0
        self.published = 0
        self.reconnects = 0
        self.write_paused = False
        self.last_read = self.last_write = 0.0
        self._proto: _Protocol | None = None
        self._frame_max = 131072
        self._heartbeat = 0
        self._open: set[int] = set()  # channels open and set up
        self._consuming = False
        self._queue: list[_Queued] = []
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._methods: dict[str, bytes] = {}  # encoded basic.publish frames per routing key
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:12]
        self._tag = 0
        self._unconfirmed: deque[_Entry] = deque()
        self._by_tag: dict[int, _Entry] = {}
        self._returned: set[str] = set()
        self._waiters: list[tuple[int, type, asyncio.Future[Any]]] = []
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._channel_tasks: set[asyncio.Task[None]] = set()

    # -- the worker's side -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, open both channels and consume; raise what the first attempt met."""
        self._first = self.loop.create_future()
        self._task = self.loop.create_task(self._run(), name="gateway-amqp-link")
        try:
            await self._first
        except BaseException:
            await self.close()
            raise

    @property
    def consuming(self) -> bool:
        return self._consuming

    @property
    def connected(self) -> bool:
        return PUBLISH_CHANNEL in self._open

    async def ensure(self) -> bool:
        """The worker's housekeeping asks this of any reply consumer; the link resubscribes
        by itself."""
        return False

    async def cancel(self) -> None:
        """Stop consuming (shutdown): deliveries after this are not passed on."""
        self._consuming = False
        self.on_reply = _drop

    def publish(
        self, routing_key: str, body: bytes, properties: Properties | Prepared
    ) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        self._queue.append((routing_key, body, properties, fut, time.monotonic()))
        if not self._flush_scheduled and PUBLISH_CHANNEL in self._open:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return fut

    def expire(self, now: float) -> int:
        """Fail publishes unconfirmed, or unwritten, for longer than the timeout."""
        failed = 0
        timeout = self.timeout
        unconfirmed = self._unconfirmed
        while unconfirmed:
            entry = unconfirmed[0]
            fut = entry[1]
            if not fut.done() and now - entry[4] <= timeout and entry[0] in self._by_tag:
                break
            unconfirmed.popleft()
            if self._by_tag.pop(entry[0], _NO_ENTRY) is not None and not fut.done():
                fut.set_exception(PublishFailed("timeout", f"no confirm in {timeout}s"))
                failed += 1
        if self._queue and now - self._queue[0][4] > timeout:
            keep = []
            for item in self._queue:
                fut = item[3]
                if fut.done():
                    continue
                if now - item[4] > timeout:
                    fut.set_exception(
                        PublishFailed("timeout", f"broker not reachable for {timeout}s")
                    )
                    failed += 1
                else:
                    keep.append(item)
            self._queue = keep
        return failed

    async def close(self) -> None:
        self._closing = True
        self._consuming = False
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.lost.done():
            with contextlib.suppress(Exception):
                self._flush()
                await asyncio.wait_for(
                    self._call(0, spec.Connection.Close(reply_code=200), spec.Connection.CloseOk),
                    2,
                )
            if proto.transport is not None:
                proto.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._channel_tasks):
            task.cancel()
        self._fail_unconfirmed("link closed")
        for item in self._queue:
            if not item[3].done():
                item[3].set_exception(PublishFailed("channel_error", "publisher closed"))
        self._queue.clear()

    # -- connection lifecycle ----------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.25
        while not self._closing:
            proto: _Protocol | None = None
            try:
                proto = await self._connect()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                delay = 0.25
                await proto.lost
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._first is not None and not self._first.done():
                    self._first.set_exception(exc)
                    return
                log.warning(
                    "gateway AMQP link: connection failed; retrying",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_s": delay},
                )
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            self.reconnects += 1

    async def _connect(self) -> _Protocol:
        p = self.params
        ssl_context = ssl.create_default_context() if p["tls"] else None
        async with asyncio.timeout(max(self.timeout, 5.0)):
            _, proto = await self.loop.create_connection(
                lambda: _Protocol(self), p["host"], p["port"], ssl=ssl_context
            )
            self._proto = proto
            start = self._expect(0, spec.Connection.Start)
            self._write(codec.PROTOCOL_HEADER)
            await start
            tune = self._expect(0, spec.Connection.Tune)
            self._write(
                codec.method_frame(
                    spec.Connection.StartOk(
                        client_properties={
                            "product": "bridge gateway",
                            "connection_name": f"{self.name} link",
                            "capabilities": {
                                "publisher_confirms": True,
                                "basic.nack": True,
                                "consumer_cancel_notify": True,
                                "connection.blocked": True,
                                "authentication_failure_close": True,
                            },
                        },
                        mechanism="PLAIN",
                        response=f"\0{p['user']}\0{p['password']}",
                    ),
                    0,
                )
            )
            t = await tune
            frame_max = min(t.frame_max or 131072, 131072)
            ours, theirs = self.heartbeat_s, t.heartbeat
            heartbeat = min(ours, theirs) if ours and theirs else (ours or theirs)
            self._frame_max = frame_max
            proto.decoder.frame_max = frame_max
            self._heartbeat = heartbeat
            self._write(
                codec.method_frame(
                    spec.Connection.TuneOk(
                        channel_max=max(t.channel_max, 2) if t.channel_max else 2,
                        frame_max=frame_max,
                        heartbeat=heartbeat,
                    ),
                    0,
                )
            )
            await self._call(
                0, spec.Connection.Open(virtual_host=p["vhost"]), spec.Connection.OpenOk
            )
            self.last_read = self.last_write = self.loop.time()
            if heartbeat:
                self._heartbeat_timer = self.loop.call_later(heartbeat / 2, self._heartbeat_tick)
            await self._open_publish_channel()
            await self._open_consume_channel()
        log.info("gateway AMQP link up", extra={"frame_max": frame_max, "heartbeat": heartbeat})
        return proto

    async def _open_publish_channel(self) -> None:
        await self._call(PUBLISH_CHANNEL, spec.Channel.Open(), spec.Channel.OpenOk)
        await self._call(PUBLISH_CHANNEL, spec.Confirm.Select(), spec.Confirm.SelectOk)
        self._tag = 0
        self._open.add(PUBLISH_CHANNEL)
        self.schedule_flush()

    async def _open_consume_channel(self) -> None:
        n = CONSUME_CHANNEL
        await self._call(n, spec.Channel.Open(), spec.Channel.OpenOk)
        if self.reply_queue_arguments is not None:
            # Declared again: after a long outage it may have expired (x-expires).
            await self._call(
                n,
                spec.Queue.Declare(
                    queue=self.reply_queue,
                    durable=True,
                    arguments=self.reply_queue_arguments,
                ),
                spec.Queue.DeclareOk,
            )
        await self._call(
            n,
            Basic.Consume(queue=self.reply_queue, no_ack=True, exclusive=True),
            Basic.ConsumeOk,
        )
        self._open.add(n)
        self._consuming = True
        log.info("consuming", extra={"queue": self.reply_queue})

    def _reopen(self, channel: int, proto: _Protocol) -> None:
        async def reopen() -> None:
            delay = 0.25
            while not self._closing and self._proto is proto and not proto.lost.done():
                try:
                    if channel == PUBLISH_CHANNEL:
                        await self._open_publish_channel()
                    else:
                        await self._open_consume_channel()
                    return
                except LinkError as exc:
                    log.warning(
                        "gateway AMQP link: channel not reopened; retrying",
                        extra={"channel": channel, "error": str(exc), "retry_s": delay},
                    )
                except Exception:
                    return  # the connection went; _run reconnects
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

        task = self.loop.create_task(reopen())
        self._channel_tasks.add(task)
        task.add_done_callback(self._channel_tasks.discard)

    def connection_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._open.clear()
        self._consuming = False
        self.write_paused = False
        self._out.clear()
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        error = LinkError(320, f"connection lost: {exc}" if exc else "connection closed")
        for _, _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
        self._fail_unconfirmed("connection to the broker lost")
        if not self._closing:
            log.warning("gateway AMQP link lost; reconnecting", extra={"error": str(exc)})

    def _heartbeat_tick(self) -> None:
        proto, beat = self._proto, self._heartbeat
        if proto is None or proto.transport is None or proto.lost.done() or not beat:
            return
        now = self.loop.time()
        if now - self.last_read > 2 * beat:
            log.warning("gateway AMQP link: broker silent; reconnecting", extra={"s": 2 * beat})
            proto.transport.abort()
            return
        if now - self.last_write >= beat / 2:
            self._write(codec.HEARTBEAT_FRAME)
        self._heartbeat_timer = self.loop.call_later(beat / 2, self._heartbeat_tick)

    # -- frames out --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        proto = self._proto
        if proto is None or proto.transport is None or proto.lost.done():
            raise LinkError(320, "not connected")
        proto.transport.write(data)
        self.last_write = self.loop.time()

    def _expect(self, channel: int, kind: type) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        fut.add_done_callback(_retrieved)  # the caller may be gone when the connection is
        self._waiters.append((channel, kind, fut))
        return fut

    async def _call(self, channel: int, method: Any, reply: type) -> Any:
        fut = self._expect(channel, reply)
        self._write(codec.method_frame(method, channel))
        return await fut

    def schedule_flush(self) -> None:
        if not self._flush_scheduled and self._queue:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything queued since the last flush as one ``send``."""
        self._flush_scheduled = False
        queue = self._queue
        if not queue or PUBLISH_CHANNEL not in self._open or self.write_paused:
            return
        proto = self._proto
        if proto is None or proto.transport is None:
            return
        self._queue = []
        out = self._out
        methods = self._methods
        frame_max = self._frame_max
        by_tag = self._by_tag
        unconfirmed = self._unconfirmed
        prefix = self._id_prefix
        ids = self._ids
        tag = self._tag
        count = 0
        for routing_key, body, properties, fut, queued_at in queue:
            if fut.done():  # cancelled by the session while it waited
                continue
            method = methods.get(routing_key)
            if method is None:
                try:
                    method = codec.publish_method(PUBLISH_CHANNEL, routing_key)
                except Exception as exc:
                    fut.set_exception(PublishFailed("unencodable", f"{type(exc).__name__}: {exc}"))
                    continue
                if len(methods) > 10_000:
                    methods.clear()
                methods[routing_key] = method
            # Returns are matched to their publish by message id: one per publish.
            message_id = f"{prefix}{next(ids):x}"
            if isinstance(properties, Prepared):
                content = codec.encode_content(
                    PUBLISH_CHANNEL, properties.prefix, message_id.encode(), body, frame_max
                )
            else:
                try:
                    if properties.message_id:
                        message_id = str(properties.message_id)
                    else:
                        properties.message_id = message_id
                    content = codec.encode_content_pamqp(
                        PUBLISH_CHANNEL, properties, body, frame_max
                    )
                except Exception as exc:
                    log.error("message cannot be encoded; not published", extra={"error": str(exc)})
                    fut.set_exception(PublishFailed("unencodable", f"{type(exc).__name__}: {exc}"))
                    continue
            out.append(method)
            out.append(content)
            tag += 1
            entry = [tag, fut, message_id, routing_key, queued_at]
            by_tag[tag] = entry
            unconfirmed.append(entry)
            count += 1
        self._tag = tag
        if out:
            data = b"".join(out)
            out.clear()
            proto.transport.write(data)
            self.last_write = self.loop.time()
            self.batches += 1
            self.published += count

    # -- frames in ---------------------------------------------------------------------

    def handle(self, proto: _Protocol, events: list[codec.Event]) -> None:
        if proto is not self._proto:
            return
        for kind, channel, value in events:
            if kind == codec.EV_DELIVER:
                if channel == CONSUME_CHANNEL:
                    try:
                        self.on_reply(value)
                    except Exception:
                        log.exception("reply handling failed")
            elif kind == codec.EV_ACK or kind == codec.EV_NACK:
                if channel == PUBLISH_CHANNEL:
                    self._confirm(value[0], value[1], kind == codec.EV_NACK)
            elif kind == codec.EV_RETURN:
                try:
                    message_id = value.properties().message_id
                except Exception:
                    message_id = None
                if message_id:
                    self._returned.add(str(message_id))
            elif kind == codec.EV_METHOD:
                self._method(proto, channel, value)
            # EV_HEARTBEAT: last_read is all it is for

    def _confirm(self, tag: int, multiple: int, nack: bool) -> None:
        by_tag = self._by_tag
        if multiple:
            unconfirmed = self._unconfirmed
            while unconfirmed and unconfirmed[0][0] <= tag:
                entry = unconfirmed.popleft()
                if by_tag.pop(entry[0], _NO_ENTRY) is not None:
                    self._settle(entry, nack)
        else:
            entry = by_tag.pop(tag, _NO_ENTRY)
            if entry is not None:
                self._settle(entry, nack)
                unconfirmed = self._unconfirmed
                while unconfirmed and unconfirmed[0][0] not in by_tag:
                    unconfirmed.popleft()

    def _settle(self, entry: _Entry, nack: bool) -> None:
        _, fut, message_id, routing_key, queued_at = entry
        if self.confirm_seconds is not None:
            self.confirm_seconds(time.monotonic() - queued_at)
        returned = self._returned
        if returned and message_id in returned:
            returned.discard(message_id)
            if not fut.done():
                fut.set_exception(PublishFailed("unroutable", f"no queue {routing_key!r}"))
            return
        if fut.done():
            return
        if nack:
            fut.set_exception(PublishFailed("nacked", "broker nacked the publish"))
        else:
            fut.set_result(None)

    def _fail_unconfirmed(self, why: str) -> None:
        by_tag, self._by_tag = self._by_tag, {}
        self._unconfirmed = deque()
        self._returned.clear()
        error = PublishFailed("channel_error", why)
        for entry in by_tag.values():
            fut = entry[1]
            if not fut.done():
                fut.set_exception(error)

    def _method(self, proto: _Protocol, channel: int, method: Any) -> None:
        if isinstance(method, spec.Channel.Close):
            log.warning(
                "broker closed a gateway link channel",
                extra={"channel": channel, "code": method.reply_code, "text": method.reply_text},
            )
            with contextlib.suppress(LinkError):
                self._write(codec.method_frame(spec.Channel.CloseOk(), channel))
            self._open.discard(channel)
            if channel == CONSUME_CHANNEL:
                self._consuming = False
            error = LinkError(method.reply_code or 0, method.reply_text or "")
            if self._fail_waiters(channel, error):
                return  # a setup call failed: its caller decides what next
            if channel == PUBLISH_CHANNEL:
                self._fail_unconfirmed(f"channel closed: {method.reply_code} {method.reply_text}")
            self._reopen(channel, proto)
            return
        if isinstance(method, Basic.Cancel):  # reply queue deleted
            log.warning("broker cancelled the reply consumer", extra={"queue": self.reply_queue})
            self._consuming = False
            with contextlib.suppress(LinkError):
                self._write(codec.method_frame(spec.Channel.Close(reply_code=200), CONSUME_CHANNEL))
            return  # CloseOk below reopens it
        if isinstance(method, spec.Channel.CloseOk) and channel == CONSUME_CHANNEL:
            if not self._fail_waiters(channel, LinkError(200, "closed")):
                self._open.discard(channel)
                self._reopen(channel, proto)
            return
        if isinstance(method, spec.Connection.Close):
            log.warning(
                "broker closed the gateway link",
                extra={"code": method.reply_code, "text": method.reply_text},
            )
            with contextlib.suppress(LinkError):
                self._write(codec.method_frame(spec.Connection.CloseOk(), 0))
            self._fail_waiters(None, LinkError(method.reply_code or 0, method.reply_text or ""))
            if proto.transport is not None:
                proto.transport.close()
            return
        if isinstance(method, spec.Connection.Blocked):
            log.warning("broker blocks publishing", extra={"reason": method.reason})
            return
        if isinstance(method, spec.Connection.Unblocked):
            log.info("broker unblocks publishing")
            return
        for i, (ch, kind, fut) in enumerate(self._waiters):
            if ch == channel and isinstance(method, kind):
                del self._waiters[i]
                if not fut.done():
                    fut.set_result(method)
                return
        log.debug("unexpected method ignored", extra={"method": method.name, "channel": channel})

    def _fail_waiters(self, channel: int | None, error: Exception) -> bool:
        failed = False
        keep = []
        for ch, kind, fut in self._waiters:
            if channel is None or ch == channel:
                if not fut.done():
                    fut.set_exception(error)
                failed = True
            else:
                keep.append((ch, kind, fut))
        self._waiters = keep
        return failed


def _drop(_: codec.Delivery) -> None:
    pass


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
