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
import functools
import gc
import json
import logging
import sys
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from bridge.amqp import declare_dead_letter, declare_exchange, declare_quorum_queue
from bridge.amqp.consumer import Consumer, QueueSpec, cancel_all, drain_all
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from bridge.errors import PublishFailed
from bridge.host import WorkerContext
from bridge.sharding import (
    CHX_TYPE,
    RingKeeper,
    Shard,
    ensure_chx_exchange,
    resolve_shard,
    shard_queue,
)
from bridge.store import GroupCommitter
from workers.delay.config import (
    H_DEAD_DETAIL,
    H_DEAD_REASON,
    DelaySettings,
)
from workers.delay.lanes import (
    Lane,
    LaneReport,
    Verified,
    login_user,
    start_lanes,
)
from workers.delay.metrics import DelayMetrics
from workers.delay.model import (
    INVALID_HEADERS,
    Entry,
    Reject,
    Scheduler,
    parse_ingress,
    strip_control_headers,
)
from workers.delay.rpc import ControlRpc
from workers.delay.shards import (
    H_FORWARDED_FROM,
    DelayShards,
    chx_arguments,
    digest_id,
    forwarded_headers,
)
from workers.delay.store import (
    DelayStore,
    Delete,
    Insert,
    KeyDelete,
    Op,
    encode_headers,
    props_dict,
)

log = logging.getLogger("bridge.delay")
_json = json.JSONEncoder(separators=(",", ":")).encode  # stored properties, compact


