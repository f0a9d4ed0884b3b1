"""AMQP adapter of the delay worker: ingress, the scheduling loop, the window loader and the
control RPC. The sender lanes live in :mod:`workers.delay.lanes`.

Order of effects, which is what makes a ``kill -9`` safe:

- an ingress delivery is acknowledged only after the commit that stored it (or after the
  broker confirmed its dead-letter);
- a stored message is deleted only after the broker confirmed its publish at the target (or
  its dead-letter); a crash in between re-publishes it after the restart with the same
  ``message_id`` (at-least-once);
- the in-memory scheduler holds hints ``(mid, topic, due, key)`` for the near-term window
  only; the row in SQLite is the truth, and a lane skips a hint whose row is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
import uuid
from collections import deque
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from bridge.amqp import (
    ConfirmPublisher,
    declare_dead_letter,
    declare_exchange,
    declare_quorum_queue,
)
from bridge.errors import PublishFailed
from bridge.host import WorkerContext
from bridge.store import GroupCommitter
from workers.delay import control
from workers.delay.config import (
    H_DEAD_DETAIL,
    H_DEAD_REASON,
    MISSING_REPLY_TO,
    REPLY_CONTENT_TYPE,
    DelaySettings,
)
from workers.delay.lanes import (
    Lane,
    LaneReport,
    OutgoingMessage,
    carried_properties,
    login_user,
    start_lanes,
)
from workers.delay.metrics import DelayMetrics
from workers.delay.model import (
    Entry,
    Reject,
    Scheduler,
    parse_ingress,
    strip_control_headers,
)
from workers.delay.store import (
    DelayStore,
    Delete,
    Insert,
    KeyDelete,
    Op,
    encode_headers,
    props_of,
)

log = logging.getLogger("bridge.delay")


def now_ms() -> int:
    return int(time.time() * 1000)


class _Line:
    __slots__ = ("newest", "sending", "slots")

    def __init__(self) -> None:
        self.slots: deque[list[Any]] = deque()
        self.newest: AbstractIncomingMessage | None = None
        self.sending = False


class AckLine:
    """Acknowledges ingress deliveries in delivery order with as few frames as possible.

    A group commit settles many deliveries at once; one ``basic.ack`` with ``multiple`` for
    the newest of a settled prefix replaces one frame per message (which the broker has to
    process too). Deliveries settled out of order wait for the ones before them. The frames
    of one channel go out one at a time, newest last: a ``multiple`` ack overtaken by a newer
    one would name a tag the broker already forgot, and it closes the channel for that. A
    channel replaced by a reconnect starts a new line (its old delivery tags are void).
    """

    def __init__(self) -> None:
        self._lines: dict[int, _Line] = {}

    def track(self, message: AbstractIncomingMessage) -> list[Any]:
        try:
            key = id(message.channel)
        except Exception:  # channel already closed: the delivery is void
            key = 0
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
        slot = [message, None, key]  # message, outcome ("ack" | "nacked"), line
        line.slots.append(slot)
        return slot

    async def settle(self, slot: list[Any], outcome: str = "ack") -> None:
        slot[1] = outcome
        key = slot[2]
        line = self._lines.get(key)
        if line is None:
            return
        slots = line.slots
        while slots and slots[0][1] is not None:
            done = slots.popleft()
            if done[1] == "ack":
                line.newest = done[0]
        if line.sending:
            return  # the task sending now picks up the newest when it is done
        line.sending = True
        try:
            while line.newest is not None:
                newest, line.newest = line.newest, None
                # After a reconnect the delivery tag is stale; the broker redelivers, and
                # the message is stored twice (delivered twice, same message_id).
                with contextlib.suppress(Exception):
                    await newest.ack(multiple=True)
        finally:
            line.sending = False
            if not slots and self._lines.get(key) is line:
                del self._lines[key]

    @property
    def waiting(self) -> int:
        return sum(len(line.slots) for line in self._lines.values())


def _consume_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed background commit is logged by the committer


class DelayWorker:
    name = "delay"

    def __init__(self, settings: DelaySettings | None = None) -> None:
        self.settings = settings or DelaySettings()
        self.scheduler: Scheduler | None = None
        self.store: DelayStore | None = None
        self.committer: GroupCommitter[Op] | None = None
        self.topic_counts: dict[str, int] = {}
        self.lanes: list[Lane] = []
        self._journal: list[Op] = []
        # mids whose publish was confirmed (or dead-lettered) and whose delete is not yet
        # committed: the loader and cancel must not treat them as pending.
        self._deleting: set[int] = set()
        self._topics: dict[str, str] = {}
        self._next_mid = 1
        self._consuming = False
        self._dispatching = False
        self._wake: asyncio.Future[None] | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._lanes_stop = asyncio.Event()
        self._extra_cap = 0
        self._acks = AckLine()
        self._unflushed: list[int] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self.started_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        s = self.settings
        started = time.perf_counter()
        if s.switch_interval_ms > 0:
            sys.setswitchinterval(s.switch_interval_ms / 1000)
        if s.gc_gen2_threshold > 0:
            # A full collection stops every lane; the window's entries are freed by reference
            # counting, so frequent full passes only cost lateness (see the setting).
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, s.gc_gen2_threshold)
        self._loop = asyncio.get_running_loop()
        self.metrics = DelayMetrics(ctx.registry, self)
        self.scheduler = Scheduler(lanes=s.lanes, batch=s.batch)
        # A message due now may enter a window capped by a backlog, up to this many extra.
        self._extra_cap = s.window_max_entries + max(1000, s.window_max_entries // 10)
        self.store = DelayStore(
            ctx.state_dir(self.name), synchronous=s.synchronous, cache_mb=s.cache_mb
        )
        boot = await self.store.db.run(self.store.startup)
        self._next_mid = boot.next_mid
        self.topic_counts = boot.topic_counts
        self.store.admit_extra = self._admit_extra
        self.committer = GroupCommitter(
            self.store.db, self._take, self.store.apply, on_commit=self._on_commit
        )
        self.committer.start()
        await self._load_step()

        broker = ctx.broker
        self._channel = await broker.channel(prefetch=s.prefetch, confirms=True)
        self.publisher = ConfirmPublisher(self._channel)
        self._dead: AbstractExchange = await declare_dead_letter(
            self._channel, s.dead_exchange, s.dead_queue
        )
        in_ex = await declare_exchange(self._channel, s.in_exchange, "topic")
        in_q = await declare_quorum_queue(self._channel, s.in_queue, bind=(in_ex, "#"))
        self._control_channel = await broker.channel(prefetch=s.control_prefetch, confirms=False)
        control_ex = await declare_exchange(self._control_channel, s.control_exchange, "fanout")
        control_q = await declare_quorum_queue(
            self._control_channel, s.control_queue, bind=(control_ex, "")
        )
        self._reply_channel: AbstractChannel = await broker.channel(confirms=False)
        self._user = login_user(ctx.settings.amqp_url)

        self.lanes = [
            Lane(
                i,
                host=ctx.settings,
                settings=s,
                db_path=self.store.path,
                report=self._report_from_lane,
                observe_lateness=self.metrics.lateness.observe,
                add_busy=self.metrics.add_busy,
            )
            for i in range(s.lanes)
        ]
        await start_lanes(self.lanes, self._lanes_stop)
        self._dispatching = True
        self._tasks = [
            self._loop.create_task(self._dispatch_loop(), name="delay-dispatch"),
            self._loop.create_task(self._load_loop(), name="delay-loader"),
        ]
        for queue, handler in ((control_q, self._on_control), (in_q, self._on_ingress)):
            tag = await queue.consume(self._tracked(handler))
            self._consumers.append((queue, tag))
        self._consuming = True
        self.started_s = time.perf_counter() - started
        gc.freeze()  # what start-up built (modules, the first window) stays: skip it in passes
        log.info(
            "delay worker started",
            extra={
                "stored": boot.pending,
                "window": len(self.scheduler),
                "lanes": s.lanes,
                "seconds": round(self.started_s, 3),
            },
        )

    def _tracked(self, handler: Any) -> Any:
        async def run(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            slot = self._acks.track(message)  # first thing: keeps delivery order
            try:
                await handler(message, slot)
            except Exception:
                log.exception("handler failed; message will be redelivered")
                await self._nack(slot)
            finally:
                self._inflight.discard(task)

        return run

    async def _ack(self, slot: list[Any]) -> None:
        await self._acks.settle(slot, "ack")

    async def _nack(self, slot: list[Any]) -> None:
        if slot[1] is None:
            with contextlib.suppress(Exception):
                await slot[0].nack(requeue=True)
            await self._acks.settle(slot, "nacked")

    async def stop(self, grace: float) -> None:
        deadline = time.monotonic() + max(grace - 1, 0.5)
        self._consuming = False
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=max(deadline - time.monotonic(), 0.1))
        self._dispatching = False
        self._kick()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Lanes finish the batch in hand; their reports journal the deletes.
        while self.scheduler is not None and self.scheduler.busy_lanes():
            if time.monotonic() > deadline:
                log.warning(
                    "stopping with batches unconfirmed; they are sent again after the restart",
                    extra={"lanes": sorted(self.scheduler.busy_lanes())},
                )
                break
            await asyncio.sleep(0.01)
        self._lanes_stop.set()
        for lane in self.lanes:
            lane.request_stop()
        for lane in self.lanes:
            await asyncio.to_thread(lane.join, max(deadline - time.monotonic(), 0.5))
        await asyncio.sleep(0)  # reports the lanes queued while stopping
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_deletes()
        if self.committer is not None:
            with contextlib.suppress(Exception):
                await self.committer.close()
        for channel in (
            getattr(self, "_channel", None),
            getattr(self, "_control_channel", None),
            getattr(self, "_reply_channel", None),
        ):
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()
        if self.store is not None:
            self.store.close()

    def ready(self) -> tuple[bool, str]:
        if self.committer is not None and self.committer.failing:
            return False, f"state commits failing: {self.committer.failing}"
        if not self._consuming:
            return False, "not consuming"
        down = [lane.index for lane in self.lanes if not lane.connected]
        if down and len(down) == len(self.lanes):
            return False, "no sender lane is connected"
        if down:
            return True, f"consuming; lanes {down} reconnecting"
        return True, "consuming"

    def admin(self, view: str) -> Any:
        if self.scheduler is None or self.store is None:
            return {"state": "starting"}
        if view in ("", "summary"):
            return {
                "stored": sum(self.topic_counts.values()),
                "window": len(self.scheduler),
                "window_end_ms": self.store.window_end[0],
                "busy_lanes": sorted(self.scheduler.busy_lanes()),
                "lanes": [
                    {"lane": lane.index, "connected": lane.connected, "batches": lane.batches}
                    for lane in self.lanes
                ],
                "commits": self.committer.commits if self.committer else 0,
                "commit_failing": self.committer.failing if self.committer else None,
                "store_bytes": self.store.size_bytes(),
                "start_seconds": self.started_s,
            }
        if view == "topics":
            return dict(self.metrics.top_topics(100))
        return None

    # -- journal -----------------------------------------------------------------------

    def _take(self) -> list[Op]:
        ops, self._journal = self._journal, []
        return ops

    def _on_commit(self, items: int, seconds: float) -> None:
        self.metrics.commit_seconds.observe(seconds)
        assert self.store is not None
        for topic, delta in self.store.last_deltas.items():
            count = self.topic_counts.get(topic, 0) + delta
            if count > 0:
                self.topic_counts[topic] = count
            else:
                self.topic_counts.pop(topic, None)

    def _commit_soon(self) -> asyncio.Future[None]:
        assert self.committer is not None
        fut = self.committer.barrier()
        fut.add_done_callback(_consume_result)
        return fut

    def _admit_extra(self, due_ms: int) -> bool:
        # Runs on the writer thread: a message due within the window while the window is
        # capped (a backlog after downtime) still goes into memory, so it does not wait
        # behind the backlog; bounded by _extra_cap.
        scheduler = self.scheduler
        return (
            scheduler is not None
            and due_ms <= now_ms() + self.settings.window_ms
            and len(scheduler) < self._extra_cap
        )

    def _admit(self, mid: int, due_ms: int, topic: str, key: str | None) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        if mid in scheduler or mid in self._deleting:
            return
        replaced = scheduler.add(Entry(mid, self._topics.setdefault(topic, topic), due_ms, key))
        if replaced is not None:  # a same-key race; the row may already be gone
            self._journal.append(Delete([(replaced.mid, replaced.topic)]))
            self._commit_soon()

    # -- ingress -----------------------------------------------------------------------

    async def _on_ingress(self, message: AbstractIncomingMessage, slot: list[Any]) -> None:
        s = self.settings
        scheduler = self.scheduler
        assert scheduler is not None and self.committer is not None
        decision = parse_ingress(
            message.headers, now_ms(), horizon_ms=s.horizon_ms, default_target=s.default_target
        )
        if isinstance(decision, Reject):
            self.metrics.received.labels("rejected").inc()
            await self._dead_letter_ingress(message, slot, decision.reason, decision.detail)
            return
        mid = self._next_mid
        self._next_mid += 1
        props = props_of(message)
        message_id = props.get("message_id")
        if not message_id:
            # A stable id: a re-publish after a crash carries the same one.
            message_id = props["message_id"] = uuid.uuid4().hex
        key = decision.key
        replace: KeyDelete | None = None
        if key is not None:
            scheduler.remove_key(key)
            replace = KeyDelete(key, mid, scheduler.key_mids(key))
            self._journal.append(replace)
        op = Insert(
            mid=mid,
            due_ms=decision.due_ms,
            topic=decision.topic,
            routing_key=message.routing_key or "",
            key=key,
            message_id=message_id,
            props=json.dumps(props, separators=(",", ":")),
            headers=encode_headers(strip_control_headers(message.headers)),
            body=message.body,
        )
        self._journal.append(op)
        await self.committer.barrier()
        if op.in_window:
            self._admit(mid, op.due_ms, op.topic, key)
            self._kick()
        if replace is not None and replace.deleted:
            self.metrics.replaced.inc(replace.deleted)
        self.metrics.received.labels("accepted").inc()
        await self._ack(slot)

    async def _dead_letter_ingress(
        self, message: AbstractIncomingMessage, slot: list[Any], reason: str, detail: str
    ) -> None:
        headers = dict(message.headers or {})
        headers[H_DEAD_REASON] = reason
        headers[H_DEAD_DETAIL] = detail[:500]
        dead = OutgoingMessage(
            message.body, carried_properties(props_of(message), headers, self._user)
        )
        try:
            await self.publisher.publish(self._dead, dead, message.routing_key or "")
        except PublishFailed as exc:
            log.error(
                "dead-letter publish failed; requeueing",
                extra={"reason": reason, "error": str(exc)},
            )
            await asyncio.sleep(1)
            await self._nack(slot)
            return
        self.metrics.dead_letters.labels(reason).inc()
        log.warning("message dead-lettered", extra={"reason": reason, "detail": detail[:200]})
        await self._ack(slot)

    # -- scheduling --------------------------------------------------------------------

    def _kick(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _dispatch_loop(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        loop = asyncio.get_running_loop()
        n_lanes = len(self.lanes)
        while self._dispatching:
            for assignment in scheduler.assign(now_ms()):
                self.lanes[assignment.lane].submit(assignment)
            wake: asyncio.Future[None] = loop.create_future()
            self._wake = wake
            handle = None
            nxt = scheduler.next_due_ms()
            if nxt is not None:
                delay = nxt / 1000 - time.time()
                if delay > 0:
                    handle = loop.call_later(delay, _set_done, wake)
                elif len(scheduler.busy_lanes()) < n_lanes:
                    wake.set_result(None)  # became due meanwhile and a lane is free
                # else: due but every lane is busy; a lane's report wakes us
            await wake
            if handle is not None:
                handle.cancel()

    def _report_from_lane(self, report: LaneReport) -> None:
        """Called on a lane thread."""
        with contextlib.suppress(RuntimeError):  # loop closed: the worker is gone
            self._loop.call_soon_threadsafe(self._on_report, report)

    def _on_report(self, r: LaneReport) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        dead = [mid for mid, _ in r.dead]
        scheduler.complete(r.lane, done=[*r.sent, *dead, *r.gone], retry=r.retry)
        rows = [(mid, r.topic) for mid in (*r.sent, *dead)]
        if rows:
            mids = [mid for mid, _ in rows]
            self._deleting.update(mids)
            self._journal.append(Delete(rows))
            self._commit_soon().add_done_callback(lambda _: self._deleting.difference_update(mids))
        if r.sent:
            self.metrics.published.inc(len(r.sent))
        for _, reason in r.dead:
            self.metrics.dead_letters.labels(reason).inc()
        if r.retry:
            self.metrics.retries.inc(len(r.retry))
        self._kick()

    def _flush_deletes(self) -> None:
        self._flush_handle = None
        mids, self._unflushed = self._unflushed, []
        if mids:
            self._commit_soon().add_done_callback(lambda _: self._deleting.difference_update(mids))

    # -- the window loader -------------------------------------------------------------

    async def _load_step(self) -> int:
        s = self.settings
        store, scheduler = self.store, self.scheduler
        assert store is not None and scheduler is not None
        until = now_ms() + s.window_ms
        if store.window_end[0] >= until:
            return 0
        limit = min(s.load_chunk, s.window_max_entries - len(scheduler))
        if limit <= 0:
            return 0
        rows = await store.db.run(store.load, until, limit)
        for row in rows:
            self._admit(row.mid, row.due_ms, row.topic, row.key)
        if rows:
            self._kick()
        return len(rows)

    async def _load_loop(self) -> None:
        while self._dispatching:
            try:
                loaded = await self._load_step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("window load failed; retrying")
                loaded = 0
            if loaded < self.settings.load_chunk:
                await asyncio.sleep(self.settings.load_interval_s)
            else:
                await asyncio.sleep(0)

    # -- control -----------------------------------------------------------------------

    async def _reply(self, message: AbstractIncomingMessage, body: bytes) -> None:
        assert message.reply_to
        reply = OutgoingMessage(
            body,
            carried_properties(
                {
                    "correlation_id": message.correlation_id,
                    "content_type": REPLY_CONTENT_TYPE,
                    "delivery_mode": 1,
                }
                if message.correlation_id
                else {"content_type": REPLY_CONTENT_TYPE, "delivery_mode": 1},
                None,
                self._user,
            ),
        )
        try:
            await self._reply_channel.default_exchange.publish(
                reply, routing_key=message.reply_to, mandatory=False
            )
        except Exception as exc:  # the requester is gone or the channel is reconnecting
            log.info("reply not sent", extra={"reply_to": message.reply_to, "error": str(exc)})

    async def _on_control(self, message: AbstractIncomingMessage, slot: list[Any]) -> None:
        s = self.settings
        if not message.reply_to:
            await self._dead_letter_ingress(
                message, slot, MISSING_REPLY_TO, "a control request needs reply_to to be answered"
            )
            return
        try:
            request = control.parse_request(
                message.body, max_bytes=s.max_control_bytes, list_max=s.list_max
            )
            if isinstance(request, control.Cancel):
                body = control.dumps(await self._cancel(request))
            elif isinstance(request, control.Counts):
                body = control.dumps(await self._counts())
            else:
                body = control.dumps(await self._list(request))
        except control.ControlError as exc:
            body = control.encode_error(exc.code, exc.message)
        await self._reply(message, body)
        await self._ack(slot)

    async def _cancel(self, request: control.Cancel) -> dict[str, Any]:
        store, scheduler, committer = self.store, self.scheduler, self.committer
        assert store is not None and scheduler is not None and committer is not None
        await committer.barrier()  # messages consumed before this request are stored
        rows = await store.read(DelayStore.select, request.by, request.value)
        doomed: list[tuple[int, str]] = []
        in_flight = False
        for mid, topic in rows:
            if mid in self._deleting:
                continue  # confirmed at its target; the delete is being committed
            if scheduler.remove(mid) == "in_flight":
                in_flight = True
                continue
            doomed.append((mid, topic))  # removed from the window, or beyond it
        cancelled = 0
        if doomed:
            op = Delete(doomed)
            self._journal.append(op)
            await committer.barrier()
            cancelled = op.deleted
        if cancelled:
            self.metrics.cancelled.inc(cancelled)
            return {"cancelled": True, "count": cancelled}
        return {"cancelled": False, "state": "in_flight" if in_flight else "sent_or_unknown"}

    async def _counts(self) -> dict[str, Any]:
        assert self.store is not None
        counts = await self.store.read(DelayStore.counts)
        return {
            "topics": {
                topic: {"pending": n, "next_due_ms": first} for topic, (n, first) in counts.items()
            },
            "total": sum(n for n, _ in counts.values()),
        }

    async def _list(self, request: control.ListPending) -> dict[str, Any]:
        assert self.store is not None
        rows = await self.store.read(DelayStore.page, request.topic, request.after, request.limit)
        messages = [
            {
                "id": message_id,
                "mid": mid,
                "key": key,
                "due_ms": due,
                "routing_key": routing_key,
                "size": size,
            }
            for mid, due, key, routing_key, message_id, size in rows
        ]
        last = rows[-1] if len(rows) == request.limit else None
        return {
            "topic": request.topic,
            "messages": messages,
            "next": control.encode_cursor(last[1], last[0]) if last else None,
        }


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
