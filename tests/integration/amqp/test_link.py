"""The AMQP data path (bridge/amqp: Link, Publisher, Consumer) against a real broker:
confirmed publishing and batched acks, broker-closed channels, a connection cut, stalled
or slow, a consumed queue deleted under it, exclusive consumers, nack/reject and stale
acks, and, last because they disturb everything else on the broker, a memory alarm and a
broker restart (these two need the broker's CLI: tests/broker_cli.py).

No timing assertions: every wait is for a condition, with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from bench.harness.broker import delete_names
from bench.harness.proxy import TcpProxy
from bridge.amqp import frames as F
from bridge.amqp.consumer import (
    DELIVERY_LIMIT,
    DELIVERY_LIMIT_REASON,
    H_DELIVERY_COUNT,
    POISON_ATTEMPTS,
    PROCESSING_FAILED,
    Consumer,
    Lease,
    QueueSpec,
)
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from bridge.errors import PublishFailed, StoreError
from tests.broker_cli import rabbitmqctl, require_cli

pytestmark = pytest.mark.integration


# -- helpers -----------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def msg(message_id: str) -> F.Properties:
    return F.Properties(message_id=message_id)


class Inbox:
    """A consumer's handler: keeps every delivery and acks it (unless ``ack=False``)."""

    def __init__(self, *, ack: bool = True) -> None:
        self.ack = ack
        self.consumer: Consumer | None = None
        self.got: list[F.Delivery] = []

    def __call__(self, delivery: F.Delivery) -> None:
        self.got.append(delivery)
        if self.ack and self.consumer is not None:
            self.consumer.ack(delivery)

    def ids(self) -> list[str | None]:
        return [d.message_id for d in self.got]

    async def wait(self, n: int, timeout: float = 30.0) -> None:
        await until(lambda: len(self.got) >= n, f"{n} deliveries", timeout)

    async def wait_ids(self, ids: set[str], timeout: float = 30.0) -> None:
        def have() -> bool:
            return ids <= set(self.ids())

        try:
            await until(have, "deliveries", timeout)
        except AssertionError:
            missing = sorted(ids - set(self.ids()))
            raise AssertionError(f"{len(missing)} never delivered: {missing[:20]}") from None

    async def delivery(self, message_id: str, nth: int = 1, timeout: float = 20.0) -> F.Delivery:
        """The ``nth`` delivery of a message (2 = its first redelivery)."""

        def found() -> list[F.Delivery]:
            return [d for d in self.got if d.message_id == message_id]

        await until(lambda: len(found()) >= nth, f"delivery #{nth} of {message_id}", timeout)
        return found()[nth - 1]


def consumer(link: Link, queue: str | QueueSpec, inbox: Inbox, **kw: Any) -> Consumer:
    cons = Consumer(link, queue, inbox, **kw)
    inbox.consumer = cons
    return cons


class Names:
    """Queue and exchange names of one test, deleted after it."""

    def __init__(self, unique: str) -> None:
        self.unique = unique
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def queue(self, suffix: str) -> str:
        name = f"{self.unique}.{suffix}"
        self.queues.append(name)
        return name

    def exchange(self, suffix: str) -> str:
        name = f"{self.unique}.{suffix}"
        self.exchanges.append(name)
        return name


class Links:
    """Links and proxies of one test, closed after it (before its names are deleted)."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self.proxies: list[TcpProxy] = []

    def new(self, url: str, name: str, **kw: Any) -> Link:
        link = Link(url, name=name, **kw)
        self.links.append(link)
        return link

    async def proxy(self, url: str) -> TcpProxy:
        parts = urlsplit(url)
        proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
        self.proxies.append(proxy)
        return proxy


def via(proxy: TcpProxy, url: str) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{proxy.port}"))


@pytest.fixture
async def names(broker_url: str, unique: str) -> AsyncIterator[Names]:
    n = Names(unique)
    yield n
    await delete_names(broker_url, n.exchanges, n.queues)


@pytest.fixture
async def links(names: Names) -> AsyncIterator[Links]:
    ls = Links()
    try:
        yield ls
    finally:
        for link in ls.links:
            await link.close()
        for proxy in ls.proxies:
            await proxy.stop()


async def queue_counts(amqp: Any, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) from a passive declare."""
    ch = await amqp.channel()
    try:
        q = await ch.declare_queue(queue, passive=True)
        return q.declaration_result.message_count, q.declaration_result.consumer_count
    finally:
        await ch.close()


