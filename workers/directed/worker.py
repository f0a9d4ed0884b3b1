"""AMQP adapter of the directed worker: consumes requests, pulls and control queries,
drives the pure core, commits its journal, replies.

Order of effects, which is what makes a ``kill -9`` safe:

- a request is acknowledged to the broker only after the commit that holds its effect;
  a redelivered request is recognised by its ``message_id`` (or content digest) and not
  applied twice;
- a pull is answered only after the commit that holds its buffer/acknowledgement, so a
  target never sees a record id that a restart could forget.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from bridge.amqp import close_channels, declare_dead_letter, declare_exchange
from bridge.amqp.consumer import (
    H_DEAD_EXCEPTION,
    Consumer,
    Lease,
    Poison,
    QueueSpec,
    cancel_all,
    drain_all,
)
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.link import Link
from bridge.amqp.messages import dead_letter_properties, reply
from bridge.amqp.publisher import Publisher
from bridge.errors import NoAnswer, PublishFailed
from bridge.host import WorkerContext
from bridge.ring import RingKeeper, ensure_chx_exchange
from bridge.rpc import RpcClient
from bridge.sharding import CHX_TYPE, Shard, resolve_shard, shard_queue
from bridge.store import GroupCommitter
from workers.directed import wire
from workers.directed.config import (
    H_DEAD_DETAIL,
    H_DEAD_REASON,
    H_FORWARDED_FROM,
    H_ORIGINAL_ROUTING_KEY,
    H_SHARD,
    DirectedSettings,
)
from workers.directed.groups import GroupError, Groups
from workers.directed.http_api import PullApi
from workers.directed.metrics import DirectedMetrics, top_backlog
from workers.directed.model import DeleteContent, DirectedCore, OverflowPolicy, PullResult
from workers.directed.store import Batch, Content, DirectedStore
from workers.directed.waiters import Waiters

log = logging.getLogger("bridge.directed")


def now_ms() -> int:
    return int(time.time() * 1000)


def record_ids() -> Iterator[str]:
    """Record ids unique across restarts: a random per-process prefix and a counter
    (cheaper per pull than uuid4, which makes a getrandom syscall each time)."""
    prefix = os.urandom(6).hex()
    return (f"{prefix}-{n:x}" for n in itertools.count(1))


class ContentCache:
    """Recently stored content, bounded by bytes, so most pulls never read the file."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[int, Content] = OrderedDict()

    def put(self, mid: int, content: Content) -> None:
        size = len(content.body) + 64
        if size > self.max_bytes:
            return
        self._items[mid] = content
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= len(old.body) + 64

    def get(self, mid: int) -> Content | None:
        item = self._items.get(mid)
        if item is not None:
            self._items.move_to_end(mid)
        return item

    def drop(self, mid: int) -> None:
        item = self._items.pop(mid, None)
        if item is not None:
            self.bytes -= len(item.body) + 64


