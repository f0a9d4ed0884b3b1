"""Broker access: a robust connection that reconnects on its own, a confirm-window
publisher that pipelines publishes, and topology helpers.

Workers never import aiormq exceptions: publish failures become
:class:`bridge.errors.PublishFailed` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    AbstractRobustQueue,
    ExchangeType,
)

from bridge import wirecompat
from bridge.amqp.link import describe_connect_error
from bridge.errors import BrokerUnavailable, PublishFailed
from bridge.settings import HostSettings, redact_url

wirecompat.install()

log = logging.getLogger("bridge.amqp")

QUORUM = {"x-queue-type": "quorum"}


async def connect_once(
    url: str, *, timeout: float = 5.0, heartbeat: int = 30
) -> AbstractRobustConnection:
    """Connect once; raise :class:`BrokerUnavailable` with an actionable message on failure."""
    try:
        return await asyncio.wait_for(
            aio_pika.connect_robust(url, heartbeat=heartbeat, timeout=timeout), timeout + 1
        )
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
        raise BrokerUnavailable(describe_connect_error(url, exc)) from exc


class Broker:
    """The host's connection to RabbitMQ.

    ``connect()`` keeps retrying with capped exponential backoff and logs one clear line per
    failure instead of crashing (a crash-looping pod hides the cause). After the first
    success aio-pika's robust connection reconnects by itself and restores channels,
    declarations and consumers; ``connected`` follows it for /readyz.
    """

    def __init__(self, settings: HostSettings, *, name: str = "bridge") -> None:
        self.settings = settings
        self.name = name
        self.connection: AbstractRobustConnection | None = None
        self.reconnects = 0
        self._restoring = False  # lost, and aio-pika has not restored the channels yet
        self._on_reconnect: list[Callable[[], Any]] = []

    @property
    def url(self) -> str:
        return self.settings.amqp_url

    @property
    def connected(self) -> bool:
        """Connected, and after a reconnect also restored: aio-pika reopens the channels and
        their consumers after the transport is back, then calls the reconnect callbacks;
        until then the worker is not consuming yet."""
        conn = self.connection
        return (
            conn is not None
            and not conn.is_closed
            and conn.connected.is_set()
            and not self._restoring
        )

    def on_reconnect(self, callback: Callable[[], Any]) -> None:
        self._on_reconnect.append(callback)

    async def connect(self, stop: asyncio.Event | None = None) -> AbstractRobustConnection:
        delay = 0.5
        while True:
            try:
                conn = await connect_once(self.url, heartbeat=self.settings.heartbeat_s)
                break
            except BrokerUnavailable as exc:
                log.error("%s; retrying in %.1fs", exc, delay)
            if stop is not None:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    raise BrokerUnavailable("stopped while waiting for the broker")
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.connect_retry_max_s)
        self.connection = conn
        conn.reconnect_callbacks.add(self._reconnected)
        conn.close_callbacks.add(self._closed)
        log.info("connected to broker", extra={"url": redact_url(self.url)})
        return conn

    def _closed(self, *_: Any) -> None:
        if self.connection is not None:
            self._restoring = True
            log.warning("broker connection lost; reconnecting", extra={"url": redact_url(self.url)})

    def _reconnected(self, *_: Any) -> None:
        self._restoring = False
        self.reconnects += 1
        log.info("reconnected to broker", extra={"reconnects": self.reconnects})
        for callback in self._on_reconnect:
            callback()

    async def channel(
        self, *, prefetch: int = 0, confirms: bool = True, on_return_raises: bool = False
    ) -> AbstractChannel:
        assert self.connection is not None, "connect() first"
        channel = await self.connection.channel(
            publisher_confirms=confirms, on_return_raises=on_return_raises and confirms
        )
        if prefetch:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None and not conn.is_closed:
            await conn.close()


class ConfirmPublisher:
    """Publishes with confirms, keeping up to ``window`` publishes in flight.

    Awaiting each confirm before the next publish caps throughput at one round trip per
    message; here callers start publishes with :meth:`publish` concurrently (gather or
    tasks) and the semaphore bounds how many are unconfirmed, which is also the
    backpressure: when the window is full, ``publish`` waits.
    """

    def __init__(
        self, channel: AbstractChannel, *, window: int = 256, timeout: float = 30.0
    ) -> None:
        self.channel = channel
        self.window = window
        self.timeout = timeout
        self._slots = asyncio.Semaphore(window)
        self.in_flight = 0
        self.confirm_seconds: Callable[[float], None] | None = None

    async def publish(
        self,
        exchange: AbstractExchange | str,
        message: aio_pika.Message,
        routing_key: str,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm; raise :class:`PublishFailed` otherwise."""
        async with self._slots:
            self.in_flight += 1
            started = time.perf_counter()
            try:
                target = exchange
                if isinstance(target, str):
                    target = (
                        self.channel.default_exchange
                        if target == ""
                        else await self.channel.get_exchange(target, ensure=False)
                    )
                result = await target.publish(
                    message, routing_key, mandatory=mandatory, timeout=self.timeout
                )
            except aio_pika.exceptions.DeliveryError as exc:
                frame = getattr(exc, "frame", None)
                if frame is not None and getattr(frame, "reply_text", None):
                    raise PublishFailed("unroutable", str(frame.reply_text)) from exc
                raise PublishFailed("nacked", str(exc)) from exc
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise PublishFailed("exchange_not_found", str(exc)) from exc
            except (
                TimeoutError,
                aiormq.exceptions.AMQPError,
                aio_pika.exceptions.ChannelInvalidStateError,
                ConnectionError,
                RuntimeError,
            ) as exc:
                raise PublishFailed("channel_error", f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.in_flight -= 1
                if self.confirm_seconds is not None:
                    self.confirm_seconds(time.perf_counter() - started)
            if isinstance(result, aiormq.spec.Basic.Nack):
                raise PublishFailed("nacked", "broker nacked the publish")
            if isinstance(result, aiormq.spec.Basic.Return):
                raise PublishFailed("unroutable", str(result.reply_text))


def track_confirm(channel: aiormq.Channel, message_id: str) -> asyncio.Future[Any]:
    """Register one publish about to be written by hand on ``channel`` (frames encoded by the
    caller, all of a batch handed to ``channel.write_queue`` in one ``ChannelFrame``) the way
    aiormq's ``basic_publish`` does: the next delivery tag, a confirmation future aiormq
    resolves on the broker's ack or nack, on a return under ``mandatory`` (matched by
    ``message_id``) or when the channel closes. Call under ``channel.lock``, once per publish
    actually written, in write order. Relies on aiormq 7 internals (``delivery_tag``,
    ``confirmations``, ``message_id_delivery_tag``); :func:`confirm_error` reads the result.
    """
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    confirmation = channel.create_future()
    channel.confirmations[tag] = confirmation
    channel.message_id_delivery_tag[message_id] = tag

    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id, None)

    confirmation.add_done_callback(forget)
    return confirmation


