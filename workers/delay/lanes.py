"""Sender lanes: threads that publish due messages into their target exchanges.

Each lane is a thread with its own event loop, its own AMQP connection and confirm channel
(aio-pika objects belong to the loop that made them) and its own read-only SQLite
connection. The worker's scheduler hands a lane one :class:`~workers.delay.model.Assignment`
at a time (one topic, at most ``batch`` messages in due order); the lane reads the rows,
publishes them with ``mandatory`` and confirms in windows of ``publish_window`` messages (one
socket write per window, frames encoded here: :meth:`Lane._written_in_batches`), dead-letters
what the broker could not route, and reports per message what happened. A lane never raises out of a batch: a
channel the broker closed (404 for a missing exchange) is reopened and the lane goes on.

Two aiormq details shape the publish loop:

- the broker closes the channel on a publish to a missing exchange, and publishes already
  pipelined behind it on that channel can make it close the whole connection. So the first
  message to a topic this lane has not yet seen confirmed goes out alone; only after it
  proved the exchange exists is the rest of the batch pipelined.
- aiormq matches a ``Basic.Return`` to its publish by ``message_id``. Producers may reuse a
  message id (and a re-publish after a crash keeps it), so two publishes with the same id
  are never in flight on one channel at once: the batch is cut into waves of distinct ids,
  and a publish waits while another batch of the lane has one with its id in flight.

With ``LANE_RELEASE`` (off by default: measured worse, docs/delay.md) batches go through
aio-pika one publish at a time instead, and a lane is *released* as soon as every publish of
its batch has been handed to the channel
(``release`` callback): from then on it only waits for the broker's confirms, which under
load take tens of milliseconds (the broker confirms a persistent message once it is on
disk). The lane takes the next assignment (another topic) meanwhile; the released topic
keeps its batch in the scheduler until the report, so it still has one batch out at a time.
A batch whose topic is not yet verified is never overlapped with another one (its probe must
be alone on the channel, see above).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import random
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.abc import ChannelFrame
from pamqp.header import ContentHeader

from bridge.amqp import Broker, ConfirmPublisher, confirm_error, track_confirm
from bridge.errors import BrokerUnavailable, PublishFailed
from bridge.settings import HostSettings
from workers.delay.config import (
    EXCHANGE_NOT_FOUND,
    H_DEAD_DETAIL,
    H_DEAD_REASON,
    UNROUTABLE,
    DelaySettings,
)
from workers.delay.model import X_DELAY_KEY, X_DELIVER_AT, X_TARGET_EXCHANGE, Assignment, Entry
from workers.delay.store import StoredMessage, build_properties, fetch_messages, open_reader

log = logging.getLogger("bridge.delay.lane")

OK = "ok"
RETRY = "retry"
Outcome = tuple[str, str]  # (OK | RETRY | UNROUTABLE | EXCHANGE_NOT_FOUND, detail)
_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_VERIFIED_MAX = 10_000
# A lane's channel carries at most this many publish windows unconfirmed (batches overlap).
_WINDOWS_PER_LANE = 4
# The publish window of the batch the current task works for (its publishes inherit it).
_BATCH_WINDOW: contextvars.ContextVar[asyncio.Semaphore] = contextvars.ContextVar("window")


class OutgoingMessage(aio_pika.Message):
    """A message re-published with exactly the stored properties.

    ``aio_pika.Message`` fills in a delivery mode and priority the producer may not have set,
    and round-trips ``expiration`` through float seconds; the stored pamqp properties avoid
    both.
    """

    __slots__ = ("_raw_properties",)

    def __init__(self, body: bytes, properties: Any) -> None:
        super().__init__(body)
        self._raw_properties = properties

    @property
    def properties(self) -> Any:
        return self._raw_properties


class Verified:
    """Target exchanges that a publish proved to exist, shared by the lanes of a worker.

    A topic's first batch on any lane is probed with one publish alone on its channel (a
    publish to a missing exchange makes the broker close the channel); once one lane saw it
    confirmed, the others pipeline to it right away. Bounded: the oldest are forgotten.
    """

    def __init__(self, limit: int = _VERIFIED_MAX) -> None:
        self._topics: dict[str, None] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def __contains__(self, topic: object) -> bool:
        return topic in self._topics

    def add(self, topic: str) -> None:
        with self._lock:
            self._topics.pop(topic, None)
            self._topics[topic] = None
            while len(self._topics) > self._limit:
                del self._topics[next(iter(self._topics))]

    def discard(self, topic: str) -> None:
        with self._lock:
            self._topics.pop(topic, None)


@dataclass(slots=True)
class LaneReport:
    """What a lane did with one assignment; every mid of the batch is in exactly one list."""

    lane: int
    topic: str
    sent: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)  # (mid, reason)
    gone: list[int] = field(default_factory=list)  # no row: cancelled or replaced meanwhile
    retry: list[int] = field(default_factory=list)
    busy_s: float = 0.0
    error: str | None = None
    assignment: Assignment | None = None


@dataclass(slots=True)
class _Item:
    entry: Entry
    row: StoredMessage


class _Written:
    """Counts the publishes of a batch handed to the channel; set once all of them were."""

    __slots__ = ("event", "left")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.left = -1  # unknown until the batch knows how many it publishes

    def expect(self, n: int) -> None:
        self.left = n
        if n <= 0:
            self.event.set()

    def one(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.event.set()


_PUBLISH_MANDATORY = b"\x00\x3c\x00\x28\x00\x00"  # basic.publish (60, 40), ticket 0


def publish_method(channel: int, exchange: str, routing_key: str) -> bytes:
    """The method frame of a mandatory ``basic.publish``, encoded here: pamqp refuses exchange
    names outside ``[A-Za-z0-9-_.:]`` and longer than 127 characters, which RabbitMQ accepts
    (any UTF-8 up to 255 bytes), so such a topic would never be sent nor dead-lettered."""
    ex, rk = exchange.encode(), routing_key.encode()
    if len(ex) > 255 or len(rk) > 255:
        raise ValueError("exchange name and routing key are at most 255 bytes")
    payload = b"".join((_PUBLISH_MANDATORY, bytes((len(ex),)), ex, bytes((len(rk),)), rk, b"\x01"))
    return b"".join((_FRAME_HEAD.pack(1, channel, len(payload)), payload, b"\xce"))


def _outcome(error: PublishFailed) -> Outcome:
    """What a failed publish means for the message: dead-lettered with the reason if the
    broker returned it or the exchange is missing, else retried."""
    if error.reason in (UNROUTABLE, EXCHANGE_NOT_FOUND):
        return error.reason, error.detail
    return RETRY, f"{error.reason}: {error.detail}"


def login_user(url: str) -> str | None:
    user = urlsplit(url).username
    return unquote(user) if user else None


def carried_properties(
    props: dict[str, Any], headers: dict[str, Any] | None, user: str | None
) -> Any:
    """The stored properties to publish with, minus a ``user_id`` the broker would refuse.

    RabbitMQ closes the channel on a ``user_id`` that is not the publishing connection's
    user; the producer's claim was checked when it published, and cannot be carried onward
    by another user.
    """
    if "user_id" in props and props["user_id"] != user:
        props = {k: v for k, v in props.items() if k != "user_id"}
    return build_properties(props, headers)


class Lane:
    """One sender lane. ``start()`` returns a future resolved once connected; ``submit()``
    queues an assignment; results come back through ``report`` (called on the lane thread)."""

    def __init__(
        self,
        index: int,
        *,
        host: HostSettings,
        settings: DelaySettings,
        db_path: Path,
        report: Callable[[LaneReport], None],
        observe_lateness: Callable[[float], None],
        add_busy: Callable[[int, float], None],
        release: Callable[[int, Assignment], None] | None = None,
        verified: Verified | None = None,
    ) -> None:
        self.index = index
        self._release = release
        self.host = host
        self.settings = settings
        self.db_path = db_path
        self._report = report
        self._observe_lateness = observe_lateness
        self._add_busy = add_busy
        self._user = login_user(host.amqp_url)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Assignment | None] | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"delay-lane-{index}", daemon=True
        )
        self._verified = verified if verified is not None else Verified()
        # message_id -> resolved when this lane's publish with that id is settled
        self._ids: dict[str, asyncio.Future[None]] = {}
        self._failures = 0
        self.broker: Broker | None = None
        self.channel: AbstractChannel | None = None
        self.publisher: ConfirmPublisher | None = None
        self.batches = 0

    # -- control from the worker's thread ---------------------------------------------

    def start(self) -> concurrent.futures.Future[None]:
        self._thread.start()
        return self._ready

    def submit(self, assignment: Assignment) -> None:
        loop, queue = self._loop, self._queue
        assert loop is not None and queue is not None, "lane not started"
        loop.call_soon_threadsafe(queue.put_nowait, assignment)

    def request_stop(self) -> None:
        """Finish the batch in hand, then disconnect and end the thread."""
        loop, queue, stop = self._loop, self._queue, self._stop
        if loop is None or queue is None or stop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(queue.put_nowait, None)
            loop.call_soon_threadsafe(stop.set)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self.broker is not None and self.broker.connected

    # -- the lane thread --------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # pragma: no cover - _main catches everything
            log.exception("lane crashed", extra={"lane": self.index})
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stop = asyncio.Event()
        reader: sqlite3.Connection | None = None
        try:
            self.broker = Broker(self.host, name=f"delay-lane-{self.index}")
            await self.broker.connect(stop=self._stop)
            await self._open_channel()
            reader = open_reader(self.db_path)
        except BaseException as exc:
            self._ready.set_exception(exc)
            await self._close(reader)
            return
        self._ready.set_result(None)
        batches: set[asyncio.Task[None]] = set()
        try:
            while True:
                assignment = await self._queue.get()
                if assignment is None:
                    break
                overlap = self._release is not None and assignment.topic in self._verified
                if not overlap and batches:
                    # A probe for an unverified topic must be alone on the channel.
                    await asyncio.wait(batches)
                written = _Written()
                task = asyncio.ensure_future(
                    self._batch(assignment, reader, written if overlap else None)
                )
                batches.add(task)
                task.add_done_callback(batches.discard)
                if not overlap:
                    await task
                    continue
                waiter = asyncio.ensure_future(written.event.wait())
                await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not task.done() and self._release is not None:
                    self._release(self.index, assignment)
        finally:
            if batches:  # confirms of released batches: their reports journal the deletes
                await asyncio.wait(batches, timeout=self.settings.publish_timeout_s)
            await self._close(reader)

    async def _batch(
        self, assignment: Assignment, reader: sqlite3.Connection, written: _Written | None
    ) -> None:
        # Each batch has its own window: a cold topic's batch overlapping a hot topic's on
        # this lane must not wait for the hot one's confirms to get a slot.
        _BATCH_WINDOW.set(asyncio.Semaphore(self.settings.publish_window))
        report = await self._run(assignment, reader, written)
        report.assignment = assignment
        self.batches += 1
        self._report(report)

    async def _close(self, reader: sqlite3.Connection | None) -> None:
        if reader is not None:
            reader.close()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.close()

    async def _open_channel(self) -> None:
        assert self.broker is not None
        old = self.channel
        self.channel = await self.broker.channel(confirms=True, on_return_raises=True)
        self.publisher = ConfirmPublisher(
            self.channel,
            window=self.settings.publish_window * (_WINDOWS_PER_LANE if self._release else 1),
            timeout=self.settings.publish_timeout_s,
        )
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()

    async def _ensure_channel(self) -> bool:
        """Wait for the channel to be usable (aio-pika reopens it after a broker close, and
        the robust connection reconnects); open a fresh one if that does not happen."""
        assert self._stop is not None
        deadline = time.monotonic() + 2.0
        while self.channel is None or self.channel.is_closed:
            if self._stop.is_set():
                return False
            if time.monotonic() > deadline and self.broker is not None and self.broker.connected:
                try:
                    await self._open_channel()
                except Exception as exc:
                    log.warning(
                        "lane cannot open a channel", extra={"lane": self.index, "error": str(exc)}
                    )
                    deadline = time.monotonic() + 2.0
                continue
            await asyncio.sleep(0.02)
        return True

    async def _run(
        self, a: Assignment, reader: sqlite3.Connection, written: _Written | None = None
    ) -> LaneReport:
        started = time.perf_counter()
        report = LaneReport(self.index, a.topic)
        try:
            rows = fetch_messages(reader, [e.mid for e in a.entries])
        except sqlite3.Error as exc:
            report.retry = [e.mid for e in a.entries]
            report.error = f"store read failed: {exc}"
        else:
            items: list[_Item] = []
            for entry in a.entries:
                row = rows.get(entry.mid)
                if row is None:
                    report.gone.append(entry.mid)
                else:
                    items.append(_Item(entry, row))
            try:
                await self._publish_batch(a.topic, items, report, written)
            except (Exception, asyncio.CancelledError) as exc:  # never kill the lane: retry
                # aiormq fails the pending confirms of a connection it drops as stuck (missed
                # heartbeats) with its reader's CancelledError: a lost confirm, not a stop.
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                    raise
                log.exception("lane batch failed", extra={"lane": self.index, "topic": a.topic})
                done = {*report.sent, *(m for m, _ in report.dead), *report.gone}
                report.retry = [e.mid for e in a.entries if e.mid not in done]
                report.error = f"{type(exc).__name__}: {exc}"
        if report.retry:
            await self._back_off(report)
        else:
            self._failures = 0
        report.busy_s = time.perf_counter() - started
        self._add_busy(self.index, report.busy_s)
        return report

    async def _back_off(self, report: LaneReport) -> None:
        assert self._stop is not None
        self._failures += 1
        pause = min(self.settings.retry_backoff_max_s, 0.05 * 2 ** min(self._failures, 10))
        log.warning(
            "publishes will be retried",
            extra={
                "lane": self.index,
                "topic": report.topic,
                "retry": len(report.retry),
                "error": report.error,
                "pause_s": pause,
            },
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), pause)
        await self._ensure_channel()

    # -- publishing -------------------------------------------------------------------

    async def _publish_batch(
        self, topic: str, items: list[_Item], report: LaneReport, written: _Written | None = None
    ) -> None:
        if not items:
            return
        if not await self._ensure_channel():
            report.retry.extend(i.entry.mid for i in items)
            report.error = "stopping"
            return
        assert self.channel is not None
        exchange = await self.channel.get_exchange(topic, ensure=False)
        outcomes: dict[int, tuple[str, str]] = {}
        rest = items
        if topic not in self._verified and written is not None:
            # Unverified since the lane took the batch to overlap others (a failure on
            # another batch): the probe must be alone on the channel, so send it again.
            report.retry.extend(i.entry.mid for i in items)
            report.error = "topic to be verified again"
            return
        if topic not in self._verified:
            first, rest = items[0], items[1:]
            if self._release is None:
                outcome = (await self._written_in_batches(topic, [first]))[0]
            else:
                outcome = await self._publish_one(exchange, first)
            outcomes[first.entry.mid] = outcome
            if outcome[0] == EXCHANGE_NOT_FOUND:
                # Only this publish was in flight: the exchange is missing for all of them.
                for item in rest:
                    outcomes[item.entry.mid] = outcome
                rest = []
                await self._ensure_channel()
            elif outcome[0] == RETRY:
                for item in rest:
                    outcomes[item.entry.mid] = outcome
                rest = []
            else:
                self._remember(topic)
        if rest:
            if written is not None:
                written.expect(len(rest))
            if self._release is None:
                pipelined = await self._written_in_batches(topic, rest)
            else:
                pipelined = await self._pipelined(exchange, rest, written)
            for item, outcome in zip(rest, pipelined, strict=True):
                if outcome[0] == EXCHANGE_NOT_FOUND:
                    # Pipelined behind other publishes: not proof enough; probe next time.
                    outcome = (RETRY, outcome[1])
                outcomes[item.entry.mid] = outcome
            if any(o[0] == RETRY for o in outcomes.values()):
                self._verified.discard(topic)
        dead: list[tuple[_Item, str, str]] = []
        for item in items:
            kind, detail = outcomes[item.entry.mid]
            if kind == OK:
                report.sent.append(item.entry.mid)
            elif kind == RETRY:
                report.retry.append(item.entry.mid)
                report.error = detail
            else:
                dead.append((item, kind, detail))
        if dead:
            await self._dead_letter(topic, dead, report)

    def _remember(self, topic: str) -> None:
        self._verified.add(topic)

    async def _pipelined(
        self, exchange: AbstractExchange, items: Sequence[_Item], written: _Written | None = None
    ) -> list[tuple[str, str]]:
        """Publish in order with up to ``publish_window`` in flight, in waves of distinct
        message ids (see the module docstring)."""
        results: list[tuple[str, str]] = []
        wave: list[asyncio.Task[tuple[str, str]]] = []
        ids: set[str] = set()
        for item in items:
            message_id = item.row.message_id
            if message_id is not None:
                if message_id in ids:
                    results.extend(await asyncio.gather(*wave))
                    wave, ids = [], set()
                ids.add(message_id)
            wave.append(asyncio.ensure_future(self._publish_one(exchange, item, written)))
        results.extend(await asyncio.gather(*wave))
        return results

    async def _written_in_batches(self, topic: str, items: Sequence[_Item]) -> list[Outcome]:
        """Publish ``items`` to ``topic`` in order, many per socket write, with confirms.

        The per-message path (aio-pika's ``Exchange.publish``, a task per message, one socket
        write per publish) cost the lane about 200 us of interpreter time per message, and
        the lane's thread shares the interpreter with the scheduler and the other lanes:
        at 2,000 due messages/s that was most of a core and the source of the lateness.
        Here the frames of up to ``publish_window`` messages are encoded and handed to the
        channel in one write, the next window is written while the previous one's confirms
        come back, and each message's outcome comes from its confirmation future, which
        aiormq resolves exactly as for ``basic_publish`` (ack, nack, return under
        ``mandatory``, channel closed). Waves of distinct message ids, as in
        :meth:`_pipelined`.
        """
        results: list[Outcome] = []
        wave: list[_Item] = []
        ids: set[str] = set()
        for item in items:
            message_id = item.row.message_id
            if message_id is not None:
                if message_id in ids:
                    results.extend(await self._write_wave(topic, wave))
                    wave, ids = [], set()
                ids.add(message_id)
            wave.append(item)
        results.extend(await self._write_wave(topic, wave))
        return results

    async def _write_wave(self, topic: str, items: Sequence[_Item]) -> list[Outcome]:
        assert self.channel is not None
        if not items:
            return []
        # never early, whatever the clock did since assign(): the last is due latest
        wait = max(i.entry.due_ms for i in items) / 1000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
        except Exception as exc:
            return [(RETRY, f"channel_error: {type(exc).__name__}: {exc}")] * len(items)
        if channel.is_closed:
            return [(RETRY, "channel_error: channel closed")] * len(items)
        window = self.settings.publish_window
        out: list[Outcome] = []
        in_flight: list[tuple[_Item, asyncio.Future[Any]]] = []
        for start in range(0, len(items), window):
            chunk = items[start : start + window]
            try:
                written = await self._write_chunk(channel, topic, chunk)
            except Exception as exc:  # channel closed, or a frame not encodable: none sent
                outcome = (RETRY, f"channel_error: {type(exc).__name__}: {exc}")
                out.extend(await self._settled(in_flight))
                out.extend([outcome] * (len(items) - len(out)))
                return out
            # Two windows at most unconfirmed: the previous one settles while this is sent.
            out.extend(await self._settled(in_flight))
            in_flight = written
        out.extend(await self._settled(in_flight))
        return out

    async def _write_chunk(
        self, channel: aiormq.Channel, topic: str, chunk: Sequence[_Item]
    ) -> list[tuple[_Item, asyncio.Future[Any]]]:
        number = channel.number
        parts: list[tuple[_Item, str, bytes]] = []
        for item in chunk:
            row = item.row
            properties = self._properties(row, row.headers)
            if not properties.message_id:  # what basic_publish does: returns match by id
                properties.message_id = uuid.UUID(int=random.getrandbits(128), version=4).hex
            frames: list[Any] = [
                ContentHeader(properties=properties, body_size=len(row.body)),
                *channel._split_body(row.body),
            ]
            payload = ChannelFrame.marshall(channel_number=number, frames=frames).payload
            method = publish_method(number, topic, row.routing_key)
            parts.append((item, str(properties.message_id), method + payload))
        async with channel.lock:
            if channel.is_closed:
                raise ConnectionError("channel closed")
            written: list[tuple[_Item, asyncio.Future[Any]]] = []
            now = time.time()
            for item, message_id, _ in parts:
                written.append((item, track_confirm(channel, message_id)))
                self._observe_lateness(now - item.entry.due_ms / 1000)
            await channel.write_queue.put(
                ChannelFrame(payload=b"".join(p for _, _, p in parts), should_close=False)
            )
        return written

    async def _settled(self, written: list[tuple[_Item, asyncio.Future[Any]]]) -> list[Outcome]:
        if not written:
            return []
        futures = [f for _, f in written]
        _, pending = await asyncio.wait(futures, timeout=self.settings.publish_timeout_s)
        timeout = self.settings.publish_timeout_s
        out: list[Outcome] = []
        for item, fut in written:
            if fut in pending:
                out.append((RETRY, f"timeout: no confirm in {timeout}s"))
                continue
            error = confirm_error(fut, item.row.routing_key)
            out.append((OK, "") if error is None else _outcome(error))
        return out

    def _properties(self, row: StoredMessage, headers: dict[str, Any]) -> Any:
        return carried_properties(row.props, headers, self._user)

    async def _publish_one(
        self, exchange: AbstractExchange, item: _Item, written: _Written | None = None
    ) -> tuple[str, str]:
        assert self.publisher is not None
        entry = item.entry
        wait = entry.due_ms / 1000 - time.time()
        if wait > 0:  # never early, whatever the clock did since assign()
            await asyncio.sleep(wait)
        message = OutgoingMessage(item.row.body, self._properties(item.row, item.row.headers))
        try:
            await self._publish(
                exchange,
                message,
                item.row.routing_key,
                item.row.message_id,
                mandatory=True,
                written=written,
                lateness_of=entry.due_ms,
            )
        except PublishFailed as exc:
            return _outcome(exc)
        except ValueError as exc:  # pamqp refuses names RabbitMQ accepts (see publish_method)
            return EXCHANGE_NOT_FOUND, f"the AMQP client cannot name {exchange.name!r}: {exc}"
        return OK, ""

    async def _publish(
        self,
        exchange: AbstractExchange,
        message: OutgoingMessage,
        routing_key: str,
        message_id: str | None,
        *,
        mandatory: bool = False,
        written: _Written | None = None,
        lateness_of: int | None = None,
    ) -> None:
        """Publish within the batch's window; with lane release (batches overlap on the
        lane), never beside a publish of another batch with the same message id, and
        ``written`` counts it. Without it a lane has one batch out at a time and this is the
        plain confirmed publish (the hot path: nothing extra per message)."""
        assert self.publisher is not None
        if self._release is None:
            if lateness_of is not None:
                self._observe_lateness(time.time() - lateness_of / 1000)
            await self.publisher.publish(exchange, message, routing_key, mandatory=mandatory)
            return
        ids = self._ids
        if message_id is not None:
            while message_id in ids:
                await asyncio.shield(ids[message_id])
            ids[message_id] = settled = asyncio.get_running_loop().create_future()
        try:
            async with _BATCH_WINDOW.get():
                if lateness_of is not None:
                    self._observe_lateness(time.time() - lateness_of / 1000)
                if written is not None:
                    written.one()  # handed to the channel within this loop turn
                await self.publisher.publish(exchange, message, routing_key, mandatory=mandatory)
        finally:
            if message_id is not None:
                del ids[message_id]
                settled.set_result(None)

    async def _dead_letter(
        self, topic: str, dead: list[tuple[_Item, str, str]], report: LaneReport
    ) -> None:
        if not await self._ensure_channel():
            report.retry.extend(item.entry.mid for item, _, _ in dead)
            return
        assert self.channel is not None and self.publisher is not None
        exchange = await self.channel.get_exchange(self.settings.dead_exchange, ensure=False)

        async def one(item: _Item, reason: str, detail: str) -> bool:
            headers = dict(item.row.headers)
            headers[X_TARGET_EXCHANGE] = topic
            headers[X_DELIVER_AT] = item.entry.due_ms
            if item.entry.key is not None:
                headers[X_DELAY_KEY] = item.entry.key
            headers[H_DEAD_REASON] = reason
            headers[H_DEAD_DETAIL] = (detail or reason)[:500]
            message = OutgoingMessage(item.row.body, self._properties(item.row, headers))
            try:
                await self._publish(exchange, message, item.row.routing_key, item.row.message_id)
            except PublishFailed as exc:
                report.error = f"dead-letter publish failed: {exc}"
                return False
            return True

        # Waves of distinct message ids, as for the main publishes.
        pending = list(dead)
        while pending:
            wave, later, ids = [], [], set()
            for entry in pending:
                message_id = entry[0].row.message_id
                if message_id is not None and message_id in ids:
                    later.append(entry)
                    continue
                if message_id is not None:
                    ids.add(message_id)
                wave.append(entry)
            results = await asyncio.gather(*(one(*d) for d in wave))
            for (item, reason, _), ok in zip(wave, results, strict=True):
                if ok:
                    report.dead.append((item.entry.mid, reason))
                else:
                    report.retry.append(item.entry.mid)
            pending = later


async def start_lanes(lanes: list[Lane], stop: asyncio.Event) -> None:
    """Start every lane and wait until all are connected (or raise the first failure)."""
    futures: list[asyncio.Future[Any]] = [asyncio.wrap_future(lane.start()) for lane in lanes]
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        pending: set[asyncio.Future[Any]] = set(futures)
        while pending:
            done, pending = await asyncio.wait(
                pending | {stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopped in done:
                raise BrokerUnavailable("stopped while the sender lanes were connecting")
            pending.discard(stopped)
            for fut in done:
                fut.result()
    finally:
        stopped.cancel()