def now_ms() -> int:
    return int(time.time() * 1000)


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
        self.link: Link | None = None
        self._ingress: Consumer | None = None
        self.consumers: list[Consumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lanes_stop = asyncio.Event()
        self._extra_cap = 0
        self._unflushed: list[int] = []
        self._linger: asyncio.Future[None] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.started_s: float | None = None
        s = self.settings
        self.shard: Shard = resolve_shard(self.name, s.shard_count, s.shard_index)
        self.shards: DelayShards | None = None
        self._ring: RingKeeper | None = None
        self._in_queue = (
            shard_queue(s.in_queue, self.shard.index) if self.shard.sharded else s.in_queue
        )

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
        self._accepted = self.metrics.received.labels("accepted")
        self.scheduler = Scheduler(lanes=s.lanes, batch=s.batch)
        if s.lane_grow_ms > 0:
            self.scheduler.set_active_lanes(1)
        self._lane_used = [time.monotonic()] * s.lanes
        self._lane_batch = [0] * s.lanes
        self._lanes_wanted_at = time.monotonic()
        self._grown_at = 0.0
        # A message due now may enter a window capped by a backlog, up to this many extra.
        self._extra_cap = s.window_max_entries + max(1000, s.window_max_entries // 10)
        self.store = DelayStore(
            ctx.state_dir(self.name),
            synchronous=s.synchronous,
            cache_mb=s.cache_mb,
            identity=self.shard.identity(),
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
        # Declarations through aio-pika (control plane); per-message traffic on the link.
        self._channel = await broker.channel(confirms=False)
        await declare_dead_letter(self._channel, s.dead_exchange, s.dead_queue)
        ingress_q, control_qs = await self._declare_topology(broker)
        self._user = login_user(ctx.settings.amqp_url)
        link = self.link = Link(broker.url, name=self.name, heartbeat_s=broker.settings.heartbeat_s)
        self.publisher = Publisher(link, name="dead letters and forwards")
        self.publisher.start_expiry()
        self.rpc = ControlRpc(self, Publisher(link, name="replies", confirms=False))

        verified = Verified()
        self.lanes = [
            Lane(
                i,
                host=ctx.settings,
                settings=s,
                db_path=self.store.path,
                report=self._report_from_lane,
                observe_lateness=self.metrics.lateness.observe,
                add_busy=self.metrics.add_busy,
                verified=verified,
            )
            for i in range(s.lanes)
        ]
        await start_lanes(self.lanes, self._lanes_stop)
        self._dispatching = True
        self._tasks = [
            self._loop.create_task(self._dispatch_loop(), name="delay-dispatch"),
            self._loop.create_task(self._load_loop(), name="delay-loader"),
        ]
        self._ingress = Consumer(link, ingress_q, self._on_ingress, prefetch=s.prefetch)
        self._ingress.on_restored = self._ingress_restored
        self.consumers = [self._ingress]
        for control_q in control_qs:
            control = Consumer(link, control_q, _unset, prefetch=s.control_prefetch)
            control.handler = functools.partial(self.rpc.handle, consumer=control)
            self.consumers.append(control)
        await link.start()
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

    async def _declare_topology(self, broker: Any) -> tuple[QueueSpec, list[QueueSpec]]:
        """Ingress and control topology; returns the ingress queue and the control queues
        to consume (as specs: a consumer declares its queue again from its spec if it is
        deleted under the worker).

        One shard: ``in_exchange`` (topic) -> ``in_queue`` bound '#'. ``shard_count`` N > 1:
        ``in_exchange`` -> consistent-hash ``shards_exchange`` -> ``<in_queue>.shard-<i>``
        bound with weight 1 in shard order (bucket i is shard i), and each shard also
        consumes ``<control_queue>.shard-<i>`` for the other shards' questions (see
        workers.delay.shards)."""
        s = self.settings
        ch = self._channel
        quorum = {"x-queue-type": "quorum"}
        in_ex = await declare_exchange(ch, s.in_exchange, "topic")
        if not self.shard.sharded:
            await declare_quorum_queue(ch, s.in_queue, bind=(in_ex, "#"))
            ingress = QueueSpec(s.in_queue, arguments=quorum, bindings=((s.in_exchange, "#"),))
        else:
            args = chx_arguments()
            await ensure_chx_exchange(broker.url, self.name, s.shards_exchange, arguments=args)
            shards_ex = await ch.declare_exchange(
                s.shards_exchange, CHX_TYPE, durable=True, arguments=args
            )
            await shards_ex.bind(in_ex, routing_key="#")
            for i in range(self.shard.count):  # in shard order: bucket i is shard i
                await declare_quorum_queue(ch, shard_queue(s.in_queue, i), bind=(shards_ex, "1"))
            ingress = QueueSpec(
                self._in_queue, arguments=quorum, bindings=((s.shards_exchange, "1"),)
            )
            ring = RingKeeper(
                lambda: broker.channel(confirms=False),
                s.shards_exchange,
                [shard_queue(s.in_queue, i) for i in range(self.shard.count)],
                worker=self.name,
            )
            await ring.repair("start")
            broker.on_reconnect(
                lambda: ring.schedule("broker connection came back", delay_s=1.0, force=True)
            )
            self._ring = ring
        control_ex = await declare_exchange(ch, s.control_exchange, "fanout")
        await declare_quorum_queue(ch, s.control_queue, bind=(control_ex, ""))
        queues = [
            QueueSpec(s.control_queue, arguments=quorum, bindings=((s.control_exchange, ""),))
        ]
        if self.shard.sharded:
            own = shard_queue(s.control_queue, self.shard.index)
            await declare_quorum_queue(ch, own)
            queues.append(QueueSpec(own, arguments=quorum))
            self.shards = DelayShards(self.shard, s)
            assert broker.connection is not None
            await self.shards.open(broker.connection)
        return ingress, queues

    def _ingress_restored(self, queue: str) -> None:
        if self._ring is not None:  # a re-created binding moves this shard in the ring
            self._ring.schedule("the ingress queue was declared again", force=True)
        self.metrics.consumer_restored.inc()

    def _owner(self, delivered: Delivery) -> tuple[int, str | None]:
        """The shard that owns a keyless message (by message_id) and, for one without an id,
        the stable id it is forwarded with. A keyed message stays where the exchange put it:
        the exchange hashes the header's typed value, every version of a key alike."""
        props = delivered.properties
        message_id = props.message_id
        if not message_id:
            message_id = digest_id(delivered.routing_key or "", props.headers, delivered.body)
            return self.shard.owner(message_id), message_id
        return self.shard.owner(message_id), None

    async def _forward(
        self, delivered: Delivery, due_ms: int, owner: int, new_id: str | None
    ) -> None:
        """A message that belongs to another shard: hand it to the owner's queue (confirmed)
        before acknowledging it here."""
        assert self._ingress is not None
        headers = forwarded_headers(delivered.properties.headers, due_ms, self.shard)
        props = self._carried(delivered, headers)
        if new_id is not None:
            props.message_id = new_id
        try:
            await self.publisher.publish(
                "",
                shard_queue(self.settings.in_queue, owner),
                delivered.body,
                props,
            )
        except PublishFailed as exc:
            log.error(
                "forward to the key's shard failed; requeueing",
                extra={"owner": owner, "error": str(exc)},
            )
            await asyncio.sleep(1)
            self._ingress.nack(delivered)
            return
        self.metrics.received.labels("forwarded").inc()
        self._ingress.ack(delivered)

    async def stop(self, grace: float) -> None:
        deadline = time.monotonic() + max(grace - 1, 0.5)
        self._consuming = False
        await cancel_all(self.consumers)
        await drain_all(self.consumers, deadline - time.monotonic())
        self._dispatching = False
        self._kick()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Lanes finish the batch in hand (its confirms included); their reports journal the
        # deletes.
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
        if self._ring is not None:
            await self._ring.close()
        if self.shards is not None:
            with contextlib.suppress(Exception):
                await self.shards.close()
        if self.link is not None:
            await self.link.close()
        channel = getattr(self, "_channel", None)
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        if self.store is not None:
            self.store.close()

    def ready(self) -> tuple[bool, str]:
        if self.committer is not None and self.committer.failing:
            return False, f"state commits failing: {self.committer.failing}"
        if not self._consuming or self.link is None:
            return False, "not consuming"
        if not self.link.ready:
            return False, "; ".join(self.link.not_ready())
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
                "active_lanes": self.scheduler.active_lanes,
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

    def _on_ingress(self, delivered: Delivery) -> Coroutine[Any, Any, None] | None:
        """One ingress delivery. The common path (stored, then acknowledged after the
        commit) runs here and in :meth:`_ingress_stored` without a task of its own; a
        dead letter or a forward to another shard is returned as a coroutine, which the
        consumer runs as a task."""
        s = self.settings
        scheduler = self.scheduler
        ingress = self._ingress
        assert scheduler is not None and self.committer is not None and ingress is not None
        properties = delivered.properties
        headers = properties.headers
        routing_key = delivered.routing_key
        if properties.error:
            decision: Any = Reject(INVALID_HEADERS, f"not decodable: {properties.error}")
        else:
            decision = parse_ingress(
                headers, now_ms(), horizon_ms=s.horizon_ms, default_target=s.default_target
            )
        if isinstance(decision, Reject):
            self.metrics.received.labels("rejected").inc()
            return self.dead_letter_delivery(delivered, ingress, decision.reason, decision.detail)
        if self.shard.sharded and decision.key is None:
            owner, new_id = self._owner(delivered)
            if owner != self.shard.index:
                if not headers or H_FORWARDED_FROM not in headers:
                    return self._forward(delivered, decision.due_ms, owner, new_id)
                # forwarded here by a shard that thinks this one owns it: keep it (never
                # forward twice) and say that the shards disagree on the shard count
                log.error(
                    "forwarded message not owned by this shard: check SHARD_COUNT on every shard",
                    extra={"owner": owner, "shard": self.shard.index},
                )
        mid = self._next_mid
        self._next_mid += 1
        props = props_dict(properties)
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
            routing_key=routing_key,
            key=key,
            message_id=message_id,
            props=_json(props),
            headers=encode_headers(strip_control_headers(headers)),
            body=delivered.body,
        )
        self._journal.append(op)
        self._stored().add_done_callback(
            functools.partial(self._ingress_stored, delivered, op, replace)
        )
        return None

    def _ingress_stored(
        self,
        delivered: Delivery,
        op: Insert,
        replace: KeyDelete | None,
        stored: asyncio.Future[None],
    ) -> None:
        """The commit that holds ``op`` is done (or failed: the delivery goes back)."""
        ingress = self._ingress
        assert ingress is not None
        error = None if stored.cancelled() else stored.exception()
        if stored.cancelled() or error is not None:
            log.error(
                "ingress commit failed; the message goes back to its queue",
                extra={"error": repr(error) if error else "cancelled"},
            )
            ingress.nack(delivered, requeue=True)
            return
        if op.in_window:
            self._admit(op.mid, op.due_ms, op.topic, op.key)
            self._kick()
        if replace is not None and replace.deleted:
            self.metrics.replaced.inc(replace.deleted)
        self._accepted.inc()
        ingress.ack(delivered)

    def _stored(self) -> asyncio.Future[None]:
        """A future resolved once everything journaled so far is committed.

        Deliveries arriving within ``INGRESS_COMMIT_LINGER_MS`` share one barrier (and one
        commit): far fewer futures and writer-thread round trips than one per delivery.
        """
        fut = self._linger
        if fut is None:
            fut = self._linger = self._loop.create_future()
            self._loop.call_later(self.settings.ingress_commit_linger_ms / 1000, self._seal, fut)
        return fut

    def _seal(self, fut: asyncio.Future[None]) -> None:
        if self._linger is fut:
            self._linger = None
        assert self.committer is not None
        barrier = self.committer.barrier()  # covers everything journaled before now

        def done(b: asyncio.Future[None]) -> None:
            if fut.done():
                return
            if b.cancelled():
                fut.cancel()
            elif b.exception() is not None:
                fut.set_exception(b.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(None)

        barrier.add_done_callback(done)

    def _carried(self, delivered: Delivery, headers: dict[str, Any]) -> Properties:
        """The delivery's properties with other headers, minus a ``user_id`` that is not the
        worker's (the broker would close the channel; see ``lanes.carried_properties``)."""
        props = delivered.properties.copy(headers=headers)
        if props.user_id is not None and props.user_id != self._user:
            props.user_id = None
        return props

    async def dead_letter_delivery(
        self, delivered: Delivery, consumer: Consumer, reason: str, detail: str
    ) -> None:
        """Dead-letter a consumed message with its reason (confirmed), then acknowledge it;
        requeue it if the dead-letter publish failed."""
        dead_headers = dict(delivered.properties.headers or {})
        dead_headers[H_DEAD_REASON] = reason
        dead_headers[H_DEAD_DETAIL] = detail[:500]
        try:
            await self.publisher.publish(
                self.settings.dead_exchange,
                delivered.routing_key,
                delivered.body,
                self._carried(delivered, dead_headers),
            )
        except PublishFailed as exc:
            log.error(
                "dead-letter publish failed; requeueing",
                extra={"reason": reason, "error": str(exc)},
            )
            await asyncio.sleep(1)
            consumer.nack(delivered)
            return
        self.metrics.dead_letters.labels(reason).inc()
        log.warning("message dead-lettered", extra={"reason": reason, "detail": detail[:200]})
        consumer.ack(delivered)

    # -- scheduling --------------------------------------------------------------------

    def _kick(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _dispatch_loop(self) -> None:
        while self._dispatching:
            try:
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop delivery for good
                log.exception("scheduling loop failed; restarting it")
                await asyncio.sleep(0.1)

    async def _dispatch(self) -> None:
        """Hand due topics to lanes; wake at the next due time or when a lane reports.

        Lanes are started on demand: a light load spread over many topics is sent by few
        lanes (threads of one process share the GIL, and waking many of them for tiny
        batches costs more latency than it saves), and a topic that waited ``LANE_GROW_MS``
        for a lane makes one more lane active, so a hot topic holding a lane cannot make the
        others wait longer than that.
        """
        scheduler = self.scheduler
        assert scheduler is not None
        loop = asyncio.get_running_loop()
        n_lanes = len(self.lanes)
        grow_ms = self.settings.lane_grow_ms
        while self._dispatching:
            now = now_ms()
            for assignment in scheduler.assign(now):
                self._lane_used[assignment.lane] = time.monotonic()
                self._lane_batch[assignment.lane] = len(assignment.entries)
                self.lanes[assignment.lane].submit(assignment)
            nxt = scheduler.next_due_ms()
            wake_at: float | None = None
            if nxt is not None:
                if scheduler.has_idle_lane() or nxt > now:
                    wake_at = nxt
                elif scheduler.active_lanes < n_lanes:
                    # Due topics wait for a lane. Add one once the oldest waited grow_ms while
                    # some lane has held its batch that long (a big batch of a hot topic).
                    # Lanes that are merely busy with short batches would not go faster
                    # with more threads: they share one interpreter.
                    if now - nxt >= grow_ms and self._lane_stuck(grow_ms):
                        self._lanes_wanted_at = mono = time.monotonic()
                        if mono - self._grown_at >= grow_ms / 1000:  # one lane per grow_ms
                            self._grown_at = mono
                            scheduler.set_active_lanes(scheduler.active_lanes + 1)
                            log.debug(
                                "one more sender lane in use",
                                extra={"active": scheduler.active_lanes, "waited_ms": now - nxt},
                            )
                            continue
                    # check again then (or when a lane reports)
                    wake_at = max(nxt, now) + grow_ms
                elif now - nxt >= grow_ms and self._lane_stuck(grow_ms):
                    self._lanes_wanted_at = time.monotonic()
                # else: every lane is busy; a lane's report wakes us
            wake: asyncio.Future[None] = loop.create_future()
            self._wake = wake
            handle = None
            if wake_at is not None:
                delay = wake_at / 1000 - time.time()
                if delay > 0:
                    handle = loop.call_later(delay, _set_done, wake)
                else:
                    wake.set_result(None)
            await wake
            if handle is not None:
                handle.cancel()

    def _lane_stuck(self, ms: float) -> bool:
        """Whether some lane holds a big batch (a topic with a backlog) for ``ms`` already,
        or any batch for ten times that (a slow target)."""
        assert self.scheduler is not None
        now = time.monotonic()
        big = max(1, self.settings.batch // 2)
        for lane in self.scheduler.busy_lanes():
            held = now - self._lane_used[lane]
            if held >= 10 * ms / 1000 or (held >= ms / 1000 and self._lane_batch[lane] >= big):
                return True
        return False

    def _retire_idle_lanes(self) -> None:
        """Use one lane fewer once no topic needed an extra lane for ``LANE_IDLE_S``."""
        scheduler = self.scheduler
        if scheduler is None or scheduler.active_lanes <= 1:
            return
        now = time.monotonic()
        if now - self._lanes_wanted_at >= self.settings.lane_idle_s:
            scheduler.set_active_lanes(scheduler.active_lanes - 1)
            self._lanes_wanted_at = now - self.settings.lane_idle_s / 2  # one step at a time
            log.debug("one sender lane fewer in use", extra={"active": scheduler.active_lanes})

    def _report_from_lane(self, report: LaneReport) -> None:
        """Called on a lane thread."""
        with contextlib.suppress(RuntimeError):  # loop closed: the worker is gone
            self._loop.call_soon_threadsafe(self._on_report, report)

    def _on_report(self, r: LaneReport) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        self._lane_used[r.lane] = time.monotonic()
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
            self._retire_idle_lanes()
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


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _unset(_: Delivery) -> None:
    raise AssertionError("handler set after the consumer is made")