def confirm_error(confirmation: asyncio.Future[Any], routing_key: str) -> PublishFailed | None:
    """None if a settled confirmation from :func:`track_confirm` (or ``basic_publish(wait=
    False)``) is the broker's ack, else the failure, with the reasons ConfirmPublisher uses:
    ``unroutable`` (returned), ``nacked``, ``exchange_not_found``, ``channel_error``."""
    if confirmation.cancelled():
        return PublishFailed("channel_error", "confirmation cancelled")
    exc = confirmation.exception()
    if exc is not None:
        if isinstance(exc, aiormq.exceptions.PublishError):
            text = getattr(getattr(exc, "frame", None), "reply_text", None) or "NO_ROUTE"
            return PublishFailed("unroutable", f"{text}: routing key {routing_key!r}")
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return PublishFailed("nacked", str(exc))
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            return PublishFailed("exchange_not_found", str(exc))
        return PublishFailed("channel_error", f"{type(exc).__name__}: {exc}")
    result = confirmation.result()
    if isinstance(result, aiormq.spec.Basic.Nack):
        return PublishFailed("nacked", "broker nacked the publish")
    if isinstance(result, aiormq.abc.DeliveredMessage):  # returned, on_return_raises off
        return PublishFailed("unroutable", f"NO_ROUTE: routing key {routing_key!r}")
    return None


async def declare_exchange(
    channel: AbstractChannel, name: str, kind: ExchangeType | str, *, durable: bool = True
) -> AbstractExchange:
    return await channel.declare_exchange(name, ExchangeType(kind), durable=durable)


