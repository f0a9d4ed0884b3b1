"""The gateway's per-message AMQP paths on aiormq (``BRIDGE_GATEWAY__AMQP_LINK=false``).

The default data path is :mod:`workers.gateway.amqp_link`, a connection of the gateway's
own; from here it still uses :class:`Prepared` (the cached DATA properties), and
:class:`RawPublisher` keeps publishing the rare messages to ``gateway.undeliverable``.

Every DATA frame becomes one publish and every server reply one delivery, so what aio-pika
adds per message shows in the gateway's throughput: building an ``aio_pika.Message``
(~15 us), an ``IncomingMessage`` plus a second task per delivery (~30 us), and a publish
that holds the channel lock until its frame is flushed. Here a publish is a pamqp
``Basic.Properties`` handed to ``basic_publish(wait=False)`` (the lock is released once the
frame is queued, so publishes of many sessions share one flush), and a delivery reaches the
callback as aiormq's ``DeliveredMessage``.

Declarations, the registry consumer and reconnection stay with aio-pika's robust channel;
:class:`RawConsumer` checks on every housekeeping tick that it still consumes on the
channel's current underlying channel and subscribes again after a reconnect. aiormq
exceptions are translated into :class:`bridge.errors.PublishFailed` here, as bridge/amqp.py
does for :class:`~bridge.amqp.ConfirmPublisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.amqp import confirm_error, track_confirm
from bridge.errors import PublishFailed

log = logging.getLogger("bridge.gateway")

Properties = Basic.Properties

_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, size
_FRAME_END = b"\xce"
_BASIC_CLASS = b"\x00\x3c\x00\x00"  # class 60 (basic), weight 0
_MARKER_ID = "\x00"


class Prepared:
    """Publish properties encoded once, for the many publishes that repeat them.

    The content-header frame of a DATA publish is the same for every message of a session
    but for the body size and the message id, yet pamqp encodes the headers table anew
    each time (about 15 us, the largest Python cost of a publish). This keeps the encoded
    property flags and fields up to the message id (the last field set), and
    :class:`BatchPublisher` appends the id. Only for properties whose last field is the
    message id (``properties.message_id`` must be unset here); others raise ValueError.
    """

    __slots__ = ("prefix", "properties")

    def __init__(self, properties: Properties) -> None:
        if properties.message_id is not None:
            raise ValueError("the message id is added per publish")
        probe = Properties(
            **{k: getattr(properties, k) for k in _PROPERTY_NAMES}, message_id=_MARKER_ID
        )
        encoded = probe.marshal()
        tail = bytes([len(_MARKER_ID)]) + _MARKER_ID.encode()
        if not encoded.endswith(tail) or any(getattr(properties, k) for k in _AFTER_MESSAGE_ID):
            raise ValueError("properties after message_id are not supported")
        self.prefix = encoded[: -len(tail)]
        self.properties = properties

    @property
    def headers(self) -> Any:
        """The headers it was prepared from (for whoever inspects a publish)."""
        return self.properties.headers


_PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)
_AFTER_MESSAGE_ID = ("timestamp", "message_type", "user_id", "app_id", "cluster_id")

# routing key, body, properties, the caller's future, when it was queued (monotonic)
_Queued = tuple[str, bytes, "Properties | Prepared", "asyncio.Future[None]", float]


async def usable_channel(channel: AbstractChannel) -> aiormq.Channel:
    """The robust channel's current aiormq channel, once it can carry a publish.

    Right after a reconnect aio-pika's ``get_underlay_channel`` still returns the old,
    closed channel until the robust channel is restored; a publish there fails at once,
    which is not the "wait for the reconnect" the gateway promises.
    """
    while True:
        ready = getattr(channel, "ready", None)  # robust channels: connection + restored
        if ready is not None:
            await ready()
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        if not underlay.is_closed:
            return underlay
        await asyncio.sleep(0.05)  # closed, and the robust channel does not know yet


class RawPublisher:
    """Confirmed publishes to the default exchange without aio-pika's message objects.

    The caller bounds how many are in flight (the gateway's publish window).
    """

    def __init__(
        self,
        channel: AbstractChannel,
        *,
        timeout: float = 30.0,
        confirm_seconds: Callable[[float], None] | None = None,
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.confirm_seconds = confirm_seconds

    async def publish(
        self, routing_key: str, body: bytes, properties: Properties, *, mandatory: bool = True
    ) -> None:
        started = time.perf_counter()
        try:
            # While the connection is down this waits for the reconnect, within the timeout.
            async with asyncio.timeout(self.timeout):
                channel = await usable_channel(self.channel)
                result = await channel.basic_publish(
                    body,
                    exchange="",
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                    wait=False,
                )
        except aiormq.exceptions.PublishError as exc:
            raise PublishFailed("unroutable", str(exc)) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishFailed("nacked", str(exc)) from exc
        except (
            TimeoutError,
            aiormq.exceptions.AMQPError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            raise PublishFailed("channel_error", f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.confirm_seconds is not None:
                self.confirm_seconds(time.perf_counter() - started)
        if isinstance(result, Basic.Nack):
            raise PublishFailed("nacked", "broker nacked the publish")
        if isinstance(result, DeliveredMessage):  # returned: no queue by that name
            raise PublishFailed("unroutable", f"no queue {routing_key!r}")


class BatchPublisher:
    """Confirmed publishes to the default exchange, many per socket write.

    ``publish`` queues and returns a future at once; one writer task takes everything
    queued since its last turn and hands it to the broker as a single frame batch, so a
    busy gateway makes one ``send()`` for many client messages (and the broker one read),
    and no task exists per message. The batch goes through the channel the way aiormq's
    ``basic_publish`` does (under the channel lock: next delivery tag, confirmation future,
    message id for a possible return), so confirms, nacks, returns and a channel loss
    resolve the futures as they would resolve ``basic_publish``. That relies on attributes
    of ``aiormq.Channel`` (``lock``, ``delivery_tag``, ``confirmations``,
    ``message_id_delivery_tag``, ``write_queue``, ``number``): checked against aiormq 7.

    Publishes are written in the order of the calls; the caller bounds how many are
    unconfirmed. ``expire`` fails those unconfirmed for longer than ``timeout``.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        *,
        timeout: float = 30.0,
        confirm_seconds: Callable[[float], None] | None = None,
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.confirm_seconds = confirm_seconds
        self.batches = 0
        self.published = 0
        self._queue: list[_Queued] = []
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:12]
        self._methods: dict[tuple[int, str], bytes] = {}  # encoded Basic.Publish frames
        self._unconfirmed: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-publish")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, _, fut, _ in self._queue:
            if not fut.done():
                fut.set_exception(PublishFailed("channel_error", "publisher closed"))
        self._queue.clear()

    def publish(
        self, routing_key: str, body: bytes, properties: Properties | Prepared
    ) -> asyncio.Future[None]:
        """Queue a mandatory publish; the future resolves at the broker's confirm or fails
        with :class:`PublishFailed`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((routing_key, body, properties, fut, time.monotonic()))
        self._wake.set()
        return fut

    def expire(self, now: float) -> int:
        """Fail publishes unconfirmed for longer than the timeout; return how many."""
        failed = 0
        unconfirmed = self._unconfirmed
        while unconfirmed:
            started, fut = unconfirmed[0]
            if not fut.done() and now - started <= self.timeout:
                break
            unconfirmed.popleft()
            if not fut.done():
                fut.set_exception(PublishFailed("timeout", f"no confirm in {self.timeout}s"))
                failed += 1
        return failed

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self._write(batch)
                except Exception as exc:
                    error = PublishFailed("channel_error", f"{type(exc).__name__}: {exc}")
                    for _, _, _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(error)

    async def _write(self, batch: list[_Queued]) -> None:
        # While the connection is down this waits for the reconnect, within the timeout.
        async with asyncio.timeout(self.timeout):
            channel = await usable_channel(self.channel)
        async with channel.lock:
            parts: list[tuple[_Queued, str, list[Any] | bytes]] = []
            slow = False
            for item in batch:
                routing_key, body, properties, fut, _ = item
                if fut.done():
                    continue
                # Returns are matched to their publish by message id: one per publish,
                # a counter (uuid4 per message costs more than the rest of the id work).
                message_id = f"{self._id_prefix}{next(self._ids):x}"
                if isinstance(properties, Prepared):
                    parts.append((item, message_id, self._encode(channel, item, message_id)))
                    continue
                if not properties.message_id:
                    properties.message_id = message_id
                message_id = str(properties.message_id)
                frames: list[Any] = [
                    Basic.Publish(exchange="", routing_key=routing_key, mandatory=True),
                    ContentHeader(properties=properties, body_size=len(body)),
                    *channel._split_body(body),
                ]
                parts.append((item, message_id, frames))
                slow = True
            if slow:
                try:
                    payload = b"".join(
                        fs
                        if isinstance(fs, bytes)
                        else ChannelFrame.marshall(channel_number=channel.number, frames=fs).payload
                        for _, _, fs in parts
                    )
                except Exception:
                    parts, payload = self._marshal_each(channel, parts)
            else:
                payload = b"".join(fs for _, _, fs in parts)  # type: ignore[misc]
            # Delivery tags only for what is sent: the broker numbers its confirms by the
            # publishes it receives, so one tag taken for a frame never written would shift
            # every later confirm onto the wrong message.
            for (routing_key, _, _, fut, queued_at), message_id, _ in parts:
                confirmation = track_confirm(channel, message_id)
                confirmation.add_done_callback(
                    functools.partial(self._settle, fut, routing_key, queued_at)
                )
                self._unconfirmed.append((queued_at, fut))
            if parts:
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        self.batches += 1
        self.published += len(batch)

    def _encode(self, channel: aiormq.Channel, item: _Queued, message_id: str) -> bytes:
        """Method, content header and body frames of one publish with prepared properties,
        byte for byte what pamqp would write (tests/unit/test_gateway_amqp_io.py)."""
        routing_key, body, properties, _, _ = item
        assert isinstance(properties, Prepared)
        number = channel.number
        key = (number, routing_key)
        method = self._methods.get(key)
        if method is None:
            method = pamqp_frame.marshal(
                Basic.Publish(exchange="", routing_key=routing_key, mandatory=True), number
            )
            if len(self._methods) > 10_000:
                self._methods.clear()
            self._methods[key] = method
        mid = message_id.encode()
        header = b"".join(
            (
                _BASIC_CLASS,
                len(body).to_bytes(8, "big"),
                properties.prefix,
                bytes((len(mid),)),
                mid,
            )
        )
        out = [method, _FRAME_HEADER.pack(2, number, len(header)), header, _FRAME_END]
        size = channel.max_content_size
        for start in range(0, len(body), size):
            chunk = body[start : start + size]
            out += (_FRAME_HEADER.pack(3, number, len(chunk)), chunk, _FRAME_END)
        return b"".join(out)

    @staticmethod
    def _marshal_each(
        channel: aiormq.Channel, parts: list[tuple[_Queued, str, list[Any] | bytes]]
    ) -> tuple[list[tuple[_Queued, str, list[Any] | bytes]], bytes]:
        """The batch did not encode: fail the messages that do not, send the others."""
        good: list[tuple[_Queued, str, list[Any] | bytes]] = []
        chunks: list[bytes] = []
        for item, message_id, frames in parts:
            if isinstance(frames, bytes):
                good.append((item, message_id, frames))
                chunks.append(frames)
                continue
            try:
                encoded = ChannelFrame.marshall(channel_number=channel.number, frames=frames)
            except Exception as exc:
                log.error("message cannot be encoded; not published", extra={"error": str(exc)})
                item[3].set_exception(PublishFailed("unencodable", f"{type(exc).__name__}: {exc}"))
            else:
                good.append((item, message_id, frames))
                chunks.append(encoded.payload)
        return good, b"".join(chunks)

    def _settle(
        self,
        fut: asyncio.Future[None],
        routing_key: str,
        queued_at: float,
        confirmation: asyncio.Future[Any],
    ) -> None:
        if self.confirm_seconds is not None:
            self.confirm_seconds(time.monotonic() - queued_at)
        if fut.done():
            return
        error = confirm_error(confirmation, routing_key)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(None)


class RawConsumer:
    """An exclusive no-ack consumer whose callback gets aiormq's ``DeliveredMessage``.

    Exclusive: a second gateway with the same instance name is refused (ACCESS_REFUSED)
    instead of taking half of this one's replies.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        callback: Callable[[DeliveredMessage], Coroutine[Any, Any, Any]],
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.callback = callback
        self._underlay: Any = None
        self._tag: str | None = None

    @property
    def consuming(self) -> bool:
        underlay = self._underlay
        return underlay is not None and not underlay.is_closed

    async def ensure(self) -> bool:
        """Consume on the channel's current underlying channel; True if (re)subscribed."""
        underlay = await self.channel.get_underlay_channel()
        if underlay is self._underlay and not underlay.is_closed:
            return False
        ok = await underlay.basic_consume(self.queue, self.callback, no_ack=True, exclusive=True)
        self._underlay, self._tag = underlay, ok.consumer_tag
        log.info("consuming", extra={"queue": self.queue})
        return True

    async def cancel(self) -> None:
        underlay, tag = self._underlay, self._tag
        self._underlay = self._tag = None
        if underlay is not None and tag is not None and not underlay.is_closed:
            await underlay.basic_cancel(tag)
