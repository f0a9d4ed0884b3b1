"""The pulls of the directed worker: a target's cursor request on ``directed.pull`` (AMQP) or
``POST /directed/v1/targets/{target}/pull`` (HTTP, through :mod:`~workers.directed.http_api`).

One path for both: admission (too many pulls in progress, commits failing), parsing
(:mod:`~workers.directed.wire`), the cursor rules of the core (acknowledge the previous
batch if the record id matches, else send it again; take the next ids), the long poll, the
commit before the answer (:mod:`~workers.directed.ledger`), the contents from the cache or the
store, the reply (:mod:`~workers.directed.replies`).

An AMQP pull that does not wait runs without a task: the delivery is handled in the consumer's
callback and the reply is sent from the callback of the group commit that holds its cursor
(:meth:`~workers.directed.ledger.Ledger.on_committed`), its messages encoded once per message
and shared by every target (:class:`~workers.directed.ledger.ContentCache`). A long poll, and
a reply whose content has to be read from the store, run as a coroutine.

On a sharded worker a pull for another shard's target is forwarded to the owner's queue (an
AMQP pull that the consistent-hash ring sent astray) or relayed to it through the pull
exchange and its answer returned (an HTTP pull).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from bridge.amqp.consumer import Lease
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.messages import DeadLetters, reply
from bridge.amqp.publisher import Publisher
from bridge.errors import NoAnswer, WireError, encode_error
from bridge.ring import RingKeeper
from bridge.rpc import RpcClient
from bridge.sharding import Shard, shard_queue
from workers.directed import replies, wire
from workers.directed.config import H_FORWARDED_FROM, H_ORIGINAL_ROUTING_KEY, DirectedSettings
from workers.directed.ledger import Ledger, now_ms
from workers.directed.metrics import DirectedMetrics
from workers.directed.model import PullResult
from workers.directed.waiters import Waiters

log = logging.getLogger("bridge.directed")


def record_ids() -> Iterator[str]:
    """Record ids unique across restarts: a random per-process prefix and a counter
    (cheaper per pull than uuid4, which makes a getrandom syscall each time)."""
    prefix = os.urandom(6).hex()
    return (f"{prefix}-{n:x}" for n in itertools.count(1))


class Pulls:
    """Answers pulls; :meth:`on_delivery` for the pull consumer, :meth:`http_pull` for HTTP."""

    def __init__(
        self,
        ledger: Ledger,
        settings: DirectedSettings,
        shard: Shard,
        *,
        replies: Publisher,
        dead: DeadLetters,
        metrics: DirectedMetrics,
        lease: Lease,
        rpc: RpcClient | None,
        ring: RingKeeper | None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.shard = shard
        self.replies = replies
        self.dead = dead
        self.metrics = metrics
        self.lease = lease
        self.rpc = rpc  # sharded: relays HTTP pulls to the owning shard
        self.ring = ring  # sharded: put back in shard order when a pull went astray
        self.waiters = Waiters()
        self.stopping = False  # set by the worker: long polls answer with what they have
        self._active = 0  # pull handlers running, long polls included
        self._record_ids = record_ids()
        self._forward_warned = False
        self._idle: asyncio.Future[None] | None = None  # set by drain(), resolved at 0 active
        self._loads: set[asyncio.Task[None]] = set()  # replies whose content is being read

    # -- AMQP --------------------------------------------------------------------------

    def on_delivery(self, message: Delivery) -> Coroutine[Any, Any, None] | None:
        """A pull from the pull queue: answered through :meth:`_answer` once its commit is
        done; a coroutine (which the consumer runs) only for what has to wait."""
        started = time.perf_counter()
        if not message.reply_to:
            return self.dead.reject(
                message, "missing_reply_to", "a pull needs reply_to to be answered"
            )
        forwarded = self.shard.sharded and H_FORWARDED_FROM in (message.headers or {})
        routing_key: str | None = message.routing_key
        if forwarded:
            original = (message.headers or {}).get(H_ORIGINAL_ROUTING_KEY)
            routing_key = original if isinstance(original, str) else None
        try:
            self._admit()
            pull = wire.parse_pull(message.body, routing_key, self.settings)
        except WireError as exc:
            self.metrics.pull_kind["error"].inc()
            reply(self.replies, message, encode_error(exc.code, exc.message))
            return None
        if self.shard.sharded and not self.shard.owns(pull.topic):
            self._forward(message, pull.topic, forwarded)
            return None
        result = self._cursor(pull.topic, pull.record_id, pull.max)
        if self._must_wait(pull, result):
            return self._wait_then_answer(message, pull, started)
        self._answer(message, pull, result, started)
        return None

    async def _wait_then_answer(self, message: Delivery, pull: wire.Pull, started: float) -> None:
        self._begin()
        try:
            self._answer(message, pull, await self._long_poll(pull), started)
        finally:
            self._end()

    def _answer(
        self, message: Delivery, pull: wire.Pull, result: PullResult, started: float
    ) -> None:
        """Reply once the commit that holds what the pull changed is done."""
        self._begin()
        self.ledger.on_committed(
            functools.partial(self._committed, message, pull.topic, result, started)
        )

    def _committed(
        self,
        message: Delivery,
        topic: str,
        result: PullResult,
        started: float,
        error: BaseException | None,
    ) -> None:
        if error is not None:  # the store is closing and cannot commit: no answer, the
            self._end()  # target retries with the same record id (nothing was acknowledged)
            log.info("pull not answered", extra={"topic": topic, "error": str(error)})
            return
        entries = self.ledger.encoded_cached(result.mids)
        if entries is None:  # content evicted from the cache: read it from the store
            task = asyncio.ensure_future(self._load_then_reply(message, topic, result, started))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
            return
        self._reply(message, topic, result, entries, started)

    async def _load_then_reply(
        self, message: Delivery, topic: str, result: PullResult, started: float
    ) -> None:
        try:
            entries = await self.ledger.encoded(result.mids)
        except Exception as exc:
            self._end()
            log.error("pull not answered: content unreadable", extra={"error": str(exc)})
            return
        self._reply(message, topic, result, entries, started)

    def _reply(
        self,
        message: Delivery,
        topic: str,
        result: PullResult,
        entries: list[bytes],
        started: float,
    ) -> None:
        self._end()
        reply(self.replies, message, _encode(replies.encode_reply, topic, result, entries))
        self.metrics.pull_seconds.observe(time.perf_counter() - started)

    def _begin(self) -> None:
        self._active += 1

    def _end(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every pull in progress has its answer sent
        (the consumers' drain does not see the pulls waiting for a commit)."""
        if self._active == 0:
            return
        self._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        except TimeoutError:
            log.warning("pulls still unanswered at stop", extra={"pulls": self._active})

    def _forward(self, message: Delivery, topic: str, forwarded: bool) -> None:
        """A pull for another shard's target: hand it to the owner's queue (the ring of the
        consistent-hash exchange no longer matches shard order; see bridge.sharding)."""
        owner = self.shard.owner(topic)
        if forwarded:  # forwarded twice means the shards disagree on the shard count
            self.metrics.pull_kind["error"].inc()
            reply(
                self.replies,
                message,
                encode_error(
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
        if self.ring is not None:
            self.ring.schedule("a pull reached a shard that does not own its target")
        headers = dict(message.headers or {})
        headers[H_FORWARDED_FROM] = self.shard.index
        headers[H_ORIGINAL_ROUTING_KEY] = message.routing_key or ""
        # not confirmed: a pull lost on the way is retried by the puller, as a lost reply
        self.replies.publish(
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

    # -- HTTP --------------------------------------------------------------------------

    async def http_pull(self, target: str, body: bytes, binary: bool) -> bytes:
        """The HTTP pull: the same path as an AMQP pull (admission, parsing, the cursor
        rules, the long poll, the commit before the answer); a pull for another shard's
        target is relayed to it through the pull exchange and its answer returned."""
        if not self.lease.held.is_set():  # its store is not the one the targets use
            raise WireError(
                "unavailable",
                f"another process owns {self.lease.owned}; this one answers no pulls until it "
                "takes over; retry later (or at the owner)",
            )
        started = time.perf_counter()
        self._begin()
        try:
            try:
                self._admit()
                pull = wire.parse_http_pull(body, target, self.settings)
            except WireError:
                self.metrics.pull_kind["error"].inc()
                raise
            if self.shard.sharded and not self.shard.owns(pull.topic):
                relayed = await self._relay(pull)
                return (
                    replies.json_reply_to_binary(relayed) if binary else replies.json_dumps(relayed)
                )
            result = self._cursor(pull.topic, pull.record_id, pull.max)
            if self._must_wait(pull, result):
                result = await self._long_poll(pull)
            await self.ledger.committed()
            if binary:
                messages = await self.ledger.messages(result.mids)
                answer = _encode(replies.encode_binary_reply, pull.topic, result, messages)
            else:
                entries = await self.ledger.encoded(result.mids)
                answer = _encode(replies.encode_reply, pull.topic, result, entries)
            self.metrics.pull_seconds.observe(time.perf_counter() - started)
            return answer
        finally:
            self._end()

    async def _relay(self, pull: wire.Pull) -> dict[str, Any]:
        """An HTTP pull for another shard's target: published to the pull exchange under the
        target's name, which routes it to the owning shard (forwarded on if the ring is out
        of order), and answered with that shard's reply."""
        assert self.rpc is not None
        owner = self.shard.owner(pull.topic)
        doc = {"topic": pull.topic, "record_id": pull.record_id, "max": pull.max}
        doc["wait_ms"] = pull.wait_ms
        timeout = pull.wait_ms / 1000 + self.settings.shard_query_timeout_s
        try:
            answer = await self.rpc.call(self.settings.pull_exchange, pull.topic, doc, timeout)
        except NoAnswer:
            raise WireError(
                "unavailable",
                f"shard {owner}, which owns {pull.topic!r}, did not answer within {timeout:g} s; "
                "retry with the same record_id",
            ) from None
        self.metrics.http_relayed.inc()
        error = answer.get("error")
        if isinstance(error, dict):
            raise WireError(str(error.get("code")), str(error.get("message")))
        return answer

    # -- both --------------------------------------------------------------------------

    def _admit(self) -> None:
        """Refuse a pull the worker cannot take now (a :class:`WireError`), before it
        touches the core, so the target retries with the same record id."""
        if self._active > self.settings.max_inflight_pulls:
            # AMQP pulls are acknowledged on receipt, so prefetch no longer bounds them:
            # refuse visibly instead of piling up long polls without limit.
            raise WireError("overloaded", "too many pulls in progress; retry later")
        if self.ledger.committer.failing:
            # The reply would have to wait for a commit that cannot happen: say so now.
            raise WireError(
                "unavailable", "the worker cannot commit its state right now; retry later"
            )

    def _cursor(self, topic: str, record_id: str | None, max_n: int) -> PullResult:
        result = self.ledger.core.pull(topic, record_id, max_n, now_ms(), next(self._record_ids))
        self.metrics.pull_kind[result.kind].inc()
        if result.kind == "resend":
            self.metrics.redeliveries.inc()
        if result.acked:
            self.metrics.acks.inc(len(result.acked))
        return result

    def _must_wait(self, pull: wire.Pull, result: PullResult) -> bool:
        """Nothing to hand out and the pull asks to wait for it (a long poll)."""
        return result.record_id is None and pull.wait_ms > 0 and pull.max > 0 and not self.stopping

    async def _long_poll(self, pull: wire.Pull) -> PullResult:
        """Wait until a message for the target is accepted or ``wait_ms`` passed, then the
        cursor step again."""
        await self.ledger.committed()  # the acknowledgement is durable before we wait
        # a message accepted during that commit found no waiter to wake: no wait then
        if self.ledger.core.backlog(pull.topic) == 0:
            await self.waiters.wait(pull.topic, pull.wait_ms)
        return self._cursor(pull.topic, None, pull.max)


def _encode(encode: Callable[..., bytes], topic: str, result: PullResult, items: Any) -> bytes:
    """The reply to a pull whose cursor step gave ``result``: ``encode`` is
    :func:`replies.encode_reply` (``items``: encoded messages) or
    :func:`replies.encode_binary_reply` (``items``: messages)."""
    return encode(
        topic,
        result.record_id,
        result.redelivered,
        items,
        missed=result.missed,
        missed_ids=result.missed_ids,
        recalled_ids=result.recalled_ids,
    )


def _forward_done(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.info("pull not forwarded", extra={"error": str(fut.exception())})