async def until_ready_messages(amqp: Any, queue: str, timeout: float = 15.0) -> None:
    """Until the queue holds messages no consumer took yet."""
    deadline = time.monotonic() + timeout
    while True:
        if (await queue_counts(amqp, queue))[0] > 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} stayed empty")
        await asyncio.sleep(0.02)


async def get_one(amqp: Any, queue: str, timeout: float = 15.0) -> Any:
    ch = await amqp.channel()
    try:
        q = await ch.get_queue(queue, ensure=False)
        deadline = time.monotonic() + timeout
        while (m := await q.get(no_ack=True, fail=False)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing arrived in {queue}")
            await asyncio.sleep(0.05)
        return m
    finally:
        await ch.close()


_FRAME_HEAD = struct.Struct(">BHI")


class AckCounter:
    """Counts the ``basic.ack`` frames the link writes on one channel (wraps Link.write)."""

    def __init__(self, link: Link, channel: Consumer) -> None:
        self.frames = 0
        self.multiple = 0
        self._channel = channel
        self._write = link.write
        link.write = self.write  # type: ignore[method-assign]

    def write(self, data: bytes) -> None:
        pos, number = 0, self._channel.number
        while pos + 7 <= len(data):
            kind, channel, size = _FRAME_HEAD.unpack_from(data, pos)
            if kind == 1 and channel == number and data[pos + 7 : pos + 11] == b"\x00\x3c\x00\x50":
                self.frames += 1
                self.multiple += data[pos + 19] & 1
            pos += 8 + size
        self._write(data)


# -- the steady state --------------------------------------------------------------------


async def test_confirmed_publishes_consumed_once_in_order_with_batched_acks(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    n = 2000
    q = names.queue("flow")
    link = links.new(broker_url, "flow")
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    cons = consumer(link, QueueSpec(q), inbox, prefetch=200, declare=True)
    acks = AckCounter(link, cons)
    await link.start()
    assert link.ready and link.not_ready() == []

    futs = [pub.publish("", q, b"m%d" % i, msg(str(i))) for i in range(n)]
    async with asyncio.timeout(60):
        assert await asyncio.gather(*futs) == [None] * n
    assert pub.published == n and pub.in_flight == 0 and pub.queued == 0
    assert pub.flushes < n // 10, f"{pub.flushes} flushes for {n} publishes"

    await inbox.wait(n)
    assert inbox.ids() == [str(i) for i in range(n)]
    assert [d.body for d in inbox.got] == [b"m%d" % i for i in range(n)]
    assert not any(d.redelivered for d in inbox.got)
    assert cons.delivered == n
    # acknowledgements batched: a few multiple-acks, not one frame per delivery. One frame
    # per event-loop turn that settled deliveries, so the count follows how many deliveries
    # each socket read carries (about 10 here, 9.9 once on RabbitMQ 4.3 in CI): the bound
    # says "batched", not how well the broker's writes happened to coalesce.
    assert 1 <= acks.frames < n // 4, f"{acks.frames} basic.ack frames for {n} deliveries"
    assert acks.multiple >= 1
    assert await queue_counts(amqp, q) == (0, 1)

    # every delivery was acked: closing the consumer requeues nothing
    await link.close()
    assert await queue_counts(amqp, q) == (0, 0)
    assert len(inbox.got) == n


# -- channels the broker closes ----------------------------------------------------------


async def test_unroutable_and_missing_exchange_fail_alone_on_a_live_connection(
    broker_url: str, names: Names, links: Links
) -> None:
    q = names.queue("work")
    missing = f"{names.unique}.missing"  # never declared
    link = links.new(broker_url, "errors")
    pub = Publisher(link, name="pub")
    one = Publisher(link, name="one-at-a-time", window=1)
    background_pub = Publisher(link, name="background")
    inbox = Inbox()
    cons = consumer(link, QueueSpec(q), inbox, declare=True)
    await link.start()
    consumer_epoch, pub_epoch, one_epoch = cons.epoch, pub.epoch, one.epoch

    # a stream through the consumer on the same link, for the whole test
    background: list[asyncio.Future[None]] = []
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            background.append(background_pub.publish("", q, b"bg", msg(f"bg{len(background)}")))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(stream())
    try:
        await until(lambda: len(inbox.got) >= 5, "the background stream flowing")

        # unroutable, between routable publishes of the same flush: it alone fails
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                pub.publish("", q, b"", msg("u-before")),
                pub.publish("", f"{names.unique}.nobody", b"", msg("u")),
                pub.publish("", q, b"", msg("u-after")),
                return_exceptions=True,
            ),
            30,
        )
        assert outcomes[0] is None and outcomes[2] is None, outcomes
        assert isinstance(outcomes[1], PublishFailed) and outcomes[1].reason == "unroutable"

        # a missing exchange closes the channel; publishes queued behind it (window 1)
        # wait, and go out on the reopened channel
        bad = one.publish(missing, "k", b"", msg("bad"))
        behind = [one.publish("", q, b"", msg(f"behind{i}")) for i in range(5)]
        with pytest.raises(PublishFailed) as info:
            await asyncio.wait_for(bad, 30)
        assert info.value.reason == "exchange_not_found"
        after = [one.publish("", q, b"", msg(f"after{i}")) for i in range(5)]
        await asyncio.wait_for(asyncio.gather(*behind, *after), 30)

        # the same on the default-window publisher: publishes sent after its failure succeed
        with pytest.raises(PublishFailed) as info:
            await asyncio.wait_for(pub.publish(missing, "k", b"", msg("bad2")), 30)
        assert info.value.reason == "exchange_not_found"
        await asyncio.wait_for(pub.publish("", q, b"", msg("after-pub")), 30)
        # and unroutable still reported right on the reopened channel
        with pytest.raises(PublishFailed) as info:
            await asyncio.wait_for(pub.publish("", f"{names.unique}.nobody", b""), 30)
        assert info.value.reason == "unroutable"
    finally:
        stop.set()
        await task
    await asyncio.wait_for(asyncio.gather(*background), 30)

    expected = {"u-before", "u-after", "after-pub"}
    expected |= {f"behind{i}" for i in range(5)} | {f"after{i}" for i in range(5)}
    expected |= {f"bg{i}" for i in range(len(background))}
    await inbox.wait_ids(expected)
    ids = inbox.ids()
    assert len(ids) == len(set(ids)), "a message was consumed twice"
    assert "bad" not in ids and "bad2" not in ids and "u" not in ids
    assert [i for i in ids if i and i.startswith("bg")] == [
        f"bg{i}" for i in range(len(background))
    ]
    ordered = [*(f"behind{i}" for i in range(5)), *(f"after{i}" for i in range(5))]
    assert [i for i in ids if i in ordered] == ordered
    # both publishing channels were reopened; the connection and the consumer stayed
    assert one.epoch == one_epoch + 1 and pub.epoch == pub_epoch + 1
    assert link.reconnects == 0 and cons.epoch == consumer_epoch and link.ready


