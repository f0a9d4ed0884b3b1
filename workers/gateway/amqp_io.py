"""The gateway's per-message AMQP paths, on aiormq directly.

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
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from bridge.errors import PublishFailed

log = logging.getLogger("bridge.gateway")

Properties = Basic.Properties


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
                channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
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


class RawConsumer:
    """A no-ack consumer whose callback gets aiormq's ``DeliveredMessage``."""

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
        ok = await underlay.basic_consume(self.queue, self.callback, no_ack=True)
        self._underlay, self._tag = underlay, ok.consumer_tag
        log.info("consuming", extra={"queue": self.queue})
        return True

    async def cancel(self) -> None:
        underlay, tag = self._underlay, self._tag
        self._underlay = self._tag = None
        if underlay is not None and tag is not None and not underlay.is_closed:
            await underlay.basic_cancel(tag)
