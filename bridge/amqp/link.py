"""One asyncio connection engine for every worker's per-message AMQP traffic.

A :class:`Link` is one TCP (or TLS) connection to the broker, an ``asyncio.Protocol``
driven by the sans-I/O codec in :mod:`bridge.amqp.frames`. Its channels are the
:class:`~bridge.amqp.publisher.Publisher` and :class:`~bridge.amqp.consumer.Consumer`
objects attached to it; the link owns what they share:

- the broker URL read as aio-pika reads it (``amqp``/``amqps``, vhost, ``heartbeat``,
  ``name``, ``cafile``/``certfile``/``keyfile``/``no_verify_ssl``);
- the handshake, heartbeats both ways (a broker silent for two intervals is a dead link),
  and a reconnect with capped exponential backoff that opens every channel again (each
  channel re-runs its own setup: confirm mode, qos, declarations, consume);
- a channel the broker closes (404, 403, 406) is answered and opened again on the same
  connection, with backoff, without touching the others; a refusal the channel waits out
  (another process owns the queue: :class:`~bridge.errors.Refused`) is retried the same
  way, quietly, and does not fail the first start;
- ``connection.blocked`` (a memory or disk alarm) and a full socket buffer hold the
  publishers' writes back; nothing is dropped or written twice, everything waits;
- :attr:`ready`: connected, and every consumer consuming.

Frames out: a channel with something to write (publishes, acks) asks the link for a flush
(:meth:`Link.request_flush`); once per loop turn the link lets every such channel write and
sends it all with one ``transport.write``. Frames in are decoded once and handed to their
channel. Nothing here reads a library's private state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from bridge.amqp import frames as F
from bridge.amqp.channel import Channel, settled
from bridge.amqp.connection import (
    CHANNEL_MAX,
    FRAME_MAX,
    LinkProtocol,
    connection_method,
    handshake,
)
from bridge.amqp.endpoint import Endpoint, describe_connect_error
from bridge.errors import BrokerUnavailable, LinkError, Refused

log = logging.getLogger("bridge.amqp.link")

RETRY_MAX_S = 5.0


class Link:
    """One connection to the broker with its channels (see the module)."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        heartbeat_s: int = 30,
        connect_timeout: float = 10.0,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.url = url
        self.endpoint = Endpoint.parse(url)
        self.name = name
        self.heartbeat_s = (
            heartbeat_s if self.endpoint.heartbeat is None else self.endpoint.heartbeat
        )
        self.connect_timeout = connect_timeout
        self.retry_max_s = retry_max_s
        self.loop = asyncio.get_running_loop()
        self.channels: list[Channel] = []
        self.reconnects = 0
        self.blocked: str | None = None  # the broker's reason while connection.blocked
        self.write_paused = False
        self.last_read = self.last_write = 0.0
        self.frame_max = FRAME_MAX
        self.on_connected: list[Callable[[], None]] = []
        # what the broker announced in connection.start (product, version, capabilities)
        self.server_properties: dict[str, Any] = {}
        self.on_disconnected: list[Callable[[], None]] = []
        self._proto: LinkProtocol | None = None
        self._up = False
        self._heartbeat = 0
        self._waiters: list[tuple[int, type, asyncio.Future[Any]]] = []
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._numbers = 0
        self._by_number: dict[int, Channel] = {}
        self._dirty: list[Channel] = []  # channels that asked for a flush this loop turn
        self._flush_handle: asyncio.Handle | None = None
        self._gather: list[bytes] | None = None  # frames written during a flush

    # -- the owner's side --------------------------------------------------------------

    def attach(self, channel: Channel) -> None:
        """Called by a channel's constructor; opened at start, or now if running."""
        self._numbers += 1
        if self._numbers >= CHANNEL_MAX:
            raise LinkError(504, f"more than {CHANNEL_MAX - 1} channels on one link")
        channel.number = self._numbers
        self.channels.append(channel)
        self._by_number[channel.number] = channel
        if self._up:
            self.spawn(self._open_channel(channel, self._proto), f"open {channel.name}")

    async def start(self) -> None:
        """Connect and set every channel up; raise what the first attempt met
        (:class:`~bridge.errors.BrokerUnavailable` or :class:`LinkError`). Later losses
        reconnect by themselves."""
        self._first = self.loop.create_future()
        self._task = self.loop.create_task(self._run(), name=f"amqp-link {self.name}")
        try:
            await self._first
        except BaseException:
            await self.close()
            raise

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def ready(self) -> bool:
        """Connected and every channel set up (every consumer consuming)."""
        return self._up and all(c.is_open and settled(c) for c in self.channels)

    def not_ready(self) -> list[str]:
        """What is not set up, one phrase each (for /readyz)."""
        if not self._up:
            return [f"{self.name}: broker link not connected"]
        return [c.describe() for c in self.channels if not (c.is_open and settled(c))]

    async def close(self) -> None:
        self._closing = True
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.lost.done():
            for channel in self.channels:
                with contextlib.suppress(Exception):
                    channel.flush()  # before connection.close, which makes the broker drop
                    # whatever follows it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.call(0, F.ConnectionClose(reply_code=200), F.ConnectionCloseOk), 2
                )
            if proto.transport is not None:
                proto.transport.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(proto.lost), 2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        if self._up:
            self._down()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro, name=f"{self.name}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "link task failed",
                extra={"link": self.name, "task": task.get_name()},
                exc_info=task.exception(),
            )

    # -- connection lifecycle ----------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.25
        while not self._closing:
            proto: LinkProtocol | None = None
            try:
                proto = await self._connect()
                delay = 0.25
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                await proto.lost
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # the attempt's connection (also one that timed out in the handshake: its
                # transport is open and its waiters are pending) is dropped for good
                in_handshake = not self._up  # a LinkError then is the broker's connection.close
                self._abandon(self._proto)
                if self._first is not None and not self._first.done():
                    if not isinstance(exc, LinkError) or in_handshake:
                        exc = BrokerUnavailable(describe_connect_error(self.url, exc))
                    self._first.set_exception(exc)
                    return
                log.warning(
                    "broker link down; retrying",
                    extra={
                        "link": self.name,
                        "error": f"{type(exc).__name__}: {exc}",
                        "retry_s": delay,
                    },
                )
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)
            self.reconnects += 1

    def _abandon(self, proto: LinkProtocol | None) -> None:
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        for _, _, waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()

    async def _connect(self) -> LinkProtocol:
        e = self.endpoint
        async with asyncio.timeout(self.connect_timeout):
            _, proto = await self.loop.create_connection(
                lambda: LinkProtocol(self), e.host, e.port, ssl=e.ssl_context()
            )
            self._proto = proto
            frame_max, heartbeat = await handshake(self, proto)
            self.frame_max = frame_max
            self._heartbeat = heartbeat
            await self.call(0, F.ConnectionOpen(virtual_host=e.vhost), F.ConnectionOpenOk)
            self.last_read = self.last_write = self.loop.time()
            if heartbeat:
                self._heartbeat_timer = self.loop.call_later(heartbeat / 2, self._heartbeat_tick)
            self._up = True
            self.blocked = None
            first = self._first is not None and not self._first.done()
            for channel in list(self.channels):
                try:
                    await self._setup(channel)
                except LinkError as exc:
                    if exc.code == 320 or (first and not isinstance(exc, Refused)):
                        raise  # the first start reports it; a lost connection reconnects
                    self.spawn(self._open_channel(channel, proto), f"reopen {channel.name}")
        log.info(
            "broker link up",
            extra={"link": self.name, "frame_max": frame_max, "heartbeat": heartbeat},
        )
        for callback in list(self.on_connected):
            callback()
        return proto

    async def _setup(self, channel: Channel) -> None:
        await self.call(channel.number, F.ChannelOpen(), F.ChannelOpenOk)
        channel.epoch += 1
        channel.is_open = True
        await channel.setup()
        channel.on_writable()

    async def _open_channel(self, channel: Channel, proto: LinkProtocol | None) -> None:
        """Open (or reopen) one channel on the running connection, with backoff."""
        delay = 0.25
        while not self._closing and self._proto is proto and self._up:
            try:
                if not channel.is_open:
                    await self._setup(channel)
                return
            except LinkError as exc:
                if exc.code == 320:
                    return  # the connection went: the reconnect sets it up
                if not isinstance(exc, Refused):
                    log.warning(
                        "channel not opened; retrying",
                        extra={
                            "link": self.name,
                            "channel": channel.name,
                            "error": str(exc),
                            "retry_s": delay,
                        },
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)

    def connection_lost(self, proto: LinkProtocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        self.fail_waiters(LinkError(320, f"connection lost: {exc}" if exc else "connection closed"))
        self.write_paused = False
        if self._up:
            self._down()
            if not self._closing:
                log.warning(
                    "broker link lost; reconnecting", extra={"link": self.name, "error": str(exc)}
                )

    def _down(self) -> None:
        self._up = False
        for channel in self.channels:
            channel.is_open = False
            channel.on_lost()
        for callback in list(self.on_disconnected):
            callback()

    def _heartbeat_tick(self) -> None:
        proto, beat = self._proto, self._heartbeat
        if proto is None or proto.transport is None or proto.lost.done() or not beat:
            return
        now = self.loop.time()
        if now - self.last_read > 2 * beat:
            log.warning(
                "broker silent for two heartbeats; reconnecting",
                extra={"link": self.name, "s": 2 * beat},
            )
            proto.transport.abort()
            return
        if now - self.last_write >= beat / 2:
            self.write(F.HEARTBEAT)
        self._heartbeat_timer = self.loop.call_later(beat / 2, self._heartbeat_tick)

    # -- frames out --------------------------------------------------------------------

    @property
    def can_publish(self) -> bool:
        """Publishers may write: connected, not blocked by the broker, socket not full."""
        return self._up and self.blocked is None and not self.write_paused

    def write(self, data: bytes) -> None:
        proto = self._proto
        if proto is None or proto.transport is None or proto.lost.done():
            raise LinkError(320, "not connected")
        if self._gather is not None:
            self._gather.append(data)  # sent with the rest of the flush
            return
        proto.transport.write(data)
        self.last_write = self.loop.time()

    def request_flush(self, channel: Channel) -> None:
        """Call ``channel.flush()`` later in this loop turn's callbacks, together with every
        other channel that asked: what they write goes out in one socket write. The channel
        asks once until flushed (its own flag)."""
        self._dirty.append(channel)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        gather = self._gather = []
        try:
            for channel in dirty:
                try:
                    channel.flush()
                except Exception:  # one channel's failure must not hold the others back
                    log.exception(
                        "flush failed", extra={"link": self.name, "channel": channel.name}
                    )
        finally:
            self._gather = None
        if not gather:
            return
        proto = self._proto
        if proto is None or proto.transport is None or proto.lost.done():
            return  # lost meanwhile: the channels' on_lost settles what was in it
        proto.transport.write(gather[0] if len(gather) == 1 else b"".join(gather))
        self.last_write = self.loop.time()

    def writable(self) -> None:
        for channel in self.channels:
            if channel.is_open:
                channel.on_writable()

    def expect(self, channel: int, kind: type) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        fut.add_done_callback(_retrieved)
        self._waiters.append((channel, kind, fut))
        return fut

    async def call(self, channel: int, method: F.Method, reply: type[F.Method]) -> Any:
        """Send a synchronous method and wait for its reply; a channel closed by the broker
        instead raises :class:`LinkError` with the broker's code."""
        fut = self.expect(channel, reply)
        self.write(F.method_frame(channel, method))
        return await fut

    # -- frames in ---------------------------------------------------------------------

    def dispatch(self, proto: LinkProtocol, events: list[F.Event]) -> None:
        if proto is not self._proto:
            return
        by_number = self._by_number
        for number, event in events:
            if number == 0:
                if event is not F.HEARTBEAT_EVENT:
                    connection_method(self, proto, event)
                continue
            channel = by_number.get(number)
            if isinstance(event, F.ChannelClose):
                self._channel_closed(proto, number, channel, event)
                continue
            if isinstance(event, F.Method) and self.resolve(number, event):
                continue
            if channel is not None:
                try:
                    channel.on_event(event)
                except Exception:
                    log.exception(
                        "channel event handling failed",
                        extra={"link": self.name, "channel": channel.name},
                    )

    def resolve(self, number: int, method: F.Method) -> bool:
        for i, (ch, kind, fut) in enumerate(self._waiters):
            if ch == number and isinstance(method, kind) and not fut.done():
                del self._waiters[i]
                if not fut.done():
                    fut.set_result(method)
                return True
        return False

    def restart_channel(self, channel: Channel, why: str) -> None:
        """Close a channel and open it again (its setup runs again)."""
        proto = self._proto

        async def restart() -> None:
            if channel.is_open:
                with contextlib.suppress(LinkError):
                    await self.call(
                        channel.number,
                        F.ChannelClose(reply_code=200, reply_text=why),
                        F.ChannelCloseOk,
                    )
                channel.is_open = False
                channel.on_closed(200, why)
            await self._open_channel(channel, proto)

        self.spawn(restart(), f"restart {channel.name}")

    def _channel_closed(
        self, proto: LinkProtocol, number: int, channel: Channel | None, method: Any
    ) -> None:
        code, text = method.reply_code, method.reply_text
        with contextlib.suppress(LinkError):
            self.write(F.method_frame(number, F.ChannelCloseOk()))
        proto.decoder.reset_channel(number)
        error: LinkError
        if channel is not None and channel.refused(code, text):
            error = Refused(code, text)  # the channel said so itself, once
        else:
            error = LinkError(code, text)
            log.warning(
                "broker closed a channel",
                extra={
                    "link": self.name,
                    "channel": channel.name if channel else number,
                    "code": code,
                    "text": text,
                },
            )
        failed_setup = False
        keep = []
        for ch, kind, fut in self._waiters:
            if ch == number:
                if not fut.done():
                    fut.set_exception(error)
                failed_setup = True
            else:
                keep.append((ch, kind, fut))
        self._waiters = keep
        if channel is None:
            return
        channel.is_open = False
        channel.on_closed(code, text)
        if not failed_setup:  # a failed setup call: its caller retries
            self.spawn(self._open_channel(channel, proto), f"reopen {channel.name}")

    def fail_waiters(self, error: LinkError) -> None:
        """Every call waiting for a reply gets ``error`` (the connection went or closed)."""
        for _, _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
