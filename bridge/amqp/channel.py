"""A channel of a :class:`~bridge.amqp.link.Link`: what the link asks of its
:class:`~bridge.amqp.publisher.Publisher` and :class:`~bridge.amqp.consumer.Consumer`
channels, and what they share."""

from __future__ import annotations

from typing import Any, Protocol

from bridge.amqp import frames as F


class Link(Protocol):
    """What a channel of any kind uses of its :class:`bridge.amqp.link.Link` (which imports
    this module, so it is named here by its shape; a publisher or consumer holds the link
    itself)."""

    def attach(self, channel: Channel) -> None: ...
    def write(self, data: bytes) -> None: ...
    async def call(self, channel: int, method: F.Method, reply: type[F.Method]) -> Any: ...


class Channel:
    """One channel of a :class:`Link`; :class:`~bridge.amqp.publisher.Publisher` and
    :class:`~bridge.amqp.consumer.Consumer` are its two kinds.

    The link calls :meth:`setup` after opening it (on start, after a reconnect, after the
    broker closed it), :meth:`on_event` for each frame of its own, :meth:`on_closed` when
    the broker closed it and :meth:`on_lost` when the connection went.
    """

    def __init__(self, link: Link, *, name: str) -> None:
        self.link = link
        self.name = name
        self.number = 0  # set by the link; 0 = not open
        self.is_open = False
        self.epoch = 0  # +1 each time it is opened: delivery tags of older epochs are stale
        link.attach(self)

    def describe(self) -> str:
        """What is wrong with it, for readiness (called when it is not set up)."""
        return f"{self.name}: channel reopening"

    def refused(self, code: int, text: str) -> bool:
        """Whether the broker closing the channel with ``code`` is a refusal this channel
        reports itself and waits out (then the link retries quietly; see ``Refused``)."""
        return False

    async def setup(self) -> None:
        """What the channel does once open (confirm mode, qos, consume)."""

    def on_event(self, event: Any) -> None:
        """A method, delivery or return for this channel."""

    def on_closed(self, code: int, text: str) -> None:
        """The broker closed this channel (it is reopened after)."""

    def on_lost(self) -> None:
        """The connection went (it is reopened after)."""

    def on_writable(self) -> None:
        """Writing may go on (connection unblocked, socket buffer drained, channel open)."""

    def flush(self) -> None:
        """Write now what waits for the next loop turn (acks, publishes): before a close."""

    def write(self, data: bytes) -> None:
        self.link.write(data)

    async def call(self, method: F.Method, reply: type[F.Method]) -> Any:
        return await self.link.call(self.number, method, reply)


def settled(channel: Channel) -> bool:
    """Not a consumer, or a consumer that consumes (for readiness)."""
    consuming = getattr(channel, "consuming", None)
    return consuming is None or bool(consuming)
