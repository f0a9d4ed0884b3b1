"""Poison: telling a message that keeps failing from a worker that cannot work right now.

A delivery whose handler raises is requeued by its consumer, and its failures are counted,
keyed by its ``message_id`` (or a digest of routing key and body), in a bounded map: at
:data:`POISON_ATTEMPTS` failures it goes to the consumer's ``poison`` callback instead,
which dead-letters it with reason :data:`PROCESSING_FAILED` and the exception's class
(:data:`H_DEAD_EXCEPTION`). A :class:`~bridge.errors.BridgeError` (the store cannot
commit, the broker refused a publish) says the worker cannot work right now, not that the
message is bad: requeued, not counted. A delivery that cannot be requeued (``no_ack``,
``ack_on_receipt``) goes to ``poison`` at its first failure. The count lives in memory, so
a message that makes the process die is caught by the broker's count instead: a
redelivery whose ``x-delivery-count`` (quorum queues) reached :data:`DELIVERY_LIMIT` goes
to ``poison`` with reason :data:`DELIVERY_LIMIT_REASON` before the handler sees it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from bridge.amqp import frames as F

POISON_ATTEMPTS = 5  # failures of one message before it is dead-lettered
POISON_MEMORY = 10_000  # messages whose failures are remembered (least recent forgotten)
DELIVERY_LIMIT = 20  # broker-counted returns (x-delivery-count) before it is dead-lettered
H_DELIVERY_COUNT = "x-delivery-count"
H_DEAD_REASON = "x-dead-reason"  # every dead letter: why (a reason code of its worker)
H_DEAD_DETAIL = "x-dead-detail"  # and a readable detail, at most 500 characters
H_DEAD_EXCEPTION = "x-dead-exception"
PROCESSING_FAILED = "processing_failed"
DELIVERY_LIMIT_REASON = "delivery_limit"

# poison(delivery, reason, detail, exception class name or None): dead-letter it (and
# settle it); called at most once per delivery
Poison = Callable[[F.Delivery, str, str, str | None], Awaitable[None]]


class Failures:
    """Failures per message (its ``message_id``, else a digest of routing key and body), in
    a bounded map: the least recent are forgotten beyond :data:`POISON_MEMORY`."""

    def __init__(self, limit: int = POISON_MEMORY) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._limit = limit

    def count(self, delivery: F.Delivery) -> int:
        """One more failure of ``delivery``'s message: how many so far (remembered)."""
        key = _key(delivery)
        attempts = self._counts.pop(key, 0) + 1
        self._counts[key] = attempts
        if len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return attempts

    def forget(self, delivery: F.Delivery) -> None:
        """The message was given up (handed to ``poison``)."""
        self._counts.pop(_key(delivery), None)

    def __len__(self) -> int:
        return len(self._counts)


def failure_detail(exc: Exception, attempts: int) -> str:
    """The dead-letter detail of a message given up after ``attempts`` failures."""
    detail = f"{type(exc).__name__}: {exc}"
    return f"failed {attempts} times, last: {detail}" if attempts > 1 else detail


def over_delivery_limit(delivery: F.Delivery) -> str | None:
    """The dead-letter detail of a redelivery the broker counted :data:`DELIVERY_LIMIT`
    times (``x-delivery-count``), or None for one below it."""
    headers = delivery.properties.headers
    count = headers.get(H_DELIVERY_COUNT) if headers else None
    if type(count) is not int or count < DELIVERY_LIMIT:
        return None
    return (
        f"delivered {count + 1} times without being settled (the worker stopped or lost "
        "its connection while handling it each time)"
    )


def _key(delivery: F.Delivery) -> str:
    if delivery.message_id:
        return delivery.message_id
    h = hashlib.sha256((delivery.routing_key or "").encode())
    h.update(delivery.body)
    return h.hexdigest()