async def test_publishes_written_behind_a_missing_exchange_are_sent_again(
    broker_url: str, names: Names, links: Links
) -> None:
    """Publishes written on the channel after the one to a missing exchange are sent again
    on the reopened channel (bridge/amqp/confirms.py ConfirmTracker.on_channel_closed).

    RabbitMQ processes a channel's frames in order and, once it has sent channel.close,
    discards every frame on that channel until close-ok (AMQP 0-9-1, channel.close), so
    those publishes were certainly never routed: they go out again with no risk of a
    duplicate, instead of pushing a retry onto every caller for a fault not theirs (they
    failed as connection_lost before)."""
    q = names.queue("behind")
    missing = f"{names.unique}.missing"
    link = links.new(broker_url, "behind")
    pub = Publisher(link, name="pub")  # default window: all six in one write
    inbox = Inbox()
    consumer(link, QueueSpec(q), inbox, declare=True)
    await link.start()

    bad = pub.publish(missing, "k", b"", msg("bad"))
    behind = [pub.publish("", q, b"", msg(f"behind{i}")) for i in range(5)]
    outcomes = await asyncio.wait_for(asyncio.gather(bad, *behind, return_exceptions=True), 30)
    assert isinstance(outcomes[0], PublishFailed)
    assert outcomes[0].reason == "exchange_not_found"

    # evidence that the broker dropped them: a later publish to the same queue arrives,
    # and none of those written before it did
    await asyncio.wait_for(pub.publish("", q, b"", msg("sentinel")), 30)
    await inbox.wait_ids({"sentinel"})
    routed = [i for i in inbox.ids() if i != "sentinel"]
    reasons = [getattr(o, "reason", o) for o in outcomes[1:]]
    assert reasons == [None] * 5, (
        f"publishes written behind the failing one (never routed: consumed before a later "
        f"sentinel {routed}) failed with {reasons} instead of being sent again on the "
        f"reopened channel"
    )
    await inbox.wait_ids({f"behind{i}" for i in range(5)})


