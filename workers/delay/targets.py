"""What the sender lanes know of their targets: which exchanges a publish proved to exist
(shared by the lanes of a worker), and the stored properties a lane may publish with. Pure:
no I/O."""

from __future__ import annotations

from bridge.amqp.frames import Properties

_VERIFIED_MAX = 10_000


class Verified:
    """Target exchanges that a publish proved to exist, shared by the lanes of a worker.

    A topic's first batch on any lane is probed with one publish alone on its channel (a
    publish to a missing exchange makes the broker close the channel); once one lane saw it
    confirmed, the others pipeline to it right away. Bounded: the oldest are forgotten.

    It also counts the probes the broker refused (403: the worker's user may not publish
    there) per topic, until one is confirmed: an operator may grant the permission, so a
    refusal is retried ``ACCESS_REFUSED_ATTEMPTS`` times before messages are dead-lettered.
    """

    def __init__(self, limit: int = _VERIFIED_MAX) -> None:
        self._topics: dict[str, None] = {}
        self._refused: dict[str, int] = {}
        self._limit = limit

    def __contains__(self, topic: object) -> bool:
        return topic in self._topics

    def add(self, topic: str) -> None:
        self._topics.pop(topic, None)
        self._topics[topic] = None
        while len(self._topics) > self._limit:
            del self._topics[next(iter(self._topics))]
        self._refused.pop(topic, None)

    def refused(self, topic: str) -> int:
        """One more refused probe of ``topic``; how many in a row so far."""
        count = self._refused.pop(topic, 0) + 1
        self._refused[topic] = count
        while len(self._refused) > self._limit:
            del self._refused[next(iter(self._refused))]
        return count

    def discard(self, topic: str) -> None:
        self._topics.pop(topic, None)


_USER_ID_FLAG = 0x0010  # in the low byte of the property flags


def carried_properties(properties: bytes, user: str | None) -> bytes:
    """The stored (encoded) properties to publish with, minus a ``user_id`` the broker
    would refuse; decoded only when they carry a ``user_id`` at all.

    RabbitMQ closes the channel on a ``user_id`` that is not the publishing connection's
    user; the producer's claim was checked when it published, and cannot be carried onward
    by another user.
    """
    if not properties[1] & _USER_ID_FLAG:
        return properties
    decoded = Properties.decode(properties)
    if decoded.user_id == user:
        return properties
    return decoded.copy(user_id=None).encode()
