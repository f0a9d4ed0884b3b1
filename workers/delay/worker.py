"""The delay worker: lifecycle and wiring only.

The parts, in the order a delayed message meets them:

- :mod:`~workers.delay.ingress` consumes ``delay.in`` (or its shard queue), parses the
  headers (:mod:`~workers.delay.wire`) and journals the message in the
  :mod:`~workers.delay.ledger` (store, group commit, in-memory window);
- :mod:`~workers.delay.dispatch` hands due topics to sender lanes (decisions of the pure
  :mod:`~workers.delay.core`) and deletes what the lanes confirmed;
- :mod:`~workers.delay.lanes` publish into the target exchanges, each lane a task of the
  worker's event loop with its own connection;
- :mod:`~workers.delay.control` answers the control RPC; :mod:`~workers.delay.deadletter`
  refuses what cannot be scheduled.

The order of effects that makes a ``kill -9`` safe is described in the ledger's module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
import time
from typing import Any

from bridge.amqp import (
    DELAYED_MESSAGE_TYPE,
    check_exchanges,
    declare_dead_letter,
    declare_exchange,
    declare_quorum_queue,
)
from bridge.amqp.consumer import Consumer, Lease, QueueSpec, cancel_all, drain_all
from bridge.amqp.frames import Delivery
from bridge.amqp.link import Link
from bridge.amqp.messages import DeadLetters
from bridge.amqp.publisher import Publisher
from bridge.host import WorkerContext
from bridge.ring import RingKeeper, ensure_chx_exchange
from bridge.sharding import CHX_TYPE, Shard, resolve_shard, shard_queue
from bridge.store import GroupCommitter
from workers.delay.config import DelaySettings
from workers.delay.control import ControlServer
from workers.delay.core import Scheduler
from workers.delay.dispatch import Dispatcher
from workers.delay.ingress import Ingress
from workers.delay.lanes import Lane, start_lanes
from workers.delay.ledger import Ledger
from workers.delay.metrics import DelayMetrics
from workers.delay.shards import DelayShards, chx_arguments
from workers.delay.store import DelayStore, Op
from workers.delay.targets import Verified

log = logging.getLogger("bridge.delay")

# What to do when a name the worker needs is a delayed-message plugin exchange.
MIGRATION_HINTS = {
    DELAYED_MESSAGE_TYPE: "It is the delayed-message plugin's exchange: keep it and give the "
    "worker its own (the default delay.in; producers add x-target-exchange), or take over "
    "its name with `rabbitmq-bridge delay migrate <exchange>` (docs/delay.md, 'Migrating "
    "from rabbitmq-delayed-message-exchange')."
}


class DelayWorker:
    name = "delay"
    settings_class = DelaySettings

    def __init__(self, settings: DelaySettings | None = None) -> None:
        self.settings = settings or DelaySettings()
        self.ledger: Ledger | None = None
        self.store: DelayStore | None = None
        self.dispatcher: Dispatcher | None = None
        self.lanes: list[Lane] = []
        self.link: Link | None = None
        self.consumers: list[Consumer] = []
        self._consuming = False
        self._lanes_stop = asyncio.Event()
        self.started_s: float | None = None
        s = self.settings
        self.shard: Shard = resolve_shard(self.name, s.shard_count, s.shard_index)
        self.shards: DelayShards | None = None
        self._ring: RingKeeper | None = None
        self._in_queue = (
            shard_queue(s.in_queue, self.shard.index) if self.shard.sharded else s.in_queue
        )

    @property
    def scheduler(self) -> Scheduler | None:
        return self.ledger.scheduler if self.ledger is not None else None

    @property
    def committer(self) -> GroupCommitter[Op] | None:
        return self.ledger.committer if self.ledger is not None else None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        s = self.settings
        started = time.perf_counter()
        # Before anything is opened or declared: a name taken by another kind of exchange (the
        # delayed-message plugin's) is one line saying what to do, not a half-declared topology.
        await check_exchanges(
            ctx.broker.url,
            self.exchanges(),
            MIGRATION_HINTS,
            arguments={s.shards_exchange: chx_arguments()},
        )
        if s.switch_interval_ms > 0:
            sys.setswitchinterval(s.switch_interval_ms / 1000)
        if s.gc_gen2_threshold > 0:
            # A full collection stops every lane; the window's entries are freed by reference
            # counting, so frequent full passes only cost lateness (see the setting).
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, s.gc_gen2_threshold)
        self.metrics = metrics = DelayMetrics(ctx.registry, s)
        store = self.store = DelayStore(
            ctx.state_dir(self.name),
            synchronous=s.synchronous,
            cache_mb=s.cache_mb,
            identity=self.shard.identity(),
        )
        boot = await store.db.run(store.startup)
        ledger = self.ledger = Ledger(
            store,
            s,
            next_mid=boot.next_mid,
            topic_counts=boot.topic_counts,
            on_commit_seconds=metrics.commit_seconds.observe,
        )
        metrics.watch(ledger)
        ledger.committer.start()
        dispatcher = self.dispatcher = Dispatcher(ledger, s, metrics)
        await dispatcher.load_step()

        broker = ctx.broker
        # Declarations through aio-pika (control plane); per-message traffic on the link.
        self._channel = await broker.channel(confirms=False)
        await declare_dead_letter(self._channel, s.dead_exchange, s.dead_queue)
        ingress_q, control_qs = await self._declare_topology(broker)
        link = self.link = Link(broker.url, name=self.name, heartbeat_s=broker.settings.heartbeat_s)
        publisher = Publisher(link, name="dead letters and forwards")
        publisher.start_expiry()
        dead = DeadLetters(
            publisher,
            s.dead_exchange,
            metrics.dead_letters,
            user=link.endpoint.user,
            logger=log,
        )
        control = ControlServer(
            ledger,
            s,
            shards=self.shards,
            replies=Publisher(link, name="replies", confirms=False),
            dead=dead,
            cancelled=metrics.cancelled,
        )
        ingress = Ingress(
            ledger,
            s,
            self.shard,
            forwards=publisher,
            dead=dead,
            received=metrics.received,
            replaced=metrics.replaced,
            kick=dispatcher.kick,
            misrouted=self._ring_out_of_order if self._ring is not None else None,
            broker_version=lambda: link.server_properties.get("version"),
        )

        verified = Verified()
        self.lanes = dispatcher.lanes = [
            Lane(
                i,
                host=ctx.settings,
                settings=s,
                db_path=store.path,
                report=dispatcher.report_from_lane,
                observe_lateness=metrics.observe_lateness,
                add_busy=metrics.add_busy,
                verified=verified,
            )
            for i in range(s.lanes)
        ]
        await start_lanes(self.lanes, self._lanes_stop)
        dispatcher.start()
        # One process owns the ingress queue (this shard's) and with it the control queues:
        # a second one waits, not ready, until this one goes (bridge.amqp.consumer).
        lease = self.lease = Lease(link, ingress_q.name, hint=self.shard.owner_hint(self.name))
        ingress.consumer = Consumer(
            link, ingress_q, ingress.on_delivery, prefetch=s.prefetch, lease=lease
        )
        ingress.consumer.on_restored = self._ingress_restored
        self.consumers = [ingress.consumer]
        for control_q in control_qs:
            consumer = Consumer(link, control_q, _unset, prefetch=s.control_prefetch, lease=lease)
            consumer.handler = functools.partial(control.handle, consumer=consumer)
            self.consumers.append(consumer)
        for consumer in self.consumers:
            consumer.poison = functools.partial(dead.poison, consumer)
        await link.start()
        self._consuming = True
        self.started_s = time.perf_counter() - started
        gc.freeze()  # what start-up built (modules, the first window) stays: skip it in passes
        log.info(
            "delay worker started",
            extra={
                "stored": boot.pending,
                "window": len(ledger.scheduler),
                "lanes": s.lanes,
                "seconds": round(self.started_s, 3),
            },
        )

    def exchanges(self) -> list[tuple[str, str, str]]:
        """(name, type, setting) of the exchanges the worker declares, checked first."""
        s = self.settings
        wanted = [
            (s.in_exchange, "topic", "BRIDGE_DELAY__IN_EXCHANGE"),
            (s.dead_exchange, "fanout", "BRIDGE_DELAY__DEAD_EXCHANGE"),
            (s.control_exchange, "fanout", "BRIDGE_DELAY__CONTROL_EXCHANGE"),
        ]
        if self.shard.sharded:  # hashing x-delay-key (chx_arguments)
            wanted.append((s.shards_exchange, CHX_TYPE, "BRIDGE_DELAY__SHARDS_EXCHANGE"))
        return wanted

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
            # unbound: the ring keeper binds them, in shard order (bucket i is shard i)
            for i in range(self.shard.count):
                await declare_quorum_queue(ch, shard_queue(s.in_queue, i))
            ingress = QueueSpec(self._in_queue, arguments=quorum)
            ring = RingKeeper(
                broker.url,
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

    def _ring_out_of_order(self) -> None:
        if self._ring is not None:  # rate-limited: one repair per interval however many
            self._ring.schedule("a keyed message reached a shard that does not own it")

    def _ingress_restored(self, queue: str) -> None:
        if self._ring is not None:  # a re-created binding moves this shard in the ring
            self._ring.schedule("the ingress queue was declared again", force=True)
        self.metrics.consumer_restored.inc()

    async def stop(self, grace: float) -> None:
        deadline = time.monotonic() + max(grace - 1, 0.5)
        self._consuming = False
        await cancel_all(self.consumers)
        await drain_all(self.consumers, deadline - time.monotonic())
        if self.ledger is not None:
            # deliveries stored and not acknowledged yet: their commit now, and their acks
            # written before the link closes (else the broker delivers them again)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ledger.commit_now(), deadline - time.monotonic())
            for consumer in self.consumers:
                consumer.flush()
        if self.dispatcher is not None:
            # lanes finish the batch in hand (its confirms included); their reports journal
            # the deletes
            await self.dispatcher.stop(deadline)
        self._lanes_stop.set()
        for lane in self.lanes:
            lane.request_stop()
        for lane in self.lanes:
            await lane.join(max(deadline - time.monotonic(), 0.5))
        if self.dispatcher is not None:
            self.dispatcher.dead_log.close()
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                await self.ledger.close()
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

    def describe(self) -> dict[str, Any]:
        """For the host's ``ready`` line: the queues this process consumes."""
        return {"consumes": ", ".join(c.queue for c in self.consumers)}

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
        ledger = self.ledger
        if ledger is None or self.store is None:
            return {"state": "starting"}
        if view in ("", "summary"):
            committer = ledger.committer
            return {
                "stored": ledger.stored_total,
                "window": len(ledger.scheduler),
                "window_end_ms": self.store.window_end[0],
                "busy_lanes": sorted(ledger.scheduler.busy_lanes()),
                "active_lanes": ledger.scheduler.active_lanes,
                "lanes": [
                    {"lane": lane.index, "connected": lane.connected, "batches": lane.batches}
                    for lane in self.lanes
                ],
                "commits": committer.commits,
                "commit_failing": committer.failing,
                "store_bytes": self.store.size_bytes(),
                "start_seconds": self.started_s,
            }
        if view == "topics":
            return dict(ledger.top_topics(100))
        return None


def _unset(_: Delivery) -> None:
    raise AssertionError("handler set after the consumer is made")