async def test_consumer_channel_closed_by_the_broker_is_reopened_on_the_same_connection(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    q = names.queue("later")  # does not exist yet: basic.consume on it closes the channel
    link = links.new(broker_url, "reopen")
    pub = Publisher(link, name="pub")
    await link.start()
    inbox = Inbox()
    cons = consumer(link, q, inbox)  # attached to the running link: opened now

    await until(lambda: cons.epoch >= 2, "the consumer's channel closed (404) and reopened")
    assert link.connected and link.reconnects == 0
    assert not link.ready and len(link.not_ready()) == 1 and q in link.not_ready()[0]
    # the publisher's channel is not affected
    with pytest.raises(PublishFailed) as info:
        await asyncio.wait_for(pub.publish("", q, b"", msg("too-early")), 30)
    assert info.value.reason == "unroutable"

    ch = await amqp.channel()
    await ch.declare_queue(q, durable=True)
    await until(lambda: link.ready, "the consumer consuming once the queue exists", 30)
    await asyncio.wait_for(pub.publish("", q, b"", msg("now")), 30)
    await inbox.wait_ids({"now"})
    assert link.reconnects == 0 and inbox.ids() == ["now"]


# -- a connection lost, stalled, slow ----------------------------------------------------


async def test_connection_cut_while_publishing_fails_or_confirms_and_reconnects(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    q = names.queue("cut")
    proxy = await links.proxy(broker_url)
    link = links.new(via(proxy, broker_url), "cut", retry_max_s=1.0)
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    cons = consumer(link, QueueSpec(q), inbox, prefetch=200, declare=True)
    await link.start()
    futs: dict[str, asyncio.Future[None]] = {}

    def publish(mid: str) -> None:
        futs[mid] = pub.publish("", q, b"x" * 100, msg(mid))

    for i in range(300):
        publish(f"a{i}")
    await asyncio.wait_for(asyncio.gather(*futs.values()), 30)
    await inbox.wait_ids({f"a{i}" for i in range(300)})  # none left ready in the queue

    # a burst the broker routes (a message of it waits in the queue) while the proxy
    # slows the way back, so that no confirm is back yet ...
    proxy.latency = 1.0
    for i in range(500):
        publish(f"b{i}")
    await until_ready_messages(amqp, q)
    # ... and a few written that never get to the broker
    for i in range(50):
        publish(f"e{i}")
    await asyncio.sleep(0)  # the publisher writes them in this loop turn
    assert pub.in_flight > 0
    proxy.accepting = False
    proxy.cut()
    proxy.latency = 0.0
    await until(lambda: not link.connected, "the link noticing the cut")
    assert not link.ready

    # publishes while disconnected wait (through failed reconnect attempts)
    for i in range(100):
        publish(f"d{i}")
    down = [futs[f"d{i}"] for i in range(100)]
    await until(lambda: link.reconnects >= 2, "a failed reconnect attempt")
    assert not any(f.done() for f in down) and pub.queued >= 100

    proxy.accepting = True
    await until(lambda: link.ready, "the link reconnected and consuming", 30)
    assert link.reconnects >= 2 and cons.consuming
    for i in range(100):
        publish(f"c{i}")

    _, pending = await asyncio.wait(futs.values(), timeout=60)
    assert not pending, f"{len(pending)} publishes never resolved"
    failed: dict[str, str] = {}
    for mid, fut in futs.items():
        exc = fut.exception()
        if exc is not None:
            assert isinstance(exc, PublishFailed), repr(exc)
            failed[mid] = exc.reason
    assert set(failed.values()) <= {"connection_lost"}, Counter(failed.values())
    assert all(m[0] in "be" for m in failed), sorted(failed)[:10]
    assert all(f"e{i}" in failed for i in range(50))  # written into the cut connection
    assert not any(f"d{i}" in failed for i in range(100))  # waited, then went out

    confirmed = {mid for mid in futs if mid not in failed}
    await inbox.wait_ids(confirmed)
    # at-least-once: failed publishes the broker had routed are consumed all the same ...
    assert {i for i in inbox.ids() if i in failed}, "no routed-but-unconfirmed publish"
    # ... and a message comes twice only if it failed (the caller may have sent it again)
    # or if the cut lost its consumer's ack (then it comes again flagged redelivered)
    seen: dict[str, int] = {}
    for d in inbox.got:
        mid = d.message_id or ""
        seen[mid] = seen.get(mid, 0) + 1
        if seen[mid] > 1:
            assert mid in failed or d.redelivered, f"{mid} delivered twice, not redelivered"
    assert set(seen) <= set(futs)


async def test_stall_longer_than_the_heartbeat_is_noticed_and_reconnected(
    broker_url: str, names: Names, links: Links
) -> None:
    q = names.queue("stall")
    proxy = await links.proxy(broker_url)
    link = links.new(via(proxy, broker_url), "stall", heartbeat_s=1, retry_max_s=1.0)
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    consumer(link, QueueSpec(q), inbox, declare=True)
    await link.start()
    await asyncio.wait_for(pub.publish("", q, b"", msg("before")), 30)
    await inbox.wait_ids({"before"})

    loop = asyncio.get_running_loop()
    stalled_at = loop.time()
    proxy.stall()
    in_stall = pub.publish("", q, b"", msg("in-stall"))
    await until(lambda: not link.connected, "the link noticing the silent broker", 15)
    assert proxy.stalled  # noticed by the heartbeat check, not by anything the proxy did
    await asyncio.sleep(max(0.0, 4.0 - (loop.time() - stalled_at)))
    proxy.resume()

    await until(lambda: link.ready, "the link reconnected and consuming", 30)
    assert link.reconnects >= 1
    try:
        await asyncio.wait_for(in_stall, 30)  # written before or after the loss: either way
    except PublishFailed as exc:
        assert exc.reason == "connection_lost"
    await asyncio.wait_for(pub.publish("", q, b"", msg("after")), 30)
    await inbox.wait_ids({"after"})


async def test_slow_link_publishes_and_consumes_correctly(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    n = 500
    q = names.queue("slow")
    proxy = await links.proxy(broker_url)
    proxy.latency = 0.2
    link = links.new(via(proxy, broker_url), "slow")
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    consumer(link, QueueSpec(q), inbox, prefetch=50, declare=True)
    await asyncio.wait_for(link.start(), 60)

    futs = [pub.publish("", q, b"s%d" % i, msg(str(i))) for i in range(n)]
    async with asyncio.timeout(60):
        assert await asyncio.gather(*futs) == [None] * n
    await inbox.wait(n, 60)
    assert inbox.ids() == [str(i) for i in range(n)]
    assert not any(d.redelivered for d in inbox.got)
    assert link.reconnects == 0
    await link.close()
    assert await queue_counts(amqp, q) == (0, 0)


# -- queues and consumers ----------------------------------------------------------------


async def test_consumed_queue_deleted_is_declared_bound_and_consumed_again(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    ex = names.exchange("ex")
    q = names.queue("restored")
    args = {"x-message-ttl": 600_000, "x-max-length": 5000}
    ch = await amqp.channel()
    exchange = await ch.declare_exchange(ex, aio_pika.ExchangeType.DIRECT)
    queue = await ch.declare_queue(q, durable=True, arguments=args)
    await queue.bind(exchange, "rk")

    link = links.new(broker_url, "restore")
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    spec = QueueSpec(q, durable=True, arguments=args, bindings=((ex, "rk"),))
    cons = consumer(link, spec, inbox)  # declare=False: only a loss makes it declare
    restored: list[str] = []
    cons.on_restored = restored.append
    await link.start()
    await asyncio.wait_for(pub.publish(ex, "rk", b"", msg("before")), 30)
    await inbox.wait_ids({"before"})

    went_unready = asyncio.Event()

    async def watch() -> None:  # every loop turn: the restore takes several round trips
        while True:
            if not link.ready:
                went_unready.set()
                return
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        await ch.queue_delete(q)
        await asyncio.wait_for(went_unready.wait(), 15)
    finally:
        watcher.cancel()
    await until(lambda: link.ready and cons.restored == 1, "the consumer restored", 30)
    assert restored == [q] and link.reconnects == 0

    # declared again with the spec's arguments: an equal declaration is accepted, a
    # different one refused
    await ch.declare_queue(q, durable=True, arguments=args)
    async with await aio_pika.connect(broker_url) as conn:
        other = await conn.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await other.declare_queue(q, durable=True, arguments={**args, "x-message-ttl": 1})
    # bound again: mandatory publishes to the exchange are routed and consumed
    await asyncio.wait_for(pub.publish(ex, "rk", b"", msg("after")), 30)
    await inbox.wait_ids({"after"})
    assert cons.restored == 1 and restored == [q] and link.ready


async def test_exclusive_consumer_waits_while_another_holds_the_queue(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    """A refused exclusive consumer does not fail the start: it is not ready, says why, and
    consumes once the holder's connection is gone."""
    q = names.queue("exclusive")
    ch = await amqp.channel()
    await ch.declare_queue(q, durable=True)
    first = links.new(broker_url, "holder")
    pub = Publisher(first, name="pub")
    inbox = Inbox()
    consumer(first, q, inbox, exclusive=True)
    await first.start()

    second = links.new(broker_url, "second", retry_max_s=0.5)
    waiting = Inbox()
    consumer(second, q, waiting, exclusive=True)
    await asyncio.wait_for(second.start(), 30)
    assert second.connected and not second.ready
    assert "another process owns it" in "; ".join(second.not_ready())

    # the holder goes on consuming
    await asyncio.wait_for(pub.publish("", q, b"", msg("still")), 30)
    await inbox.wait_ids({"still"})
    assert first.ready and first.reconnects == 0

    await first.close()
    await until(lambda: second.ready, "the second consumes once the holder is gone")
    await asyncio.wait_for(Publisher(second, name="pub2").publish("", q, b"", msg("taken")), 30)
    await waiting.wait_ids({"taken"})
    assert "still" not in waiting.ids()


async def test_lease_gates_its_consumers(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    """Two links with a lease on the same queue: only the holder's consumers consume (the
    queue is a quorum queue, whose exclusive-consume flag RabbitMQ ignores); the other
    takes over when the holder's connection ends."""
    q = names.queue("owned")
    ch = await amqp.channel()
    await ch.declare_queue(q, durable=True, arguments={"x-queue-type": "quorum"})
    first = links.new(broker_url, "first")
    lease1 = Lease(first, q, hint="stop the other one")
    got1 = Inbox()
    consumer(first, q, got1, lease=lease1)
    await first.start()
    assert first.ready and lease1.held.is_set()

    second = links.new(broker_url, "second", retry_max_s=0.5)
    lease2 = Lease(second, q, hint="stop the other one")
    got2 = Inbox()
    consumer(second, q, got2, lease=lease2)
    await asyncio.wait_for(second.start(), 30)
    assert not second.ready and not lease2.held.is_set()
    reasons = "; ".join(second.not_ready())
    assert "another process owns it" in reasons and f"waiting to own {q}" in reasons

    pub = Publisher(first, name="pub")
    for i in range(20):
        await asyncio.wait_for(pub.publish("", q, b"", msg(f"a{i}")), 30)
    await got1.wait_ids({f"a{i}" for i in range(20)})
    assert got2.got == []

    await first.close()
    await until(lambda: second.ready, "the second owns the queue once the first is gone")
    pub2 = Publisher(second, name="pub2")
    await asyncio.wait_for(pub2.publish("", q, b"", msg("b")), 30)
    await got2.wait_ids({"b"})
    assert not any((i or "").startswith("a") for i in got2.ids())
    await ch.queue_delete(q)


async def test_a_message_whose_handler_keeps_raising_is_given_up_after_bounded_attempts(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    """Poison: a handler that raises for one message requeues it POISON_ATTEMPTS times, then
    hands it to ``poison``; a worker-wide failure (a BridgeError) is requeued without being
    counted; the other messages go on."""
    q = names.queue("poison")
    ch = await amqp.channel()
    await ch.declare_queue(q, durable=False)
    link = links.new(broker_url, "poison")
    pub = Publisher(link, name="pub")
    seen: Counter[str | None] = Counter()
    poisoned: list[tuple[str | None, str, str, str | None]] = []
    busy_failures = POISON_ATTEMPTS + 2

    def handler(delivery: F.Delivery) -> None:
        seen[delivery.message_id] += 1
        if delivery.message_id == "bad":
            raise ValueError("cannot handle this one")
        if delivery.message_id == "busy" and seen["busy"] <= busy_failures:
            raise StoreError("the disk is full")  # not the message's fault
        cons.ack(delivery)

    async def poison(delivery: F.Delivery, reason: str, detail: str, exc: str | None) -> None:
        poisoned.append((delivery.message_id, reason, detail, exc))
        cons.ack(delivery)

    cons = Consumer(link, q, handler, poison=poison)
    await link.start()
    for mid in ("bad", "busy", "good"):
        await asyncio.wait_for(pub.publish("", q, b"same body", msg(mid)), 30)
    await until(
        lambda: bool(poisoned) and seen["busy"] > busy_failures and seen["good"] == 1,
        "the bad one given up, the others handled",
    )
    assert seen["bad"] == POISON_ATTEMPTS
    ((mid, reason, detail, exc),) = poisoned
    assert (mid, reason, exc) == ("bad", PROCESSING_FAILED, "ValueError")
    assert f"failed {POISON_ATTEMPTS} times" in detail and "cannot handle this one" in detail


async def test_a_redelivery_the_broker_counted_too_often_is_given_up_unseen(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    """A message that made the process die each time leaves no count in memory: the
    broker's (x-delivery-count, set by quorum queues) gives it up before the handler."""
    q = names.queue("limit")
    ch = await amqp.channel()
    await ch.declare_queue(q, durable=False)
    link = links.new(broker_url, "limit")
    pub = Publisher(link, name="pub")
    handled: list[F.Delivery] = []
    poisoned: list[tuple[str, str | None]] = []

    def handler(delivery: F.Delivery) -> None:
        handled.append(delivery)
        raise StoreError("the disk is full")  # requeued, not counted: comes back redelivered

    async def poison(delivery: F.Delivery, reason: str, detail: str, exc: str | None) -> None:
        poisoned.append((reason, exc))
        cons.ack(delivery)

    cons = Consumer(link, q, handler, poison=poison)
    await link.start()
    props = F.Properties(message_id="crasher", headers={H_DELIVERY_COUNT: DELIVERY_LIMIT})
    await asyncio.wait_for(pub.publish("", q, b"", props), 30)
    await until(lambda: bool(poisoned), "given up")
    assert poisoned == [(DELIVERY_LIMIT_REASON, None)]
    assert len(handled) == 1 and not handled[0].redelivered


async def test_nack_requeues_reject_drops_and_a_stale_ack_is_ignored(
    broker_url: str, names: Names, links: Links, amqp: Any
) -> None:
    q = names.queue("settle")
    dead = names.queue("dead")
    ch = await amqp.channel()
    await ch.declare_queue(dead, durable=True)
    await ch.declare_queue(
        q,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead},
    )
    proxy = await links.proxy(broker_url)
    link = links.new(via(proxy, broker_url), "settle", retry_max_s=1.0)
    pub = Publisher(link, name="pub")
    inbox = Inbox(ack=False)
    cons = consumer(link, q, inbox, prefetch=10)
    await link.start()

    # nack with requeue: delivered again, flagged redelivered
    await asyncio.wait_for(pub.publish("", q, b"", msg("m1")), 30)
    d1 = await inbox.delivery("m1")
    assert not d1.redelivered
    cons.nack(d1, requeue=True)
    again = await inbox.delivery("m1", 2)
    assert again.redelivered
    cons.ack(again)

    # reject without requeue: dropped (dead-lettered as "rejected", not redelivered)
    await asyncio.wait_for(pub.publish("", q, b"", msg("m2")), 30)
    d2 = await inbox.delivery("m2")
    cons.reject(d2)
    dropped = await get_one(amqp, dead)
    assert dropped.message_id == "m2"
    assert dropped.headers["x-death"][0]["reason"] == "rejected"

    # deliveries held across a reconnect: settling the old ones does nothing, whether
    # their tag is unknown on the new channel (sent, the broker would close the channel)
    # or is the tag of another delivery there (sent, it would ack that one)
    for mid in ("m3", "mx"):
        await asyncio.wait_for(pub.publish("", q, b"", msg(mid)), 30)
    old3, oldx = await inbox.delivery("m3"), await inbox.delivery("mx")
    assert (old3.delivery_tag, oldx.delivery_tag) == (4, 5)  # after m1, m1 again, m2
    old_epoch = cons.epoch
    proxy.cut()
    await until(lambda: link.reconnects >= 1 and link.ready, "the link reconnected", 30)
    new3, newx = await inbox.delivery("m3", 2), await inbox.delivery("mx", 2)
    for mid in ("m4", "m5"):
        await asyncio.wait_for(pub.publish("", q, b"", msg(mid)), 30)
    m4, m5 = await inbox.delivery("m4"), await inbox.delivery("m5")
    assert new3.redelivered and newx.redelivered and cons.epoch != old_epoch
    assert [d.delivery_tag for d in (new3, newx, m4, m5)] == [1, 2, 3, 4]
    assert not cons.is_current(old3) and cons.is_current(m5)
    epoch, reconnects = cons.epoch, link.reconnects
    cons.ack(old3)  # tag 4: m5's tag on this channel
    cons.ack(oldx)  # tag 5: unknown on this channel
    for d in (new3, newx, m4):
        cons.ack(d)  # m5 stays unacknowledged
    await asyncio.wait_for(pub.publish("", q, b"", msg("m6")), 30)  # a round trip after
    cons.ack(await inbox.delivery("m6"))
    await asyncio.wait_for(pub.publish("", q, b"", msg("m7")), 30)
    cons.ack(await inbox.delivery("m7"))
    assert cons.epoch == epoch and link.reconnects == reconnects and link.ready
    assert Counter(inbox.ids()) == {
        "m1": 2,
        "m2": 1,
        "m3": 2,
        "mx": 2,
        "m4": 1,
        "m5": 1,
        "m6": 1,
        "m7": 1,
    }

    await link.close()
    # m5 alone comes back (the stale ack of tag 4 did not take it); nothing dead-lettered
    assert await queue_counts(amqp, q) == (1, 0)
    assert await queue_counts(amqp, dead) == (0, 0)


# -- disruptive: these two disturb every other test on the broker; keep them last ---------


def _watermark_now() -> list[str]:
    """The arguments of set_vm_memory_high_watermark that restore the current setting."""
    status = json.loads(rabbitmqctl("status", "--formatter", "json"))
    setting = status.get("vm_memory_high_watermark_setting") or {}
    if "absolute" in setting:
        return ["absolute", str(setting["absolute"])]
    relative = setting.get("relative")
    if isinstance(relative, int | float) and relative >= 0.1:
        return [str(relative)]
    return ["0.4"]  # unknown, or a test left it tiny


@pytest.mark.slow
async def test_memory_alarm_holds_publishes_until_lifted(
    broker_url: str, names: Names, links: Links
) -> None:
    require_cli(broker_url)
    q = names.queue("alarm")
    link = links.new(broker_url, "alarm")
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    consumer(link, QueueSpec(q), inbox, declare=True)
    await link.start()
    restore = await asyncio.to_thread(_watermark_now)

    futs: list[asyncio.Future[None]] = []

    def publish() -> None:
        futs.append(pub.publish("", q, b"", msg(str(len(futs)))))

    try:
        await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", "0.0000001")
        # the broker blocks the connection at its next publish, and says so
        async with asyncio.timeout(30):
            while link.blocked is None:
                publish()
                await asyncio.sleep(0.05)
        assert not link.can_publish
        for _ in range(200):
            publish()
        await asyncio.sleep(0)
        assert pub.queued >= 200  # held back, not written
        assert not any(f.done() and f.exception() is not None for f in futs)
    finally:
        await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", *restore)

    await until(lambda: link.blocked is None, "connection.unblocked", 60)
    async with asyncio.timeout(60):
        await asyncio.gather(*futs)  # every one confirmed
    await inbox.wait(len(futs), 60)
    assert inbox.ids() == [str(i) for i in range(len(futs))]  # once each, in order
    assert link.reconnects == 0


async def _port_accepts(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return


@pytest.mark.slow
async def test_broker_restart_reconnects_and_consumes_again(
    broker_url: str, names: Names, links: Links
) -> None:
    require_cli(broker_url)
    q = names.queue("restart")
    link = links.new(broker_url, "restart", retry_max_s=1.0)
    pub = Publisher(link, name="pub")
    inbox = Inbox()
    spec = QueueSpec(q, durable=True, arguments={"x-queue-type": "quorum"})
    cons = consumer(link, spec, inbox, declare=True)
    await link.start()
    await asyncio.wait_for(pub.publish("", q, b"", msg("before")), 30)
    await inbox.wait_ids({"before"})

    parts = urlsplit(broker_url)
    during: asyncio.Future[None] | None = None
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app", timeout=120)
        await until(lambda: not link.connected, "the link seeing the broker go", 30)
        during = pub.publish("", q, b"", msg("during"))  # waits for the broker
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app", timeout=120)
        await asyncio.to_thread(rabbitmqctl, "await_startup", timeout=120)
        await _port_accepts(parts.hostname or "127.0.0.1", parts.port or 5672, 60)

    await until(lambda: link.ready, "the link reconnected and consuming", 60)
    assert link.reconnects >= 1 and cons.consuming
    assert during is not None
    await asyncio.wait_for(during, 30)
    await asyncio.wait_for(pub.publish("", q, b"", msg("after")), 30)
    await inbox.wait_ids({"during", "after"})