async def declare_quorum_queue(
    channel: AbstractChannel,
    name: str,
    *,
    arguments: Mapping[str, Any] | None = None,
    bind: tuple[AbstractExchange | str, str] | None = None,
) -> AbstractQueue:
    args: dict[str, Any] = dict(QUORUM)
    args.update(arguments or {})
    queue = await channel.declare_queue(name, durable=True, arguments=args)
    if bind is not None:
        await queue.bind(bind[0], routing_key=bind[1])
    return queue


async def declare_dead_letter(
    channel: AbstractChannel, exchange: str, queue: str
) -> AbstractExchange:
    """A fanout dead-letter exchange with a quorum queue holding everything rejected."""
    ex = await declare_exchange(channel, exchange, ExchangeType.FANOUT)
    await declare_quorum_queue(channel, queue, bind=(ex, ""))
    return ex


def header_str(value: Any) -> str | None:
    """A header value as text (AMQP tables deliver long strings as bytes)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value
    return None


async def safe_ack(message: AbstractIncomingMessage) -> None:
    """Acknowledge, ignoring a stale delivery tag after a reconnect (the broker redelivers
    the message, and the worker's de-duplication makes the second application a no-op)."""
    with contextlib.suppress(Exception):
        await message.ack()


def with_reason(
    message: AbstractIncomingMessage,
    reason: str,
    detail: str,
    *,
    reason_header: str,
    detail_header: str,
) -> aio_pika.Message:
    """A copy of ``message`` (body, properties, headers) for a dead-letter exchange, with the
    reason and a human-readable detail added as headers."""
    headers = dict(message.headers or {})
    headers[reason_header] = reason
    headers[detail_header] = detail[:500]
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def send_reply(
    channel: AbstractChannel, request: AbstractIncomingMessage, body: bytes
) -> bool:
    """Answer an RPC request on its ``reply_to`` with its ``correlation_id``.

    Published straight through aiormq (replies are the hot path of pull-style workers and an
    ``aio_pika.Message`` per reply showed in profiles), not mandatory (RabbitMQ returns direct
    reply-to publishes under ``mandatory`` although it delivers them) and not confirmed: a lost
    reply is recovered by the caller's retry.
    """
    if not request.reply_to:
        return False
    try:
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            body,
            exchange="",
            routing_key=request.reply_to,
            properties=aiormq.spec.Basic.Properties(
                correlation_id=request.correlation_id,
                content_type="application/json",
                delivery_mode=1,
            ),
            mandatory=False,
        )
        return True
    except Exception as exc:  # requester gone, or channel reconnecting
        log.info("reply not sent", extra={"reply_to": request.reply_to, "error": str(exc)})
        return False


