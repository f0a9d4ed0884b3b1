"""Consuming on a :class:`~bridge.amqp.link.Link`: prefetch, batched acknowledgements, and a
queue that the broker cancels (deleted under the worker) declared and consumed again.

The handler gets a :class:`~bridge.amqp.frames.Delivery`. It may be a plain function or
return an awaitable (then it runs as a task, tracked in :attr:`Consumer.inflight` so a
drain can wait for it; one that raises has its delivery requeued). Without ``no_ack`` the
handler settles each delivery with :meth:`Consumer.ack`, :meth:`Consumer.nack` or
:meth:`Consumer.reject`, or sets ``ack_on_receipt`` for idempotent requests whose loss is
recovered by the caller's retry.

Settlements are written once per event-loop turn: the leading run of settled deliveries
(in delivery-tag order) as one ``basic.ack``/``basic.nack`` with ``multiple``, the others
one frame each. A delivery from before a reconnect or channel reopen is stale: settling it
does nothing (the broker has requeued it already).

A queue deleted under the consumer makes the broker cancel it (``basic.cancel``) while the
channel stays open: the consumer reports not consuming at once (:attr:`Link.ready`), then
closes the channel, and its next setup declares the queue again with its
:class:`QueueSpec` (arguments and bindings) and consumes it again, retried with backoff by
the link; ``on_restored`` is called after.

Poison (a delivery whose handler keeps raising, or that the broker redelivered too often)
is told apart and handed to the consumer's ``poison`` callback by :mod:`bridge.amqp.poison`.

One owner per stateful queue. A stateful worker keeps what its queues carry in files of its
own, so two processes consuming them would split the messages between two stores. Its
:class:`Lease` is an exclusive queue ``<primary queue>.owner`` on the link's connection (a
classic queue, declared at every setup and consumed, so that its deletion is noticed):
the broker lets one connection hold it and deletes it when that connection ends, crash
included. The worker's consumers are made with ``lease=``: they declare and consume only
while the lease is held, and stop (their channel closed, unacknowledged deliveries
requeued) when it is lost. A process whose lease is refused (405 ``RESOURCE_LOCKED``, or
403 for a consume the broker refuses because someone consumes the queue exclusively) logs
one line with the fix, stays not ready, and retries quietly with the link's backoff; it
takes over when the owner goes away. The exclusive *consumer* flag of AMQP cannot be the
lease: quorum queues ignore it (RabbitMQ 3.x), and the worker's queues are quorum queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.amqp import frames as F
from bridge.amqp.channel import Channel
from bridge.amqp.link import Link
from bridge.amqp.poison import DELIVERY_LIMIT as DELIVERY_LIMIT
from bridge.amqp.poison import (
    DELIVERY_LIMIT_REASON,
    POISON_ATTEMPTS,
    PROCESSING_FAILED,
    Failures,
    Poison,
    failure_detail,
    over_delivery_limit,
)
from bridge.amqp.poison import H_DEAD_EXCEPTION as H_DEAD_EXCEPTION
from bridge.amqp.poison import H_DELIVERY_COUNT as H_DELIVERY_COUNT
from bridge.errors import BridgeError

LEASE_SUFFIX = ".owner"

log = logging.getLogger("bridge.amqp.consumer")

Handler = Callable[[F.Delivery], Any]

_ACK = 0
_NACK_REQUEUE = 1
_NACK_DROP = 2


@dataclass(frozen=True)
class QueueSpec:
    """How to declare a consumed queue again (and bind it) when the broker lost it."""

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)


class Consumer(Channel):
    """One consumer on a channel of its own (see the module)."""

    link: Link

    def __init__(
        self,
        link: Link,
        queue: str | QueueSpec,
        handler: Handler,
        *,
        prefetch: int = 100,
        no_ack: bool = False,
        exclusive: bool = False,
        ack_on_receipt: bool = False,
        declare: bool = False,
        arguments: dict[str, Any] | None = None,
        name: str | None = None,
        lease: Lease | None = None,
        poison: Poison | None = None,
    ) -> None:
        self.spec = queue if isinstance(queue, QueueSpec) else QueueSpec(queue)
        super().__init__(link, name=name or f"consumer {self.spec.name}")
        self.queue = self.spec.name
        self.handler = handler
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.ack_on_receipt = ack_on_receipt and not no_ack
        self.declare = declare  # declare (and bind) at every setup, not only after a loss
        self.arguments = arguments or {}
        self.consuming = False
        self.cancelled_by_broker = False
        self.restored = 0
        self.delivered = 0
        self.on_restored: Callable[[str], None] | None = None
        self.inflight: set[asyncio.Task[Any]] = set()
        self._tag = ""
        self._outstanding: dict[int, None] = {}  # unsettled delivery tags, in order
        self._settle: dict[int, int] = {}  # tag -> _ACK / _NACK_*
        self._flush_scheduled = False
        self._stopped = False
        self.poison = poison
        self.failures = Failures()
        self.lease = lease
        self.waiting = False  # open, but the lease is not held: not consuming
        self.refusal: str | None = None  # the broker's refusal while another owner holds it
        if lease is not None:
            lease.dependents.append(self)

    # -- the handler's side ------------------------------------------------------------

    def ack(self, delivery: F.Delivery) -> None:
        self._mark(delivery, _ACK)

    def nack(self, delivery: F.Delivery, *, requeue: bool = True) -> None:
        self._mark(delivery, _NACK_REQUEUE if requeue else _NACK_DROP)

    def reject(self, delivery: F.Delivery, *, requeue: bool = False) -> None:
        self._mark(delivery, _NACK_REQUEUE if requeue else _NACK_DROP)

    def is_current(self, delivery: F.Delivery) -> bool:
        """The delivery came on the channel as it is now (settling it means something)."""
        return delivery.epoch == self.epoch and self.is_open

    async def cancel(self) -> None:
        """Stop deliveries (shutdown); handlers already running go on."""
        self._stopped = True
        if self.consuming and self.is_open:
            self.consuming = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.call(F.BasicCancel(consumer_tag=self._tag), F.BasicCancelOk), 5
                )
        self.consuming = False

    async def drain(self, timeout: float) -> None:
        self.flush()
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=max(timeout, 0.1))
        self.flush()

    # -- the link's side ---------------------------------------------------------------

    def describe(self) -> str:
        if self.refusal is not None:
            return f"not consuming {self.queue}: another process owns it ({self.refusal})"
        if self.waiting and self.lease is not None:
            return f"not consuming {self.queue}: waiting to own {self.lease.owned}"
        if self.cancelled_by_broker:
            return f"consumer cancelled by the broker: {self.queue}"
        return f"not consuming {self.queue}"

    def refused(self, code: int, text: str) -> bool:
        """Another connection holds the queue exclusively (405 on the declaration of an
        exclusive queue, 403 on an exclusive consume): say it once, then wait it out."""
        lowered = text.lower()
        if not (
            (code == 405 and "locked" in lowered) or (code == 403 and "exclusive use" in lowered)
        ):
            return False
        if self.refusal is None:
            lease = self.lease if self.lease is not None else self
            owned = lease.owned if isinstance(lease, Lease) else self.queue
            hint = lease.hint if isinstance(lease, Lease) else "stop the other consumer"
            log.error(
                f"not consuming {owned}: another process owns it; {hint}; this one stays not "
                "ready and takes over when that one goes away",
                extra={"link": self.link.name, "queue": owned, "broker": f"{code} {text}"},
            )
        self.refusal = f"{code} {text}"
        return True

    async def setup(self) -> None:
        self._outstanding.clear()
        self._settle.clear()
        self.waiting = False
        if self._stopped:
            return
        if self.lease is not None and not self.lease.consuming:
            self.waiting = True  # declared and consumed once the lease is held
            return
        if self.declare or self.cancelled_by_broker:
            await self._declare()
        if self.prefetch and not self.no_ack:
            await self.call(F.BasicQos(prefetch_count=self.prefetch), F.BasicQosOk)
        ok = await self.call(
            F.BasicConsume(
                queue=self.queue,
                no_ack=self.no_ack,
                exclusive=self.exclusive,
                arguments=self.arguments,
            ),
            F.BasicConsumeOk,
        )
        self._tag = ok.consumer_tag
        self.consuming = True
        if self.refusal is not None:
            self.refusal = None
            log.warning(
                "consuming: the other owner went away",
                extra={"link": self.link.name, "queue": self.queue},
            )
        self._acquired()
        if self.cancelled_by_broker:
            self.cancelled_by_broker = False
            self.restored += 1
            log.info("consuming again", extra={"link": self.link.name, "queue": self.queue})
            if self.on_restored is not None:
                self.on_restored(self.queue)
        else:
            log.info("consuming", extra={"link": self.link.name, "queue": self.queue})

    async def _declare(self) -> None:
        spec = self.spec
        await self.call(
            F.QueueDeclare(
                queue=spec.name,
                durable=spec.durable,
                exclusive=spec.exclusive,
                auto_delete=spec.auto_delete,
                arguments=spec.arguments,
            ),
            F.QueueDeclareOk,
        )
        for exchange, routing_key in spec.bindings:
            await self.call(
                F.QueueBind(queue=spec.name, exchange=exchange, routing_key=routing_key),
                F.QueueBindOk,
            )

    def on_event(self, event: Any) -> None:
        if type(event) is F.Delivery:
            self._deliver(event)
        elif isinstance(event, F.BasicCancel):
            self._cancelled()

    def on_closed(self, code: int, text: str) -> None:
        if self.consuming:
            self.consuming = False
            self._released()

    def on_lost(self) -> None:
        self.consuming = False
        self.waiting = False

    def _acquired(self) -> None:
        """Consuming now (a :class:`Lease` lets its dependents go on)."""

    def _released(self) -> None:
        """No longer consuming while the connection stays (a :class:`Lease` stops its
        dependents)."""

    def on_writable(self) -> None:
        if self._settle:
            self._schedule()

    # -- internals ---------------------------------------------------------------------

    def _deliver(self, delivery: F.Delivery) -> None:
        if self._stopped:
            return  # after cancel: the broker requeues it
        delivery.epoch = self.epoch
        self.delivered += 1
        if not self.no_ack:
            self._outstanding[delivery.delivery_tag] = None
            if self.ack_on_receipt:
                self._mark(delivery, _ACK)
        if delivery.redelivered and self.poison is not None and self._over_limit(delivery):
            return
        try:
            result = self.handler(delivery)
        except Exception as exc:
            self._failed(delivery, exc)
            return
        if result is not None:  # a coroutine (a plain handler returns None)
            task = asyncio.ensure_future(self._run(delivery, result))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _run(self, delivery: F.Delivery, result: Any) -> None:
        try:
            await result
        except Exception as exc:
            self._failed(delivery, exc)

    def _failed(self, delivery: F.Delivery, exc: Exception) -> None:
        """The handler raised: requeue, or after too many failures hand it to ``poison``."""
        log.error(
            "handler failed",
            extra={"link": self.link.name, "queue": self.queue},
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        settled = self.no_ack or self.ack_on_receipt
        if isinstance(exc, BridgeError):  # the worker cannot work now; the message is not bad
            if not settled:
                self.nack(delivery, requeue=True)
            return
        attempts = 1
        if not settled:
            attempts = self.failures.count(delivery)
            if attempts < POISON_ATTEMPTS or self.poison is None:
                self.nack(delivery, requeue=True)
                return
            self.failures.forget(delivery)
        if self.poison is not None:
            detail = failure_detail(exc, attempts)
            self._spawn_poison(delivery, PROCESSING_FAILED, detail, type(exc).__name__)

    def _over_limit(self, delivery: F.Delivery) -> bool:
        """A redelivery the broker counted :data:`DELIVERY_LIMIT` times: poison, unseen by
        the handler (it may be what made the process die each time)."""
        detail = over_delivery_limit(delivery)
        if detail is None:
            return False
        self._spawn_poison(delivery, DELIVERY_LIMIT_REASON, detail, None)
        return True

    def _spawn_poison(
        self, delivery: F.Delivery, reason: str, detail: str, exception: str | None
    ) -> None:
        assert self.poison is not None
        log.error(
            "message given up: dead-lettering it",
            extra={"link": self.link.name, "queue": self.queue, "reason": reason, "detail": detail},
        )
        task = asyncio.ensure_future(self.poison(delivery, reason, detail, exception))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    def _mark(self, delivery: F.Delivery, how: int) -> None:
        if self.no_ack or delivery.epoch != self.epoch:
            return  # stale: from before a reconnect or reopen; the broker requeued it
        tag = delivery.delivery_tag
        if tag not in self._outstanding or tag in self._settle:
            return
        self._settle[tag] = how
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.link.request_flush(self)

    def flush(self) -> None:
        """Write the settlements made so far (done once per loop turn by itself)."""
        self._flush_scheduled = False
        settle = self._settle
        if not settle or not self.is_open or not self.link.connected:
            return
        outstanding = self._outstanding
        number = self.number
        out: list[bytes] = []
        # the leading run with one kind of settlement: one frame with multiple
        run_kind = -1
        run_end = 0
        for tag in outstanding:
            how = settle.get(tag)
            if how is None or (run_kind != -1 and how != run_kind):
                break
            run_kind = how
            run_end = tag
        if run_end:
            out.append(_frame(number, run_end, run_kind, True))
            for tag in [t for t in outstanding if t <= run_end]:
                del outstanding[tag]
                del settle[tag]
        for tag, how in settle.items():
            out.append(_frame(number, tag, how, False))
            outstanding.pop(tag, None)
        settle.clear()
        if out:
            self.link.write(b"".join(out))

    def _cancelled(self) -> None:
        self.consuming = False
        self._released()
        self.cancelled_by_broker = True
        log.error(
            "the broker cancelled a consumer (queue deleted?); declaring it again",
            extra={"link": self.link.name, "queue": self.queue},
        )
        # a fresh channel: its setup declares the queue (and bindings) and consumes again,
        # retried with backoff by the link
        self.link.restart_channel(self, "consumer cancelled by the broker")


def lease_queue(queue: str) -> str:
    """The exclusive queue whose holder owns ``queue`` (see the module)."""
    return queue + LEASE_SUFFIX


class Lease(Consumer):
    """Ownership of the stateful queue ``owned`` for this link's connection (see the
    module). Make it before the consumers that name it as their ``lease``: the link sets
    its channels up in that order, so after a reconnect the lease is asked for first."""

    def __init__(self, link: Link, owned: str, *, hint: str) -> None:
        super().__init__(
            link,
            QueueSpec(lease_queue(owned), durable=False, exclusive=True),
            _nothing,
            no_ack=True,
            declare=True,
            name=f"lease {owned}",
        )
        self.owned = owned
        self.hint = hint
        self.dependents: list[Consumer] = []
        self.held = asyncio.Event()

    def describe(self) -> str:
        if self.refusal is not None:
            return f"not consuming {self.owned}: another process owns it ({self.hint})"
        return f"not the owner of {self.owned} yet"

    def _acquired(self) -> None:
        self.held.set()
        for consumer in self.dependents:
            if consumer.waiting and consumer.is_open:
                self.link.restart_channel(consumer, f"{self.owned} owned")

    def _released(self) -> None:
        self.held.clear()
        for consumer in self.dependents:
            if consumer.consuming:
                # closing the channel requeues what it has not acknowledged; its setup then
                # waits for the lease
                consumer.consuming = False
                self.link.restart_channel(consumer, f"{self.owned} no longer owned")

    def on_lost(self) -> None:
        super().on_lost()
        self.held.clear()


def _nothing(_: F.Delivery) -> None:
    """Nobody publishes to a lease queue; whatever arrives is dropped (no_ack)."""


def _frame(number: int, tag: int, how: int, multiple: bool) -> bytes:
    if how == _ACK:
        return F.ack_frame(number, tag, multiple)
    return F.nack_frame(number, tag, multiple, how == _NACK_REQUEUE)


async def cancel_all(consumers: list[Consumer]) -> None:
    """Stop deliveries to every consumer (shutdown)."""
    await asyncio.gather(*(c.cancel() for c in consumers))


async def drain_all(consumers: list[Consumer], timeout: float) -> None:
    """Wait (at most ``timeout``) for the handlers still running, then flush their acks."""
    tasks = [t for c in consumers for t in c.inflight]
    if tasks:
        await asyncio.wait(tasks, timeout=max(timeout, 0.1))
    for c in consumers:
        c.flush()