class DirectedWorker:
    name = "directed"
    settings_class = DirectedSettings

    def __init__(self, settings: DirectedSettings | None = None) -> None:
        self.settings = settings or DirectedSettings()
        self.core: DirectedCore | None = None
        self.store: DirectedStore | None = None
        self.committer: GroupCommitter[Batch] | None = None
        self._consuming = False
        self._pending_contents: dict[int, Content] = {}
        self._pending_groups: dict[str, list[str] | None] = {}
        self._cache = ContentCache(self.settings.cache_bytes)
        self._waiters = Waiters()
        self.link: Link | None = None
        self.consumers: list[Consumer] = []
        self._active_pulls = 0  # pull handlers running, long polls included
        self._record_ids = record_ids()
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopping = False
        s = self.settings
        self.shard: Shard = resolve_shard(self.name, s.shard_count, s.shard_index)
        self._rpc: RpcClient | None = None
        self._ring: RingKeeper | None = None
        self._forward_warned = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        s = self.settings
        self.metrics = DirectedMetrics(ctx.registry, s)
        self.store = DirectedStore(
            ctx.state_dir(self.name), synchronous=s.synchronous, identity=self.shard.identity()
        )
        started = time.perf_counter()
        details, queues, buffers = await self.store.db.run(self.store.load)
        gaps = await self.store.db.run(self.store.load_gaps)
        self.groups = Groups(
            await self.store.db.run(self.store.load_groups), max_size=s.max_targets
        )
        self.core = DirectedCore.restore(
            details=details,
            queues=queues,
            buffers=buffers,
            gaps=gaps,
            queue_limit=s.queue_limit,
            overflow=OverflowPolicy(s.overflow),
            max_batch=s.max_batch,
        )
        log.info(
            "state restored",
            extra={
                "messages": len(details),
                "targets": len(queues),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        self.committer = GroupCommitter(
            self.store.db, self._take, self.store.apply, on_commit=self.metrics.on_commit
        )
        self.committer.start()
        self.metrics.watch(self.core, self.committer, lambda: self._cache.bytes)

        broker = ctx.broker
        # Declarations through aio-pika (control plane); per-message traffic on the link.
        self._channel = await broker.channel(confirms=False)
        self._pull_channel = await broker.channel(confirms=False)
        requests_q, pull_q, control_qs = await self._declare_topology(broker)
        if self.shard.sharded:
            assert broker.connection is not None
            self._rpc = await RpcClient(broker.connection, "directed").open()

        link = self.link = Link(broker.url, name=self.name, heartbeat_s=broker.settings.heartbeat_s)
        self.publisher = Publisher(link, name="dead letters")
        self.publisher.start_expiry()
        self._replies = Publisher(link, name="replies", confirms=False)
        # One process owns the request queue (this shard's) and with it every queue below:
        # a second one waits, not ready, until this one goes (bridge.amqp.consumer).
        lease = self.lease = Lease(link, requests_q.name, hint=self.shard.owner_hint(self.name))
        self.consumers = [
            Consumer(
                link,
                requests_q,
                self._on_request,
                prefetch=s.request_prefetch,
                lease=lease,
                poison=self._poison(acked=False),
            )
        ]
        # Pulls and queries are idempotent (a lost one is retried with the same cursor), so
        # they are acknowledged on receipt, in batches.
        self.consumers.append(
            Consumer(
                link,
                pull_q,
                self._on_pull,
                prefetch=s.pull_prefetch,
                ack_on_receipt=True,
                lease=lease,
                poison=self._poison(acked=True),
            )
        )
        for control_q in control_qs:
            self.consumers.append(
                Consumer(
                    link,
                    control_q,
                    self._on_control,
                    prefetch=s.pull_prefetch,
                    ack_on_receipt=True,
                    lease=lease,
                    poison=self._poison(acked=True),
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
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())

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
            for i in range(shard.count):  # in shard order: bucket i is shard i
                q = QueueSpec(
                    shard_queue(s.pull_queue, i),
                    arguments=pull_args,
                    bindings=((s.pull_shards_exchange, "1"),),
                )
                await self._declare(q)
                if i == shard.index:
                    pull_q = q
            ring = RingKeeper(
                lambda: broker.channel(confirms=False),
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
        self._stopping = True
        self._consuming = False
        await cancel_all(self.consumers)
        self._waiters.wake_all()  # long polls answer now with what they have
        await drain_all(self.consumers, grace - 1)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.committer is not None:
            with contextlib.suppress(Exception):
                await self.committer.close()
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
        if self.committer is not None and self.committer.failing:
            return False, f"state commits failing: {self.committer.failing}"
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
        core = self.core
        if core is None:
            return {"state": "starting"}
        if view in ("", "summary"):
            return {
                "messages": core.alive_messages,
                "targets": core.target_count,
                "commits": self.committer.commits if self.committer else 0,
                "commit_failing": self.committer.failing if self.committer else None,
                "cache_bytes": self._cache.bytes,
            }
        if view == "backlog":
            return dict(top_backlog(core, 100))
        if view.startswith("message/"):
            return core.status(view[len("message/") :])
        return None

    # -- journal -----------------------------------------------------------------------

    def _take(self) -> list[Batch]:
        assert self.core is not None
        ops = self.core.take_journal()
        if not ops and not self._pending_contents and not self._pending_groups:
            return []
        contents, self._pending_contents = self._pending_contents, {}
        groups, self._pending_groups = self._pending_groups, {}
        for op in ops:
            if isinstance(op, DeleteContent):
                self._cache.drop(op.mid)
        return [Batch(ops=ops, contents=contents, groups=groups)]

    async def _committed(self) -> None:
        assert self.committer is not None
        await self.committer.barrier()

    # -- requests ----------------------------------------------------------------------

    async def _on_request(self, message: Delivery) -> None:
        assert self.core is not None
        consumer = self.consumers[0]
        try:
            if message.properties.error:
                raise wire.WireError("invalid_headers", message.properties.error)
            req = wire.parse_request(
                body=message.body,
                headers=message.headers,
                content_type=message.content_type,
                message_id=message.message_id,
                settings=self.settings,
            )
            targets = req.targets
            if req.groups:  # resolved now, once: a later change does not touch this request
                try:
                    targets = self.groups.resolve(req.targets, req.groups)
                except GroupError as exc:
                    raise wire.WireError(exc.code, exc.message) from None
        except wire.WireError as exc:
            if self.shard.index != 0:
                # Every shard sees every request and finds the same fault: shard 0 alone
                # dead-letters it, so it is reported once.
                self.metrics.requests.labels("rejected_by_shard_0").inc()
                consumer.ack(message)
                return
            self.metrics.requests.labels("rejected").inc()
            await self._dead_letter(message, exc.code, exc.message)
            return
        if self.shard.sharded:
            targets = [t for t in targets if self.shard.owns(t)]
            if not targets:
                self.metrics.requests.labels("no_local_targets").inc()
                consumer.ack(message)
                return
        now = now_ms()
        self.core.expire(now)  # content past its TTL must not count toward a full queue
        result = self.core.submit(req.message_id, targets, now, req.ttl_ms)
        if result.status == "rejected":
            self.metrics.requests.labels("rejected").inc()
            reason = result.reason or "rejected"
            where = (
                f" by shard {self.shard.index} of {self.shard.count} (its {len(targets)} "
                "targets; the other shards decide for theirs)"
                if self.shard.sharded
                else ""
            )
            await self._dead_letter(
                message, reason, f"request {req.message_id} refused{where}: {reason}"
            )
            return
        if result.status == "accepted":
            assert result.mid is not None
            content = Content(
                body=req.body,
                props={
                    "content_type": req.content_type,
                    "content_encoding": message.content_encoding,
                    "headers": wire.json_safe(req.headers),
                },
            )
            self._pending_contents[result.mid] = content
            self._cache.put(result.mid, content)
            self.metrics.overflow_drops.inc(len(result.dropped))
            self._waiters.wake(targets)
        await self._committed()
        self.metrics.requests.labels(result.status).inc()
        consumer.ack(message)

    def _poison(self, *, acked: bool) -> Poison:
        """What a consumer does with a message it gave up on (bridge.amqp.consumer)."""

        async def poison(
            message: Delivery, reason: str, detail: str, exception: str | None
        ) -> None:
            if not acked:
                self.metrics.requests.labels("rejected").inc()
            extra: dict[str, object] | None = {H_DEAD_EXCEPTION: exception} if exception else None
            await self._dead_letter(message, reason, detail, acked=acked, extra=extra)

        return poison

    async def _dead_letter(
        self,
        message: Delivery,
        reason: str,
        detail: str,
        *,
        acked: bool = False,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Publish to the dead-letter exchange with the reason, then acknowledge (unless the
        delivery was acknowledged on receipt)."""
        extra = dict(extra or {})
        if self.shard.sharded:
            extra[H_SHARD] = self.shard.index
        props = dead_letter_properties(
            message,
            reason,
            detail,
            reason_header=H_DEAD_REASON,
            detail_header=H_DEAD_DETAIL,
            extra=extra or None,
        )
        consumer = self.consumers[0]
        try:
            await self.publisher.publish(
                self.settings.dead_exchange, message.routing_key, message.body, props
            )
        except PublishFailed as exc:
            log.error(
                "dead-letter publish failed; requeueing",
                extra={"reason": reason, "error": str(exc)},
            )
            if not acked:
                await asyncio.sleep(1)
                consumer.nack(message, requeue=True)
            return
        self.metrics.dead_letters.labels(reason).inc()
        log.warning("message dead-lettered", extra={"reason": reason, "detail": detail[:200]})
        if not acked:
            consumer.ack(message)

    # -- pulls -------------------------------------------------------------------------

    def _reply(self, message: Delivery, body: bytes) -> None:
        reply(self._replies, message, body)

    async def _on_pull(self, message: Delivery) -> None:
        self._active_pulls += 1
        try:
            await self._pull(message)
        finally:
            self._active_pulls -= 1

    async def _pull(self, message: Delivery) -> None:
        started = time.perf_counter()
        if not message.reply_to:
            await self._dead_letter(
                message, "missing_reply_to", "a pull needs reply_to to be answered", acked=True
            )
            return
        forwarded = self.shard.sharded and H_FORWARDED_FROM in (message.headers or {})
        routing_key: str | None = message.routing_key
        if forwarded:
            original = (message.headers or {}).get(H_ORIGINAL_ROUTING_KEY)
            routing_key = original if isinstance(original, str) else None
        try:
            self._admit()
            pull = wire.parse_pull(message.body, routing_key, self.settings)
        except wire.WireError as exc:
            self.metrics.pull_kind["error"].inc()
            self._reply(message, wire.encode_error(exc.code, exc.message))
            return
        if self.shard.sharded and not self.shard.owns(pull.topic):
            await self._forward_pull(message, pull.topic, forwarded)
            return
        body = await self._serve_pull(pull)
        self._reply(message, body)
        self.metrics.pull_seconds.observe(time.perf_counter() - started)

    def _admit(self) -> None:
        """Refuse a pull the worker cannot take now (a :class:`wire.WireError`), before it
        touches the core, so the target retries with the same record id."""
        if self._active_pulls > self.settings.max_inflight_pulls:
            # AMQP pulls are acknowledged on receipt, so prefetch no longer bounds them:
            # refuse visibly instead of piling up long polls without limit.
            raise wire.WireError("overloaded", "too many pulls in progress; retry later")
        if self.committer is not None and self.committer.failing:
            # The reply would have to wait for a commit that cannot happen: say so now.
            raise wire.WireError(
                "unavailable", "the worker cannot commit its state right now; retry later"
            )

    async def _forward_pull(self, message: Delivery, topic: str, forwarded: bool) -> None:
        """A pull for another shard's target: hand it to the owner's queue (the ring of the
        consistent-hash exchange no longer matches shard order; see bridge.sharding)."""
        owner = self.shard.owner(topic)
        if forwarded:  # forwarded twice means the shards disagree on the shard count
            self.metrics.pull_kind["error"].inc()
            self._reply(
                message,
                wire.encode_error(
                    "wrong_shard",
                    f"shard {self.shard.index} of {self.shard.count} got a forwarded pull for "
                    f"{topic!r}, which it does not own: shards disagree on SHARD_COUNT",
                ),
            )
            return
        if not self._forward_warned:
            self._forward_warned = True
            log.warning(
                "pull forwarded to its owning shard: the consistent-hash exchange's bucket order "
                "no longer matches shard order (broker restart or bindings re-created); pulls "
                "still reach their shard, with one extra hop, and the ring is being put back in "
                "order (docs/operations.md)",
                extra={"exchange": self.settings.pull_shards_exchange, "owner": owner},
            )
        self.metrics.pulls_forwarded.inc()
        if self._ring is not None:
            self._ring.schedule("a pull reached a shard that does not own its target")
        headers = dict(message.headers or {})
        headers[H_FORWARDED_FROM] = self.shard.index
        headers[H_ORIGINAL_ROUTING_KEY] = message.routing_key or ""
        # not confirmed: a pull lost on the way is retried by the puller, as a lost reply
        self._replies.publish(
            "",
            shard_queue(self.settings.pull_queue, owner),
            message.body,
            Properties(
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                content_type=message.content_type,
                headers=headers,
                delivery_mode=1,
            ),
            mandatory=False,
        ).add_done_callback(_forward_done)

    def _pull_core(self, topic: str, record_id: str | None, max_n: int) -> PullResult:
        assert self.core is not None
        result = self.core.pull(topic, record_id, max_n, now_ms(), next(self._record_ids))
        self.metrics.pull_kind[result.kind].inc()
        if result.kind == "resend":
            self.metrics.redeliveries.inc()
        if result.acked:
            self.metrics.acks.inc(len(result.acked))
        return result

    async def _serve_pull(self, pull: wire.Pull, *, binary: bool = False) -> bytes:
        """The reply to a pull: JSON, or with ``binary`` the length-prefixed form
        (:func:`wire.encode_binary_reply`) whose contents are not base64-encoded."""
        result = self._pull_core(pull.topic, pull.record_id, pull.max)
        if result.record_id is None and pull.wait_ms > 0 and pull.max > 0 and not self._stopping:
            await self._committed()  # the acknowledgement is durable before we wait
            assert self.core is not None
            # a message accepted during that commit found no waiter to wake: no wait then
            if self.core.backlog(pull.topic) == 0:
                await self._waiters.wait(pull.topic, pull.wait_ms)
            result = self._pull_core(pull.topic, None, pull.max)
        await self._committed()
        messages = await self._messages(result.mids)
        encode = wire.encode_binary_reply if binary else wire.encode_reply
        return encode(
            pull.topic,
            result.record_id,
            result.redelivered,
            messages,
            missed=result.missed,
            missed_ids=result.missed_ids,
            recalled_ids=result.recalled_ids,
        )

    async def _messages(self, mids: tuple[int, ...]) -> list[wire.Message]:
        assert self.core is not None and self.store is not None
        if not mids:
            return []
        found: dict[int, Content] = {}
        missing = []
        for mid in mids:
            content = self._cache.get(mid)
            if content is None:
                missing.append(mid)
            else:
                found[mid] = content
        if missing:
            loaded = await self.store.db.run(self.store.contents, missing)
            for mid, content in loaded.items():
                self._cache.put(mid, content)
            found.update(loaded)
        out = []
        for mid in mids:
            message_id = self.core.alive_message_id(mid)
            content = found.get(mid)
            if message_id is None or content is None:
                continue  # expired or deleted between the decision and the read
            out.append(wire.Message(message_id, content.body, content.props))
        return out

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
        """The HTTP pull: the same path as an AMQP pull (admission, parsing, the cursor
        rules, the long poll, the commit before the answer); a pull for another shard's
        target is relayed to it through the pull exchange and its answer returned."""
        if not self._consuming or self.core is None:
            raise wire.WireError(
                "unavailable", "the worker is not consuming (starting or stopping); retry later"
            )
        if not self.lease.held.is_set():  # its store is not the one the targets use
            raise wire.WireError(
                "unavailable",
                f"another process owns {self.lease.owned}; this one answers no pulls until it "
                "takes over; retry later (or at the owner)",
            )
        started = time.perf_counter()
        self._active_pulls += 1
        try:
            try:
                self._admit()
                pull = wire.parse_http_pull(body, target, self.settings)
            except wire.WireError:
                self.metrics.pull_kind["error"].inc()
                raise
            if self.shard.sharded and not self.shard.owns(pull.topic):
                relayed = await self._relay_pull(pull)
                return wire.json_reply_to_binary(relayed) if binary else wire.json_dumps(relayed)
            reply = await self._serve_pull(pull, binary=binary)
            self.metrics.pull_seconds.observe(time.perf_counter() - started)
            return reply
        finally:
            self._active_pulls -= 1

    async def _relay_pull(self, pull: wire.Pull) -> dict[str, Any]:
        """An HTTP pull for another shard's target: published to the pull exchange under the
        target's name, which routes it to the owning shard (forwarded on if the ring is out
        of order), and answered with that shard's reply."""
        assert self._rpc is not None
        owner = self.shard.owner(pull.topic)
        doc = {"topic": pull.topic, "record_id": pull.record_id, "max": pull.max}
        doc["wait_ms"] = pull.wait_ms
        timeout = pull.wait_ms / 1000 + self.settings.shard_query_timeout_s
        try:
            answer = await self._rpc.call(self.settings.pull_exchange, pull.topic, doc, timeout)
        except NoAnswer:
            raise wire.WireError(
                "unavailable",
                f"shard {owner}, which owns {pull.topic!r}, did not answer within {timeout:g} s; "
                "retry with the same record_id",
            ) from None
        self.metrics.http_relayed.inc()
        error = answer.get("error")
        if isinstance(error, dict):
            raise wire.WireError(str(error.get("code")), str(error.get("message")))
        return answer

    # -- control -----------------------------------------------------------------------

    async def _on_control(self, message: Delivery) -> None:
        assert self.core is not None
        if not message.reply_to:
            await self._dead_letter(
                message, "missing_reply_to", "a control query needs reply_to", acked=True
            )
            return
        try:
            doc = wire.parse_json_object(message.body, self.settings)
            op = doc.get("op")
            local = doc.get("local") is True or not self.shard.sharded
            if op == "status" and "target" in doc:
                body = wire.json_dumps({"status": await self._target_status(doc, local)})
            elif op == "status":
                message_id = doc.get("message_id")
                if not isinstance(message_id, str):
                    raise wire.WireError("invalid_query", "'message_id' (string) is required")
                own = self.core.status(message_id)
                status = dict(own) if own is not None else None
                if not local:
                    status = await self._gather_status(doc, status)
                if status is None:
                    raise wire.WireError(
                        "not_found", f"no message {message_id!r} (never seen, or purged)"
                    )
                body = wire.json_dumps({"status": status})
            elif op == "recall":
                message_id = doc.get("message_id")
                if not isinstance(message_id, str) or not 0 < len(message_id) <= 255:
                    raise wire.WireError("invalid_query", "'message_id' (string) is required")
                own = self.core.recall(message_id, now_ms())
                await self._committed()  # the recall is durable before it is confirmed
                status = dict(own) if own is not None else None
                if not local:
                    status = await self._gather_status(doc, status)
                if status is None:
                    raise wire.WireError(
                        "not_found", f"no message {message_id!r} (never seen, or purged)"
                    )
                body = wire.json_dumps({"status": status})
            elif op in wire.GROUP_OPS:
                body = wire.json_dumps({"group": await self._group(doc, local)})
            elif op == "pending_targets":
                body = wire.json_dumps({"pending_targets": await self._pending_targets(doc, local)})
            elif op == "stats":
                stats = self.admin("summary")
                if not local:
                    stats = await self._gather_stats(doc, stats)
                body = wire.json_dumps({"stats": stats})
            else:
                raise wire.WireError(
                    "unknown_op",
                    "op must be 'status', 'recall', 'pending_targets', 'stats' or "
                    + ", ".join(repr(o) for o in wire.GROUP_OPS),
                )
        except wire.WireError as exc:
            body = wire.encode_error(exc.code, exc.message)
        self._reply(message, body)

    async def _target_status(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        """What one target has: backlog, unacknowledged batch, the gap it has not
        acknowledged; on sharded workers from the shard that owns it."""
        assert self.core is not None
        target = doc.get("target")
        if not isinstance(target, str) or not target:
            raise wire.WireError("invalid_query", "'target' must be a non-empty string")
        if local or self.shard.owns(target):
            return self.core.target_status(target)
        assert self._rpc is not None
        owner = self.shard.owner(target)
        queue = shard_queue(self.settings.control_queue, owner)
        timeout = self.settings.shard_query_timeout_s
        try:
            answer = await self._rpc.call("", queue, {**doc, "local": True}, timeout)
        except NoAnswer:
            raise wire.WireError(
                "shards_unavailable",
                f"shard {owner}, which owns {target!r}, did not answer in time: retry later",
            ) from None
        status = answer.get("status")
        if not isinstance(status, dict):
            raise wire.WireError("shards_unavailable", f"shard {owner} answered {answer!r}")
        return status

    async def _group(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        """A group change, committed before it is answered and made on every shard (each
        keeps the membership it resolves requests with), or a group's members."""
        change = wire.parse_group_change(doc, self.settings)
        if change.op == "group_get":
            members = self.groups.get(change.group)
            if members is None:
                raise wire.WireError("not_found", f"no target group {change.group!r}")
            return {"group": change.group, "targets": members}
        apply = {"group_set": self.groups.set, "group_add": self.groups.add}
        try:
            members = apply.get(change.op, self.groups.remove)(change.group, change.targets)
        except GroupError as exc:
            raise wire.WireError(exc.code, exc.message) from None
        self._pending_groups[change.group] = members
        await self._committed()
        if not local:
            _, missing = await self._ask_shards(doc)
            if missing:
                raise wire.WireError(
                    "shards_unavailable",
                    f"the change is made on the shards that answered, not on shards {missing}: "
                    "repeat it (changes are idempotent)",
                )
        return {"group": change.group, "targets": members or []}

    async def _pending_targets(self, doc: dict[str, Any], local: bool) -> dict[str, Any]:
        """One page of the targets that have not acknowledged a message, in name order; on
        sharded workers every shard's page merged."""
        assert self.core is not None
        query = wire.parse_pending_targets(doc)
        found = self.core.pending_targets(query.message_id, query.cursor, query.limit)
        names, more = found if found is not None else ([], False)
        known = found is not None
        if not local:
            replies, missing = await self._ask_shards(doc)
            if missing:
                raise wire.WireError(
                    "shards_unavailable",
                    f"shards {missing} did not answer in time: the page would be incomplete; "
                    "retry later",
                )
            for reply in replies:
                part = reply.get("pending_targets")
                if isinstance(part, dict):
                    known = True
                    names += part.get("targets", [])
                    more = more or part.get("cursor") is not None
            names.sort()
            if len(names) > query.limit:
                names, more = names[: query.limit], True
        if not known:
            raise wire.WireError(
                "not_found", f"no message {query.message_id!r} (never seen, or purged)"
            )
        return {
            "message_id": query.message_id,
            "targets": names,
            "cursor": names[-1] if more and names else None,
        }

    async def _ask_shards(self, doc: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """Ask every other shard the same query (``local``); their replies and who was silent."""
        assert self._rpc is not None
        others = [i for i in range(self.shard.count) if i != self.shard.index]
        query = {**doc, "local": True}
        timeout = self.settings.shard_query_timeout_s
        answers = await asyncio.gather(
            *(
                self._rpc.call("", shard_queue(self.settings.control_queue, i), query, timeout)
                for i in others
            ),
            return_exceptions=True,
        )
        replies, missing = [], []
        for i, answer in zip(others, answers, strict=True):
            if isinstance(answer, dict):
                replies.append(answer)
            else:
                missing.append(i)
        return replies, missing

    async def _gather_status(
        self, doc: dict[str, Any], own: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        replies, missing = await self._ask_shards(doc)
        parts = [own] if own is not None else []
        parts += [r["status"] for r in replies if isinstance(r.get("status"), dict)]
        if not parts:
            if missing:
                raise wire.WireError(
                    "shards_unavailable",
                    f"not found on the shards that answered; shards {missing} did not answer "
                    "in time: retry later",
                )
            return None
        total: dict[str, Any] = {"message_id": parts[0].get("message_id")}
        for key in ("total", "acked", "pending", "expired", "dropped", "recalled"):
            total[key] = sum(int(p.get(key, 0)) for p in parts)
        states = {p.get("state") for p in parts}
        total["state"] = (
            "active"
            if "active" in states
            else "recalled"
            if "recalled" in states
            else "expired"
            if states == {"expired"}
            else "done"
        )
        total["shards"] = {"holding": len(parts), "unanswered": missing}
        return total

    async def _gather_stats(self, doc: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
        replies, missing = await self._ask_shards(doc)
        parts = [own] + [r["stats"] for r in replies if isinstance(r.get("stats"), dict)]
        total: dict[str, Any] = {
            key: sum(int(p.get(key, 0) or 0) for p in parts)
            for key in ("messages", "targets", "commits")
        }
        total["shards"] = {"answered": len(parts), "unanswered": missing}
        return total

    # -- housekeeping ------------------------------------------------------------------

    async def _housekeep(self) -> None:
        assert self.core is not None
        while True:
            await asyncio.sleep(self.settings.housekeeping_interval_s)
            now = now_ms()
            expired = self.core.expire(now)
            for mid in expired:
                detail = self.core.detail(mid)
                if detail is not None:
                    self.metrics.expired.inc(detail.expired)
                self._cache.drop(mid)
            purged = self.core.purge(now, self.settings.dedup_retention_ms)
            if expired or purged:
                await self._committed()


def _forward_done(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.info("pull not forwarded", extra={"error": str(fut.exception())})
