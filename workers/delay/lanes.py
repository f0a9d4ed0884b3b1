"""Sender lanes: tasks of the worker's event loop that publish due messages into their target
exchanges.

Each lane is a task with its own AMQP connection (a :class:`bridge.amqp.link.Link` with one
confirm-mode :class:`~bridge.amqp.publisher.Publisher`) and its own read-only SQLite
connection. Lanes are tasks rather than threads: a batch is handed over and reported back
without a hand-off between event loops (``call_soon_threadsafe`` both ways, per batch), and
lanes do not take turns on the GIL with the ingress. The worker's scheduler hands a lane a
turn: one :class:`~workers.delay.core.Assignment` (one topic, at most ``batch`` messages in
due order) or, under a light load, several small ones of different topics (``LANE_PACK``),
which go out together (one store read, one socket write); each is reported once its own
outcomes are in. The lane reads the rows, publishes them with ``mandatory`` (the publisher
writes up to ``publish_window`` unconfirmed publishes per socket write and resolves each
one's outcome from the broker's confirms and returns), dead-letters what the broker could
not route, and reports per message what happened. A lane never raises out of a batch: a channel
the broker closed (404 for a missing exchange) is reopened by the link and the lane goes on.

The broker closes the channel on a publish to a missing exchange, and publishes pipelined
before it on that channel may have been routed without their confirm ever arriving (they
would be sent twice). So the first message to a topic no lane has yet seen confirmed goes
out alone, with nothing else in flight on the lane (in a packed turn, such a batch runs
first, on its own); only after it proved the exchange exists is the rest pipelined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.amqp.endpoint import Endpoint
from bridge.amqp.frames import Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher, settled
from bridge.errors import BrokerUnavailable, PublishFailed
from bridge.settings import HostSettings
from workers.delay.config import (
    ACCESS_REFUSED,
    ACCESS_REFUSED_ATTEMPTS,
    EXCHANGE_NOT_FOUND,
    H_DEAD_DETAIL,
    H_DEAD_REASON,
    UNROUTABLE,
    DelaySettings,
)
from workers.delay.core import Assignment, Entry
from workers.delay.store import StoredMessage, fetch_messages, open_reader
from workers.delay.targets import Verified, carried_properties
from workers.delay.wire import X_DELAY_KEY, X_DELIVER_AT, X_TARGET_EXCHANGE

log = logging.getLogger("bridge.delay.lane")

OK = "ok"
RETRY = "retry"
Outcome = tuple[str, str]  # (OK | RETRY | UNROUTABLE | EXCHANGE_NOT_FOUND | ACCESS_REFUSED, detail)


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


def _runs(items: list[_Item]) -> list[tuple[str, list[_Item]]]:
    """A topic's batch in runs of consecutive messages to one target exchange (a topic that
    is not its exchange, ``TOPIC_BY``, may send into several)."""
    runs: list[tuple[str, list[_Item]]] = []
    for item in items:
        if runs and runs[-1][0] == item.row.exchange:
            runs[-1][1].append(item)
        else:
            runs.append((item.row.exchange, [item]))
    return runs


def _outcome(error: BaseException) -> Outcome:
    """What a failed publish means for the message: dead-lettered with the reason if the
    broker returned it or the exchange is missing, else retried."""
    if isinstance(error, PublishFailed):
        if error.reason in (UNROUTABLE, EXCHANGE_NOT_FOUND, ACCESS_REFUSED):
            return error.reason, error.detail
        if error.reason == "unencodable":  # a name RabbitMQ itself would refuse
            return EXCHANGE_NOT_FOUND, f"not a valid AMQP name: {error.detail}"
        return RETRY, f"{error.reason}: {error.detail}"
    return RETRY, f"{type(error).__name__}: {error}"


class Lane:
    """One sender lane. ``await start()`` connects it; ``submit()`` hands it an assignment;
    results come back through ``report`` (called on the worker's loop, when the batch is
    done)."""

    def __init__(
        self,
        index: int,
        *,
        host: HostSettings,
        settings: DelaySettings,
        db_path: Path,
        report: Callable[[LaneReport], None],
        observe_lateness: Callable[[str, list[float]], None],
        add_busy: Callable[[int, float], None],
        verified: Verified | None = None,
    ) -> None:
        self.index = index
        self.host = host
        self.settings = settings
        self.db_path = db_path
        self._report = report
        self._observe_lateness = observe_lateness
        self._add_busy = add_busy
        self._user = Endpoint.parse(host.amqp_url).user  # the lanes' login, as the link's
        self._queue: asyncio.Queue[Assignment | None] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reader: sqlite3.Connection | None = None
        self._verified = verified if verified is not None else Verified()
        self._failures = 0
        self.link: Link | None = None
        self.publisher: Publisher | None = None
        self.batches = 0

    # -- control from the worker -------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying with capped backoff until :meth:`request_stop`), open the
        store reader, and start serving assignments."""
        try:
            await self._connect()
            self._reader = open_reader(self.db_path)
        except BaseException:
            await self._close()
            raise
        self._task = asyncio.get_running_loop().create_task(
            self._serve(), name=f"delay-lane-{self.index}"
        )

    def submit(self, assignment: Assignment) -> None:
        assert self._task is not None, "lane not started"
        self._queue.put_nowait(assignment)

    def request_stop(self) -> None:
        """Finish the batch in hand, then disconnect."""
        self._queue.put_nowait(None)
        self._stop.set()

    async def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the lane to finish; whether it did."""
        task = self._task
        if task is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return task.done()

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    @property
    def reconnects(self) -> int:
        return self.link.reconnects if self.link is not None else 0

    # -- the lane's task --------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect the lane's link, retrying with capped backoff until stopped."""
        delay = 0.5
        while True:
            link = Link(
                self.host.amqp_url,
                name=f"delay lane {self.index}",
                heartbeat_s=self.host.heartbeat_s,
            )
            publisher = Publisher(
                link,
                name="targets",
                window=self.settings.publish_window,
                timeout=self.settings.publish_timeout_s,
            )
            try:
                await link.start()
            except BrokerUnavailable as exc:
                log.error("%s; retrying in %.1fs", exc, delay, extra={"lane": self.index})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    raise BrokerUnavailable("stopped while waiting for the broker") from exc
                delay = min(delay * 2, self.host.connect_retry_max_s)
                continue
            publisher.start_expiry()
            self.link, self.publisher = link, publisher
            return

    async def _serve(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            stop = False
            while not stop:
                assignment = await self._queue.get()
                if assignment is None:
                    break
                # The dispatcher hands a packed turn over at once: its batches go out
                # together (one store read, one socket write).
                turn = [assignment]
                while not self._queue.empty():
                    more = self._queue.get_nowait()
                    if more is None:
                        stop = True
                        break
                    turn.append(more)
                await self._run_turn(turn, reader)
        finally:
            await self._close()

    async def _run_turn(self, turn: list[Assignment], reader: sqlite3.Connection) -> None:
        """Every batch of a turn, concurrently (each topic in its own order). Each batch
        is reported as soon as its own outcomes are in: a topic whose confirms came back
        does not wait for another topic's (the broker confirms per queue)."""
        found: dict[int, StoredMessage] = {}
        unread: list[int] = []
        for a in turn:
            for e in a.entries:
                content = e.content
                if isinstance(content, StoredMessage):  # kept since the ingress stored it
                    found[e.mid] = content
                else:
                    unread.append(e.mid)
        rows: dict[int, StoredMessage] | None = found
        error = None
        if unread:
            try:
                found.update(fetch_messages(reader, unread))
            except sqlite3.Error as exc:
                rows, error = None, f"store read failed: {exc}"
        if len(turn) == 1:  # the common case under a light load: no task
            await self._run_and_report(turn[0], rows, error)
            return
        # A batch to an exchange no publish has proved yet goes first and alone: its probe
        # may make the broker close the channel, which would take other topics' publishes
        # in flight with it (sent again: twice).
        verified = self._verified
        proven: list[Assignment] = []
        for a in turn:
            if rows is None or all(
                rows[e.mid].exchange in verified for e in a.entries if e.mid in rows
            ):
                proven.append(a)
            else:
                await self._run_and_report(a, rows, error)
        await asyncio.gather(*(self._run_and_report(a, rows, error) for a in proven))

    async def _run_and_report(
        self, a: Assignment, rows: dict[int, StoredMessage] | None, error: str | None
    ) -> None:
        try:
            report = await self._run(a, rows, error)
        except Exception:  # pragma: no cover - _run catches everything
            log.exception("lane crashed", extra={"lane": self.index})
            report = LaneReport(self.index, a.topic)
            report.retry = [e.mid for e in a.entries]
        report.assignment = a
        self.batches += 1
        self._report(report)

    async def _close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        if self.publisher is not None:
            self.publisher.stop_expiry()
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.link.close()

    async def _run(
        self, a: Assignment, rows: dict[int, StoredMessage] | None, error: str | None
    ) -> LaneReport:
        """One batch of a turn: ``rows`` read for the whole turn (None: the read failed
        with ``error``, and the batch is retried)."""
        started = time.perf_counter()
        report = LaneReport(self.index, a.topic)
        if rows is None:
            report.retry = [e.mid for e in a.entries]
            report.error = error
        else:
            items: list[_Item] = []
            for entry in a.entries:
                row = rows.get(entry.mid)
                if row is None:
                    report.gone.append(entry.mid)
                else:
                    items.append(_Item(entry, row))
            try:
                for exchange, run in _runs(items):
                    if report.retry:  # an earlier run goes again: order within the topic
                        report.retry.extend(i.entry.mid for i in run)
                        continue
                    await self._publish_batch(exchange, run, report)
            except Exception as exc:  # never kill the lane: retry
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

    # -- publishing -------------------------------------------------------------------

    async def _publish_batch(self, topic: str, items: list[_Item], report: LaneReport) -> None:
        if not items:
            return
        # never early, whatever the clock did since assign(): the last is due latest
        wait = max(i.entry.due_ms for i in items) / 1000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        outcomes: dict[int, Outcome] = {}
        rest: Sequence[_Item] = items
        if topic not in self._verified:
            first, rest = items[0], items[1:]
            outcome = (await self._publish(topic, [first]))[0]
            outcomes[first.entry.mid] = outcome
            if outcome[0] == EXCHANGE_NOT_FOUND:
                # Only this publish was in flight: the exchange is missing for all of them.
                for item in rest:
                    outcomes[item.entry.mid] = outcome
                rest = []
            elif outcome[0] == ACCESS_REFUSED:
                outcome = self._refused(topic, outcome[1])
                for item in rest:
                    outcomes[item.entry.mid] = outcome
                outcomes[first.entry.mid] = outcome
                rest = []
            elif outcome[0] == RETRY:
                for item in rest:
                    outcomes[item.entry.mid] = outcome
                rest = []
            else:
                self._verified.add(topic)
        if rest:
            for item, outcome in zip(rest, await self._publish(topic, rest), strict=True):
                if outcome[0] in (EXCHANGE_NOT_FOUND, ACCESS_REFUSED):
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

    def _refused(self, topic: str, detail: str) -> Outcome:
        """The broker refused the probe of ``topic`` (403): retried (with the lane's
        backoff) until it was refused ``ACCESS_REFUSED_ATTEMPTS`` times in a row, then the
        batch is dead-lettered and the lane is free for the other topics."""
        count = self._verified.refused(topic)
        if count < ACCESS_REFUSED_ATTEMPTS:
            return RETRY, f"{ACCESS_REFUSED}: {detail}"
        return ACCESS_REFUSED, f"refused {count} times in a row: {detail}"

    async def _publish(self, topic: str, items: Sequence[_Item]) -> list[Outcome]:
        """Publish ``items`` to ``topic`` in order (the publisher pipelines them, a window
        per socket write) and wait for each one's outcome."""
        publisher = self.publisher
        assert publisher is not None
        user = self._user
        now = time.time()
        # one topic per batch (the scheduler's), however many exchanges it sends into
        self._observe_lateness(items[0].entry.topic, [now - i.entry.due_ms / 1000 for i in items])
        publish = publisher.publish
        futures = [
            publish(
                topic,
                item.row.routing_key,
                item.row.body,
                carried_properties(item.row.properties, user),
                message_id=item.row.message_id,
            )
            for item in items
        ]
        return [(OK, "") if r is None else _outcome(r) for r in await settled(futures)]

    async def _dead_letter(
        self, topic: str, dead: list[tuple[_Item, str, str]], report: LaneReport
    ) -> None:
        publisher = self.publisher
        assert publisher is not None
        futures = []
        for item, reason, detail in dead:
            props = Properties.decode(item.row.properties)
            headers = dict(props.headers or {})
            headers[X_TARGET_EXCHANGE] = topic
            headers[X_DELIVER_AT] = item.entry.due_ms
            if item.entry.key is not None:
                headers[X_DELAY_KEY] = item.entry.key
            headers[H_DEAD_REASON] = reason
            headers[H_DEAD_DETAIL] = (detail or reason)[:500]
            if props.user_id != self._user:
                props.user_id = None
            props.headers = headers
            futures.append(
                publisher.publish(
                    self.settings.dead_exchange,
                    item.row.routing_key,
                    item.row.body,
                    props,
                    mandatory=False,
                )
            )
        for (item, reason, _), result in zip(dead, await settled(futures), strict=True):
            if result is None:
                report.dead.append((item.entry.mid, reason))
            else:
                report.retry.append(item.entry.mid)
                report.error = f"dead-letter publish failed: {result}"


async def start_lanes(lanes: list[Lane], stop: asyncio.Event) -> None:
    """Start every lane and wait until all are connected (or raise the first failure)."""
    starts: list[asyncio.Future[Any]] = [asyncio.ensure_future(lane.start()) for lane in lanes]
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        pending: set[asyncio.Future[Any]] = set(starts)
        while pending:
            done, pending = await asyncio.wait(
                pending | {stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopped in done:
                for lane in lanes:
                    lane.request_stop()
                raise BrokerUnavailable("stopped while the sender lanes were connecting")
            pending.discard(stopped)
            for fut in done:
                fut.result()
    finally:
        stopped.cancel()
        for fut in starts:
            fut.cancel()
