"""Topology and the host's control-plane connection, on aio-pika.

Declarations (exchanges, queues, bindings), the control-plane RPC and the clients use
aio-pika: they happen at start-up or per request, not per message. Per-message traffic goes
through :mod:`bridge.amqp.link` and its publishers and consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)

from bridge.amqp.endpoint import describe_connect_error
from bridge.errors import BrokerUnavailable, ConfigError
from bridge.settings import HostSettings, redact_url

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
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
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


# What a 406 on an exchange declaration names as the type the exchange has.
_CURRENT_TYPE = re.compile(r"inequivalent arg 'type' .* current is '([^']*)'")
DELAYED_MESSAGE_TYPE = "x-delayed-message"  # the delayed-message plugin's exchange type


async def check_exchanges(
    url: str,
    wanted: Sequence[tuple[str, str, str]],
    hints: Mapping[str, str] | None = None,
    arguments: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Before declaring anything: that each ``(name, kind, setting)`` exchange either does not
    exist yet or exists as the worker would declare it (durable, of type ``kind``, with
    ``arguments[name]`` if given).

    Uses a throw-away connection (the broker closes a channel on each refusal) and changes
    nothing: an existing exchange is declared again only as it is, and one that does not
    exist is left for the worker to declare. Raises :class:`ConfigError`, one line per
    exchange, naming the setting and what to do; ``hints`` maps an existing exchange type
    to the advice for it (the delayed-message plugin's, say).
    """
    conn = await connect_once(url)
    problems: list[str] = []
    try:
        for name, kind, setting in wanted:
            channel = await conn.channel(publisher_confirms=False)
            try:
                await channel.declare_exchange(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                continue  # the worker declares it
            finally:
                await close_channels(channel)
            channel = await conn.channel(publisher_confirms=False)
            try:
                await channel.declare_exchange(
                    name,
                    ExchangeType(kind),
                    durable=True,
                    arguments=dict((arguments or {}).get(name) or {}) or None,
                )
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                reason = str(exc)
                found = _CURRENT_TYPE.search(reason)
                current = found.group(1) if found else None
                advice = (hints or {}).get(
                    current or "",
                    "Delete it if nothing else uses it, or give the worker another name.",
                )
                what = f"type {current}" if current else reason.split(" - ", 1)[-1]
                problems.append(
                    f"{setting}={name}: that exchange already exists with {what}, the worker "
                    f"needs a durable {kind} exchange; nothing was declared. {advice}"
                )
            finally:
                await close_channels(channel)
    finally:
        await conn.close()
    if problems:
        raise ConfigError(*problems)


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


async def close_channels(*channels: AbstractChannel | None) -> None:
    for channel in channels:
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
