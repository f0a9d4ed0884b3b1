"""What gateway replicas tell each other: per-server counts and sticky records.

Two channels, because the two kinds of news age differently:

* **Counts** (fanout exchange ``<servers_exchange>.peers``, one exclusive queue per replica,
  transient messages with a TTL). Each replica publishes its whole per-server table of live
  clients, with its instance, a boot id, a sequence number and its wall-clock send time,
  ``peer_debounce_s`` after a change and at least every ``peer_report_s``. A receiver keeps
  the latest report of each replica (an older sequence number of the same boot is
  ignored) and forgets a replica that has been silent for ``peer_ttl_s`` (killed -9) or that
  said ``leave`` (stopped). Only the latest report matters, so nothing is stored.
* **Sticky records** (stream ``<servers_exchange>.sticky``). Each replica appends
  ``[client_id, server, wall time]`` when a client with a ``client_id`` is welcomed, when it
  goes, and every third of ``sticky_retention_s`` for the ones still connected, batched per
  report. Every replica consumes the stream; a replica that starts (or restarts on an
  empty disk) reads it from ``now - sticky_retention_s`` and, before it opens its listener,
  waits (up to ``peer_catchup_s``) for a marker it appended itself, so it has read what was
  there when it started. A stream, unlike a queue, keeps its messages for every consumer
  and for consumers that come later, and is plain RabbitMQ (3.9+). Its size is bounded by
  ``x-max-age`` (twice the retention) and ``sticky_stream_max_bytes``.

Both are best effort: a lost report is replaced by the next one, a lost sticky record costs
that client its stickiness, never a message. Times cross hosts as wall-clock seconds and are
turned into this process's monotonic clock on arrival (clamped, so a skewed clock cannot
make news from the future).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from bridge.amqp import declare_exchange
from workers.gateway.config import SERVER_ID_RE
from workers.gateway.session import OPEN

if TYPE_CHECKING:
    from bridge.amqp import Broker
    from workers.gateway.worker import GatewayWorker

log = logging.getLogger("bridge.gateway")

OP_COUNTS = "counts"
OP_LEAVE = "leave"
OP_STICKY = "sticky"
OP_MARKER = "marker"
MAX_CLIENT_ID = 4096  # a HELLO is at most max_hello_frame bytes anyway
CHUNK = 1000  # sticky records per stream message
MAX_PENDING = 100_000  # sticky records waiting for the broker; older ones are dropped


class PeerMessageError(ValueError):
    pass


def parse_counts(doc: Any) -> dict[str, int]:
    counts = doc.get("counts")
    if not isinstance(counts, dict):
        raise PeerMessageError("counts is not an object")
    out: dict[str, int] = {}
    for server, n in counts.items():
        if not isinstance(server, str) or not SERVER_ID_RE.match(server):
            raise PeerMessageError(f"bad server id {server!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PeerMessageError(f"bad count {n!r}")
        out[server] = n
    return out


def parse_sticky(doc: Any) -> list[tuple[str, str, float]]:
    records = doc.get("records")
    if not isinstance(records, list):
        raise PeerMessageError("records is not an array")
    out: list[tuple[str, str, float]] = []
    for record in records:
        if not isinstance(record, list) or len(record) != 3:
            raise PeerMessageError("a record is not [client_id, server, time]")
        client_id, server, at = record
        if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID:
            raise PeerMessageError("bad client_id")
        if not isinstance(server, str) or not SERVER_ID_RE.match(server):
            raise PeerMessageError(f"bad server id {server!r}")
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            raise PeerMessageError("bad time")
        out.append((client_id, server, float(at)))
    return out


def to_monotonic(wall: float, *, wall_now: float, mono_now: float, max_age: float) -> float:
    """A wall-clock time from another host on this process's monotonic clock, never in
    the future and never older than ``max_age``."""
    age = min(max(0.0, wall_now - wall), max_age)
    return mono_now - age


class Peers:
    """Count reports and sticky records, sent and received, for one replica."""

    def __init__(self, worker: GatewayWorker) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.boot = uuid.uuid4().hex[:16]
        self.seq = 0
        self.pending: deque[tuple[str, str, float]] = deque()
        self.dropped = 0
        self.caught_up = asyncio.Event()
        self._changed = asyncio.Event()
        self._last_seq: dict[str, tuple[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._offset: int | None = None  # next stream offset to read (after a reconnect)
        self._underlay: Any = None
        self._consumer_tag: str | None = None
        self._last_refresh = time.monotonic()
        self._exchange: AbstractExchange | None = None
        self._channel: AbstractChannel | None = None
        self._stream_channel: AbstractChannel | None = None
        self._marker = ""
        self.stream_ok = False
        self._broker: Broker | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, broker: Broker) -> None:
        s = self.settings
        self._broker = broker
        self._channel = await broker.channel(confirms=True)
        self._exchange = await declare_exchange(self._channel, s.peers_exchange_name, "fanout")
        queue = await self._channel.declare_queue(
            s.peers_queue,
            exclusive=True,
            auto_delete=True,
            arguments={
                # Only the latest report of each replica counts; older ones are noise.
                "x-message-ttl": max(1, round(s.peer_ttl_s * 1000)),
                "x-max-length": 10_000,
            },
        )
        await queue.bind(self._exchange, routing_key="")
        await queue.consume(self._on_report, no_ack=True)

        self._stream_channel = await broker.channel(confirms=False)
        self.stream_ok = await self._declare_stream(broker)
        if self.stream_ok:
            try:
                await self.ensure_consuming()
                self._marker = uuid.uuid4().hex
                await self._publish_stream({"op": OP_MARKER, "marker": self._marker})
                await asyncio.wait_for(self.caught_up.wait(), s.peer_catchup_s)
            except TimeoutError:
                log.warning(
                    "sticky records of the other replicas not read within peer_catchup_s; "
                    "starting anyway (reconnecting clients may change server)",
                    extra={"stream": s.sticky_stream_name, "wait_s": s.peer_catchup_s},
                )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-peers")

    async def _declare_stream(self, broker: Broker) -> bool:
        s = self.settings
        name = s.sticky_stream_name
        arguments: dict[str, Any] = {
            "x-queue-type": "stream",
            "x-max-age": f"{s.sticky_stream_max_age_s}s",
            "x-max-length-bytes": s.sticky_stream_max_bytes,
            "x-stream-max-segment-size-bytes": 4 * 1024 * 1024,
        }
        channel = await broker.channel(confirms=False)
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
            return True
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # Declared by a replica with another retention: it exists, use it as it is.
            log.warning(
                "sticky stream exists with other arguments; using it as it is",
                extra={"stream": name, "detail": str(exc)[:200]},
            )
            return True
        except aiormq.exceptions.AMQPError as exc:
            log.error(
                "sticky stream cannot be declared (RabbitMQ 3.9+ with the stream_queue "
                "feature flag is needed); sticky client_ids stay local to each replica",
                extra={"stream": name, "error": str(exc)[:200]},
            )
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        """Publish what is pending, say goodbye, stop consuming (best effort, bounded)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publish(leaving=True), 3.0)
        underlay, tag = self._underlay, self._consumer_tag
        self._underlay = self._consumer_tag = None
        if underlay is not None and tag is not None and not underlay.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(underlay.basic_cancel(tag), 2.0)
        for channel in (self._channel, self._stream_channel):
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()

    # -- what this replica says --------------------------------------------------------

    def changed(self) -> None:
        """Counts changed: report them within the debounce."""
        self._changed.set()

    def note(self, client_id: str, server: str) -> None:
        """``client_id`` is with ``server`` now (welcomed, or just gone)."""
        if not self.stream_ok:
            return
        self.pending.append((client_id, server, time.time()))
        if len(self.pending) > MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
        self._changed.set()

    async def _run(self) -> None:
        s = self.settings
        last_report = time.monotonic()
        failures = 0
        while True:
            wait = max(0.0, last_report + s.peer_report_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
            if s.peer_debounce_s:
                await asyncio.sleep(s.peer_debounce_s)  # let a burst of changes gather
            self._changed.clear()
            last_report = time.monotonic()
            try:
                if self.stream_ok:
                    await asyncio.wait_for(self.ensure_consuming(), s.peer_ttl_s)
                await asyncio.wait_for(self.publish(), s.peer_ttl_s)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("peer report not sent", extra={"error": str(exc)[:200]})

    async def publish(self, *, leaving: bool = False) -> None:
        s = self.settings
        worker = self.worker
        mono = time.monotonic()
        if self.stream_ok and mono - self._last_refresh >= max(1.0, s.sticky_retention_s / 3):
            # Records of long-lived connections would age out of the other replicas' view.
            self._last_refresh = mono
            wall = time.time()
            for session in list(worker.sessions.values()):
                if session.state == OPEN and session.client_id and session.server:
                    self.pending.append((session.client_id, session.server, wall))
        while self.pending:
            chunk = [self.pending.popleft() for _ in range(min(CHUNK, len(self.pending)))]
            try:
                await self._publish_stream({"op": OP_STICKY, "records": [list(r) for r in chunk]})
            except BaseException:
                self.pending.extendleft(reversed(chunk))
                raise
        self.seq += 1
        doc: dict[str, Any] = {
            "v": 1,
            "op": OP_LEAVE if leaving else OP_COUNTS,
            "replica": s.instance,
            "boot": self.boot,
            "seq": self.seq,
            "sent": time.time(),
        }
        if not leaving:
            doc["counts"] = {k: n for k, n in worker.balancer.counts().items() if n}
        assert self._exchange is not None
        await self._exchange.publish(
            aio_pika.Message(
                json.dumps(doc, separators=(",", ":")).encode(),
                content_type="application/json",
                expiration=s.peer_ttl_s,
            ),
            routing_key="",
        )

    async def _publish_stream(self, doc: dict[str, Any]) -> None:
        assert self._channel is not None
        doc = {"v": 1, "replica": self.settings.instance, "boot": self.boot, **doc}
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(doc, separators=(",", ":")).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.settings.sticky_stream_name,
        )

    # -- what the others say -----------------------------------------------------------

    async def _on_report(self, message: AbstractIncomingMessage) -> None:
        metrics = self.worker.metrics.peer_messages
        try:
            doc = json.loads(message.body)
            if not isinstance(doc, dict):
                raise PeerMessageError("not an object")
            replica, boot, seq, op = doc["replica"], doc["boot"], doc["seq"], doc["op"]
            if not isinstance(replica, str) or not isinstance(boot, str):
                raise PeerMessageError("replica and boot must be strings")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise PeerMessageError("seq must be an integer")
            if op not in (OP_COUNTS, OP_LEAVE):
                raise PeerMessageError(f"unknown op {op!r}")
            counts = parse_counts(doc) if op == OP_COUNTS else {}
            sent = doc.get("sent")
            if op == OP_COUNTS and (not isinstance(sent, int | float) or isinstance(sent, bool)):
                raise PeerMessageError("sent must be a number")
        except (ValueError, KeyError, TypeError) as exc:
            metrics.labels("malformed").inc()
            log.warning(
                "malformed message on the peers exchange ignored",
                extra={"error": str(exc)[:200], "body": message.body[:200]},
            )
            return
        if replica == self.settings.instance:
            return  # our own (this boot, or a previous one: our live counts are the truth)
        last = self._last_seq.get(replica)
        if last is not None and last[0] == boot and seq <= last[1]:
            metrics.labels("stale").inc()
            return
        metrics.labels(op).inc()
        balancer = self.worker.balancer
        if op == OP_LEAVE:
            self._last_seq.pop(replica, None)
            balancer.forget_replica(replica)
            log.info("gateway replica left", extra={"replica": replica})
            return
        self._last_seq[replica] = (boot, seq)
        mono = time.monotonic()
        sent_at = to_monotonic(
            float(sent or 0.0),
            wall_now=time.time(),
            mono_now=mono,
            max_age=self.settings.peer_ttl_s,
        )
        balancer.set_remote_counts(replica, counts, mono, sent_at=sent_at)

    async def ensure_consuming(self) -> bool:
        """Consume the sticky stream on the channel's current underlying channel, from
        where we left off (or from the retention window at the first start)."""
        assert self._stream_channel is not None
        underlay = await self._stream_channel.get_underlay_channel()
        if underlay is self._underlay and not underlay.is_closed:
            if self._consumer_tag in underlay.consumers:
                return False
            # The broker cancelled the consumer (someone deleted the stream): declare it
            # again and read on from where we were.
            log.warning("sticky stream consumer cancelled by the broker; consuming again")
            self._offset = None  # a new stream numbers from 0 again
            if self._broker is not None and not await self._declare_stream(self._broker):
                return False
        offset: Any
        if self._offset is not None:
            offset = self._offset
        else:
            start = time.time() - self.settings.sticky_retention_s - 1
            offset = datetime.datetime.fromtimestamp(start, tz=datetime.UTC)
        await underlay.basic_qos(prefetch_count=64)
        ok = await underlay.basic_consume(
            self.settings.sticky_stream_name,
            self._on_stream,
            no_ack=False,
            arguments={"x-stream-offset": offset},
        )
        self._underlay, self._consumer_tag = underlay, ok.consumer_tag
        return True

    async def _on_stream(self, message: DeliveredMessage) -> None:
        try:
            self._apply_stream(message)
        finally:
            tag = message.delivery_tag
            if tag is not None and not message.channel.is_closed:
                await message.channel.basic_ack(tag)

    def _apply_stream(self, message: DeliveredMessage) -> None:
        metrics = self.worker.metrics.peer_messages
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._offset = offset + 1
        try:
            doc = json.loads(message.body)
            if not isinstance(doc, dict):
                raise PeerMessageError("not an object")
            op, boot = doc["op"], doc["boot"]
            if op == OP_MARKER:
                if boot == self.boot and doc.get("marker") == self._marker:
                    self.caught_up.set()
                return
            if op != OP_STICKY:
                raise PeerMessageError(f"unknown op {op!r}")
            records = parse_sticky(doc)
        except (ValueError, KeyError, TypeError) as exc:
            metrics.labels("malformed").inc()
            log.warning(
                "malformed message on the sticky stream ignored",
                extra={"error": str(exc)[:200], "body": message.body[:200]},
            )
            return
        if boot == self.boot:
            return  # ours: already in the balancer
        metrics.labels(OP_STICKY).inc()
        balancer = self.worker.balancer
        wall, mono = time.time(), time.monotonic()
        retention = self.settings.sticky_retention_s
        for client_id, server, at in records:
            balancer.learn_sticky(
                client_id,
                server,
                to_monotonic(at, wall_now=wall, mono_now=mono, max_age=retention + 1),
                mono,
            )
