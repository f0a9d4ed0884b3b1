"""The directed worker: lifecycle and wiring only.

The parts, in the order a message meets them:

- :mod:`~workers.directed.requests` consumes ``directed.requests`` (or its shard queue),
  parses the request (:mod:`~workers.directed.wire`), submits it to the pure core
  (:mod:`~workers.directed.core`) and acknowledges it after the commit;
- :mod:`~workers.directed.pulls` answers the targets' pulls on ``directed.pull`` and over
  HTTP (:mod:`~workers.directed.http_api`): the cursor rules, the long poll, the commit
  before the answer, the reply (:mod:`~workers.directed.replies`);
- :mod:`~workers.directed.control` answers the control queries on ``directed.control``;
  :mod:`~workers.directed.deadletter` refuses what cannot be taken.

What they share (core, groups, store, group commit, content cache) is the
:mod:`~workers.directed.ledger`, whose module describes the order of effects that makes a
``kill -9`` safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

from bridge.amqp import close_channels, declare_dead_letter, declare_exchange
from bridge.amqp.consumer import Consumer, Lease, QueueSpec, cancel_all, drain_all
from bridge.amqp.link import Link
from bridge.amqp.messages import DeadLetters
from bridge.amqp.publisher import Publisher
from bridge.errors import WireError
from bridge.host import WorkerContext
from bridge.ring import RingKeeper, ensure_chx_exchange
from bridge.rpc import RpcClient
from bridge.sharding import CHX_TYPE, Shard, resolve_shard, shard_queue
from workers.directed.config import H_SHARD, DirectedSettings
from workers.directed.control import ControlServer
from workers.directed.http_api import PullApi
from workers.directed.ledger import Ledger
from workers.directed.metrics import DirectedMetrics, top_backlog
from workers.directed.pulls import Pulls
from workers.directed.requests import Requests
from workers.directed.store import DirectedStore

log = logging.getLogger("bridge.directed")


class DirectedWorker:
    name = "directed"
    settings_class = DirectedSettings

    def __init__(self, settings: DirectedSettings | None = None) -> None:
        self.settings = settings or DirectedSettings()
        self.ledger: Ledger | None = None
        self.store: DirectedStore | None = None
        self.pulls: Pulls | None = None
        self.link: Link | None = None
        self.consumers: list[Consumer] = []
        self._consuming = False
        self._housekeeping: asyncio.Task[None] | None = None
        s = self.settings
        self.shard: Shard = resolve_shard(self.name, s.shard_count, s.shard_index)
        self._rpc: RpcClient | None = None
        self._ring: RingKeeper | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        s = self.settings
        self.metrics = metrics = DirectedMetrics(ctx.registry, s)
        store = self.store = DirectedStore(
            ctx.state_dir(self.name), synchronous=s.synchronous, identity=self.shard.identity()
        )
        ledger = self.ledger = await Ledger.restore(store, s, metrics.on_commit)
        ledger.committer.start()
        metrics.watch(ledger.core, ledger.committer, lambda: ledger.cache.bytes)

        broker = ctx.broker
        # Declarations through aio-pika (control plane); per-message traffic on the link.
        self._channel = await broker.channel(confirms=False)
        self._pull_channel = await broker.channel(confirms=False)
        requests_q, pull_q, control_qs = await self._declare_topology(broker)
        if self.shard.sharded:
            assert broker.connection is not None
            self._rpc = await RpcClient(broker.connection, "directed").open()

        link = self.link = Link(broker.url, name=self.name, heartbeat_s=broker.settings.heartbeat_s)
        publisher = Publisher(link, name="dead letters")
        publisher.start_expiry()
        replies = Publisher(link, name="replies", confirms=False)
        dead = DeadLetters(
            publisher,
            s.dead_exchange,
            metrics.dead_letters,
            user=link.endpoint.user,
            logger=log,
            stamp={H_SHARD: self.shard.index} if self.shard.sharded else None,
        )
        # One process owns the request queue (this shard's) and with it every queue below:
        # a second one waits, not ready, until this one goes (bridge.amqp.consumer).
        lease = Lease(link, requests_q.name, hint=self.shard.owner_hint(self.name))
        pulls = self.pulls = Pulls(
            ledger,
            s,
            self.shard,
            replies=replies,
            dead=dead,
            metrics=metrics,
            lease=lease,
            rpc=self._rpc,
            ring=self._ring,
        )
        requests = Requests(
            ledger, s, self.shard, dead=dead, metrics=metrics, wake=pulls.waiters.wake
        )
        control = ControlServer(ledger, s, self.shard, rpc=self._rpc, replies=replies, dead=dead)
        requests.consumer = Consumer(
            link,
            requests_q,
            requests.on_delivery,
            prefetch=s.request_prefetch,
            lease=lease,
            poison=requests.poison,
        )
        # Pulls and queries are idempotent (a lost one is retried with the same cursor), so
        # they are acknowledged on receipt, in batches.
        acked = functools.partial(dead.poison, None)
        self.consumers = [
            requests.consumer,
            Consumer(
                link,
                pull_q,
                pulls.on_delivery,
                prefetch=s.pull_prefetch,
                ack_on_receipt=True,
                lease=lease,
                poison=acked,
            ),
        ]
        for control_q in control_qs:
            self.consumers.append(
                Consumer(
                    link,
                    control_q,
                    control.on_delivery,
                    prefetch=s.pull_prefetch,
                    ack_on_receipt=True,
                    lease=lease,
                    poison=acked,
                )
            )
        for consumer in self.consumers:
            consumer.on_restored = self._consumer_restored
        await link.start()
        self._consuming = True
        if self.shard.sharded:
            log.info(
                "sharded",
                extra={"shard": self.shard.index, "shards": self.shard.count},
            )
        self._housekeeping = asyncio.get_running_loop().create_task(
            ledger.housekeep(s, metrics.expired)
        )

    async def _declare_topology(self, broker: Any) -> tuple[QueueSpec, QueueSpec, list[QueueSpec]]:
        """Declare exchanges and queues; returns the request queue, the pull queue and the
        control queues this process consumes.

        One shard: the shared queues of the README. ``shard_count`` N > 1: every shard gets
        every request on its own queue ``<requests_queue>.shard-<i>`` (and keeps only its own
        targets); pulls go from the pull exchange through the consistent-hash exchange
        ``pull_shards_exchange`` to ``<pull_queue>.shard-<i>``, bound with weight 1 in shard
        order so that bucket i is shard i; status queries on the shared control queue are
        answered by any shard, which asks the others on ``<control_queue>.shard-<i>``."""
        s = self.settings
        shard = self.shard
        await declare_dead_letter(self._channel, s.dead_exchange, s.dead_queue)
        quorum: dict[str, Any] = {"x-queue-type": "quorum"}
        await declare_exchange(self._channel, s.requests_exchange, "fanout")
        requests_name = (
            shard_queue(s.requests_queue, shard.index) if shard.sharded else s.requests_queue
        )
        requests_q = QueueSpec(
            requests_name, arguments=quorum, bindings=((s.requests_exchange, ""),)
        )
        await self._declare(requests_q)

        ch = self._pull_channel
        pull_ex = await declare_exchange(ch, s.pull_exchange, s.pull_exchange_type)
        pull_args: dict[str, Any] = {"x-queue-type": s.pull_queue_type}
        pull_key = "#" if s.pull_exchange_type == "topic" else ""
        pull_q: QueueSpec | None = None
        if not shard.sharded:
            pull_q = QueueSpec(
                s.pull_queue, arguments=pull_args, bindings=((s.pull_exchange, pull_key),)
            )
            await self._declare(pull_q)
        else:
            await ensure_chx_exchange(broker.url, self.name, s.pull_shards_exchange)
            shards_ex = await ch.declare_exchange(s.pull_shards_exchange, CHX_TYPE, durable=True)
            await shards_ex.bind(pull_ex, routing_key=pull_key)
            # unbound: the ring keeper binds them, in shard order (bucket i is shard i)
            for i in range(shard.count):
                q = QueueSpec(shard_queue(s.pull_queue, i), arguments=pull_args)
                await self._declare(q)
                if i == shard.index:
                    pull_q = q
            ring = RingKeeper(
                broker.url,
                s.pull_shards_exchange,
                [shard_queue(s.pull_queue, i) for i in range(shard.count)],
                worker=self.name,
            )
            await ring.repair("start")
            broker.on_reconnect(
                lambda: ring.schedule("broker connection came back", delay_s=1.0, force=True)
            )
            self._ring = ring
        await declare_exchange(ch, s.control_exchange, "fanout")
        control_q = QueueSpec(
            s.control_queue, arguments=quorum, bindings=((s.control_exchange, ""),)
        )
        await self._declare(control_q)
        control_qs = [control_q]
        if shard.sharded:
            own = QueueSpec(shard_queue(s.control_queue, shard.index), arguments=quorum)
            await self._declare(own)
            control_qs.append(own)
        assert pull_q is not None
        return requests_q, pull_q, control_qs

    async def _declare(self, spec: QueueSpec) -> None:
        """Declare and bind a consumed queue as its spec says (the consumer declares it
        again from the same spec if it is deleted under the worker)."""
        queue = await self._pull_channel.declare_queue(
            spec.name, durable=spec.durable, arguments=spec.arguments
        )
        for exchange, routing_key in spec.bindings:
            await queue.bind(exchange, routing_key=routing_key)

    async def stop(self, grace: float) -> None:
        if self.pulls is not None:
            self.pulls.stopping = True
        self._consuming = False
        await cancel_all(self.consumers)
        if self.pulls is not None:  # long polls answer now with what they have
            self.pulls.waiters.wake_all()
        await drain_all(self.consumers, grace - 1)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.pulls is not None:
            # pulls answered from commit callbacks: while the committer still commits
            await self.pulls.drain(max(grace - 1, 1))
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                await self.ledger.committer.close()
        if self._ring is not None:
            await self._ring.close()
        if self._rpc is not None:
            with contextlib.suppress(Exception):
                await self._rpc.close()
        if self.link is not None:
            await self.link.close()
        await close_channels(getattr(self, "_channel", None), getattr(self, "_pull_channel", None))
        if self.store is not None:
            self.store.close()

    def describe(self) -> dict[str, Any]:
        """For the host's ``ready`` line: the queues this process consumes."""
        return {"consumes": ", ".join(c.queue for c in self.consumers)}

    def ready(self) -> tuple[bool, str]:
        if self.ledger is not None and self.ledger.committer.failing:
            return False, f"state commits failing: {self.ledger.committer.failing}"
        if not self._consuming:
            return False, "not consuming"
        if self.link is None or not self.link.ready:
            missing = self.link.not_ready() if self.link is not None else ["link"]
            return False, "; ".join(missing)
        return True, "consuming"

    def _consumer_restored(self, queue: str) -> None:
        self.metrics.consumers_restored.inc()
        if self._ring is not None and queue == shard_queue(
            self.settings.pull_queue, self.shard.index
        ):
            # the re-created binding moved this shard's bucket in the consistent-hash ring
            self._ring.schedule("the pull queue was declared again", force=True)

    def admin(self, view: str) -> Any:
        if self.ledger is None:
            return {"state": "starting"}
        core = self.ledger.core
        if view in ("", "summary"):
            return self.ledger.summary()
        if view == "backlog":
            return dict(top_backlog(core, 100))
        if view.startswith("message/"):
            return core.status(view[len("message/") :])
        return None

    # -- HTTP pull API -------------------------------------------------------------------

    def http_routes(self) -> list[Any]:
        """``POST /directed/v1/targets/{target}/pull`` on the host's HTTP port."""
        return PullApi(
            tokens=self.settings.http_tokens,
            max_body_bytes=self.settings.max_pull_bytes,
            pull=self._http_pull,
            count=self._count_http,
            rate_per_target=self.settings.http_rate_per_target,
            rate_burst=self.settings.http_rate_burst,
        ).routes()

    def _count_http(self, status: int) -> None:
        metrics = getattr(self, "metrics", None)  # None until start()
        if metrics is not None:
            metrics.http_pulls.labels(str(status)).inc()

    async def _http_pull(self, target: str, body: bytes, binary: bool) -> bytes:
        if not self._consuming or self.pulls is None:
            raise WireError(
                "unavailable", "the worker is not consuming (starting or stopping); retry later"
            )
        return await self.pulls.http_pull(target, body, binary)