class BatchAcker:
    """Acknowledges deliveries on receipt, one ``basic.ack(multiple=True)`` per loop turn.

    For idempotent requests (pulls, queries) whose loss in a crash is recovered by the
    caller's retry: acknowledging each one separately cost a frame each way (and a Raft
    command on a quorum queue). Deliveries arrive in delivery-tag order and every one is
    acknowledged on receipt, so acknowledging the highest tag seen covers exactly those.
    """

    def __init__(self) -> None:
        self._pending: dict[int, tuple[Any, int]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # One sender per channel at a time. Two concurrent basic_ack calls can overtake each
        # other (when the connection's write queue is full, asyncio.Queue lets a new put()
        # pass one that is waiting), and acknowledging a tag below one already acknowledged
        # with multiple=True is a channel error (406 unknown delivery tag) that closed the
        # channel the pulls arrive on, under load.
        self._sending: dict[int, tuple[Any, int] | None] = {}

    def ack(self, message: AbstractIncomingMessage) -> None:
        try:
            channel = message.channel
        except Exception:  # channel closed: the broker requeues, the caller retries
            return
        tag = message.delivery_tag
        if tag is None:
            return
        current = self._pending.get(id(channel))
        if current is None or tag > current[1]:
            self._pending[id(channel)] = (channel, tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for key, (channel, tag) in pending.items():
            if key in self._sending:  # the running sender takes the highest tag next
                queued = self._sending[key]
                if queued is None or tag > queued[1]:
                    self._sending[key] = (channel, tag)
                continue
            self._sending[key] = None
            task = asyncio.ensure_future(self._send(key, channel, tag))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, key: int, channel: Any, tag: int) -> None:
        sent = 0
        try:
            while True:
                if tag > sent:
                    with contextlib.suppress(Exception):
                        await channel.basic_ack(tag, multiple=True)
                    sent = tag
                queued = self._sending.get(key)
                if queued is None:
                    return
                self._sending[key] = None
                channel, tag = queued
        finally:
            self._sending.pop(key, None)


class _Consumer:
    __slots__ = ("queue", "raw", "run", "tag")

    def __init__(
        self,
        queue: AbstractQueue,
        tag: str,
        run: Callable[[AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        self.queue = queue
        self.tag = tag
        self.run = run
        self.raw: aiormq.Channel | None = None  # the channel it consumes on, as last seen

    @property
    def cancelled(self) -> bool:
        """The broker cancelled it (its channel is open and no longer knows the tag)."""
        raw = self.raw
        return raw is not None and not raw.is_closed and self.tag not in raw.consumers


class Consumers:
    """The consumers of one worker: handler tasks are tracked so a drain can wait for them,
    and a handler that raises has its message requeued instead of taking the worker down.

    A queue deleted under a consumer (an operator, a policy, a lost cluster member) makes the
    broker cancel the consumer without closing the channel, so neither the connection nor
    aio-pika's robust channel notices. :attr:`lost` names such queues at once (the worker's
    readiness reports it), and :meth:`watch` declares them again with their bindings and
    consumes them again, checking every ``interval_s``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.inflight: set[asyncio.Task[Any]] = set()
        self._consumers: list[_Consumer] = []
        self._warned: set[str] = set()
        self.restored = 0
        self.on_restored: Callable[[str], None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def consume(
        self,
        queue: AbstractQueue,
        handler: Callable[[AbstractIncomingMessage], Awaitable[None]],
        *,
        acker: BatchAcker | None = None,
    ) -> None:
        """Consume ``queue`` with ``handler``. With ``acker`` every delivery is acknowledged
        on receipt (the handler must never ack or nack); without, the handler acknowledges."""

        async def run(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.inflight.add(task)
            if acker is not None:
                acker.ack(message)
            try:
                await handler(message)
            except Exception:
                log.exception("handler failed", extra={"worker": self.name})
                if acker is None:
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
            finally:
                self.inflight.discard(task)

        tag = await queue.consume(run)
        consumer = _Consumer(queue, tag, run)
        consumer.raw = cast(aiormq.Channel, await queue.channel.get_underlay_channel())
        self._consumers.append(consumer)

    @property
    def lost(self) -> list[str]:
        """Queues whose consumer the broker cancelled and that are not consumed again yet."""
        return sorted(c.queue.name for c in self._consumers if c.cancelled)

    def watch(self, interval_s: float = 1.0) -> None:
        """Start checking that the broker has not cancelled a consumer (see the class)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                await self.check()

        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(loop(), name="consumer-watch")

    async def check(self) -> None:
        for c in list(self._consumers):
            name = c.queue.name
            try:
                raw = cast(
                    aiormq.Channel,
                    await asyncio.wait_for(c.queue.channel.get_underlay_channel(), 5),
                )
            except Exception:
                continue  # the channel is reopening: aio-pika restores its consumers itself
            c.raw = raw
            if not c.cancelled:
                continue
            if name not in self._warned:
                self._warned.add(name)
                log.error(
                    "the broker cancelled a consumer (queue deleted?); declaring it again",
                    extra={"worker": self.name, "queue": name},
                )
            if not isinstance(c.queue, AbstractRobustQueue):
                continue  # only robust queues know their bindings (the workers' all are)
            try:
                # aio-pika's robust queue re-declares itself, re-creates the bindings made
                # through it and consumes again under the same tag (what it does after a
                # reconnect)
                await c.queue.restore()
                c.raw = cast(aiormq.Channel, await c.queue.channel.get_underlay_channel())
            except Exception as exc:
                log.warning(
                    "queue not restored yet; retrying",
                    extra={"worker": self.name, "queue": name, "error": str(exc)},
                )
                continue
            self._warned.discard(name)
            self.restored += 1
            log.info("consuming again", extra={"worker": self.name, "queue": name})
            if self.on_restored is not None:
                self.on_restored(name)

    async def cancel(self) -> None:
        """Stop deliveries (in-flight handlers keep running)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for c in self._consumers:
            with contextlib.suppress(Exception):
                await c.queue.cancel(c.tag)
        self._consumers.clear()

    async def drain(self, timeout: float) -> None:
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=max(timeout, 0.1))


async def close_channels(*channels: AbstractChannel | None) -> None:
    for channel in channels:
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
