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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.amqp import frames as F
from bridge.amqp.link import Channel, Link

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
        if self.cancelled_by_broker:
            return f"consumer cancelled by the broker: {self.queue}"
        return f"not consuming {self.queue}"

    async def setup(self) -> None:
        self._outstanding.clear()
        self._settle.clear()
        if self._stopped:
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
        self.consuming = False

    def on_lost(self) -> None:
        self.consuming = False

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
        try:
            result = self.handler(delivery)
        except Exception:
            log.exception("handler failed", extra={"link": self.link.name, "queue": self.queue})
            if not self.no_ack and not self.ack_on_receipt:
                self.nack(delivery, requeue=True)
            return
        if result is not None:  # a coroutine (a plain handler returns None)
            task = asyncio.ensure_future(self._run(delivery, result))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _run(self, delivery: F.Delivery, result: Any) -> None:
        try:
            await result
        except Exception:
            log.exception("handler failed", extra={"link": self.link.name, "queue": self.queue})
            if not self.no_ack and not self.ack_on_receipt:
                self.nack(delivery, requeue=True)

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
        self.cancelled_by_broker = True
        log.error(
            "the broker cancelled a consumer (queue deleted?); declaring it again",
            extra={"link": self.link.name, "queue": self.queue},
        )
        # a fresh channel: its setup declares the queue (and bindings) and consumes again,
        # retried with backoff by the link
        self.link.restart_channel(self, "consumer cancelled by the broker")


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
