"""What gateway replicas tell each other: per-server counts and sticky records.

Two channels, because the two kinds of news age differently:

* **Counts** (fanout exchange ``<servers_exchange>.peers``, one exclusive queue per replica,
  transient messages with a TTL). Each replica publishes its whole per-server table of live
  clients, with its instance, a boot id, a sequence number and its wall-clock send time,
  ``peer_debounce_s`` after a change and at least every ``peer_report_s``. A receiver keeps
  the latest report of each replica (an older sequence number of the same boot is
  ignored) and forgets a replica that has been silent for ``peer_ttl_s`` (killed -9) or that
  said ``leave`` (stopped). Only the latest report matters, so nothing is stored. Two
  notices go the same way, unnumbered in effect (never stale): ``offline`` (a reply was
  kept for a client_id) and ``claim`` (a proven client_id was admitted; the replica that
  holds an older connection of it closes it, see :mod:`workers.gateway.auth`).
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

Declarations and the reports' consumer are on aio-pika channels of the host's connection;
the stream is consumed, and everything is published, on the gateway's data-path
:class:`~bridge.amqp.link.Link` (a publisher of its own, so that a deleted peers exchange
closes that channel, not the one client messages are published on). The link consumes
the stream again after a reconnect, from the offset after the last record read, and
declares it again if it is deleted under the gateway (then from the retention window).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aio_pika.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bridge.amqp import declare_exchange
from bridge.amqp.consumer import Consumer, Lease, QueueSpec
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from workers.gateway.hub import GatewayHub
from workers.gateway.peer_messages import (
    PeerMessageError,
    parse_claim,
    parse_client_id,
    parse_counts,
    parse_sticky,
    to_monotonic,
)
from workers.gateway.session import OPEN

if TYPE_CHECKING:
    from bridge.amqp import Broker

log = logging.getLogger("bridge.gateway")

OP_COUNTS = "counts"
OP_LEAVE = "leave"
OP_STICKY = "sticky"
OP_MARKER = "marker"
OP_OFFLINE = "offline"  # a reply was kept for an offline client_id (workers/gateway/offline)
OP_CLAIM = "claim"  # a proven client_id was admitted (workers/gateway/auth.py)
CHUNK = 1000  # sticky records per stream message
MAX_PENDING = 100_000  # sticky records waiting for the broker; older ones are dropped
STREAM_PREFETCH = 64  # a stream consumer needs one; records come in chunks of CHUNK


class _StreamConsumer(Consumer):
    """The sticky stream's consumer: each time it (re)subscribes it asks for the offset to
    read from, which moves on with every record read."""

    def __init__(self, peers: Peers, link: Link, spec: QueueSpec, lease: Lease | None) -> None:
        self.peers = peers
        super().__init__(
            link,
            spec,
            peers.on_stream,
            prefetch=STREAM_PREFETCH,
            name=f"consumer {spec.name}",
            lease=lease,  # read by the replica that serves the instance only
        )

    async def setup(self) -> None:
        if self.cancelled_by_broker:
            # someone deleted the stream: the one declared again numbers from 0 again
            self.peers.stream_restarted()
        self.arguments = {"x-stream-offset": self.peers.read_from()}
        await super().setup()


class Peers:
    """Count reports and sticky records, sent and received, for one replica."""

    def __init__(self, hub: GatewayHub) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.boot = uuid.uuid4().hex[:16]
        self.seq = 0
        self.pending: deque[tuple[str, str, float]] = deque()
        self.dropped = 0
        self.caught_up = asyncio.Event()
        self._changed = asyncio.Event()
        self._last_seq: dict[str, tuple[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._offset: int | None = None  # next stream offset to read (after a reconnect)
        self._last_refresh = time.monotonic()
        self._channel: AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._stream: _StreamConsumer | None = None
        self._marker = ""
        self.stream_ok = False
        # told when another replica kept a reply for a client_id (it may be connected here)
        self.on_offline: Callable[[str], None] | None = None
        # told when another replica admitted a proven client_id (client_id, stamp, replica)
        self.on_claim: Callable[[str, int, str], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def attach(self, broker: Broker, link: Link, lease: Lease | None = None) -> None:
        """Before the link starts: a publisher of our own on it, and the stream (declared
        here, on aio-pika) with its consumer (consuming while ``lease`` is held)."""
        s = self.settings
        self._publisher = Publisher(link, name="gateway peers", window=64, timeout=s.peer_ttl_s)
        self.stream_ok = await self._declare_stream(broker)
        if self.stream_ok:
            spec = QueueSpec(s.sticky_stream_name, durable=True, arguments=self._stream_arguments())
            self._stream = _StreamConsumer(self, link, spec, lease)

    async def start(self, broker: Broker) -> None:
        """Once the link is up: this replica's report queue, consumed (aio-pika); the
        stream read up to now (bounded by peer_catchup_s); then report."""
        s = self.settings
        self._channel = await broker.channel(confirms=False)
        exchange = await declare_exchange(self._channel, s.peers_exchange_name, "fanout")
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
        await queue.bind(exchange, routing_key="")
        await queue.consume(self._on_report, no_ack=True)

        assert self._publisher is not None
        self._publisher.start_expiry()
        if self.stream_ok:
            try:
                self._marker = uuid.uuid4().hex
                await asyncio.wait_for(
                    self._publish_stream({"op": OP_MARKER, "marker": self._marker}),
                    s.peer_catchup_s,
                )
                await asyncio.wait_for(self.caught_up.wait(), s.peer_catchup_s)
            except TimeoutError:
                log.warning(
                    "sticky records of the other replicas not read within peer_catchup_s; "
                    "starting anyway (reconnecting clients may change server)",
                    extra={"stream": s.sticky_stream_name, "wait_s": s.peer_catchup_s},
                )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-peers")

    def _stream_arguments(self) -> dict[str, Any]:
        s = self.settings
        return {
            "x-queue-type": "stream",
            "x-max-age": f"{s.sticky_stream_max_age_s}s",
            "x-max-length-bytes": s.sticky_stream_max_bytes,
            "x-stream-max-segment-size-bytes": 4 * 1024 * 1024,
        }

    async def _declare_stream(self, broker: Broker) -> bool:
        name = self.settings.sticky_stream_name
        channel = await broker.channel(confirms=False)
        try:
            await channel.declare_queue(name, durable=True, arguments=self._stream_arguments())
            return True
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            # Declared by a replica with another retention: it exists, use it as it is.
            log.warning(
                "sticky stream exists with other arguments; using it as it is",
                extra={"stream": name, "detail": str(exc)[:200]},
            )
            return True
        except aio_pika.exceptions.AMQPError as exc:
            log.error(
                "sticky stream cannot be declared (RabbitMQ 3.9+ with the stream_queue "
                "feature flag is needed); sticky client_ids stay local to each replica",
                extra={"stream": name, "error": str(exc)[:200]},
            )
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def read_from(self) -> int | datetime.datetime:
        """Where the stream's consumer starts: after the last record read, or at the
        retention window at the first start."""
        if self._offset is not None:
            return self._offset
        start = time.time() - self.settings.sticky_retention_s - 1
        return datetime.datetime.fromtimestamp(start, tz=datetime.UTC)

    def stream_restarted(self) -> None:
        log.warning("sticky stream consumer cancelled by the broker; declaring it again")
        self._offset = None

    async def close(self, timeout: float = 3.0) -> None:
        """Publish what is pending, say goodbye, stop consuming (best effort, bounded)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publish(leaving=True), timeout)
        if self._stream is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stream.cancel(), 1.0)
        if self._publisher is not None:
            self._publisher.stop_expiry()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()

    # -- what this replica says --------------------------------------------------------

    def associated(self, client_id: str | None, server: str) -> None:
        """A client was associated with ``server`` or released from it (the hub's
        ``on_association``): counts changed, and a ``client_id``'s sticky record too."""
        self.changed()
        if client_id is not None:
            self.note(client_id, server)

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
        hub = self.hub
        mono = time.monotonic()
        if self.stream_ok and mono - self._last_refresh >= max(1.0, s.sticky_retention_s / 3):
            # Records of long-lived connections would age out of the other replicas' view.
            self._last_refresh = mono
            wall = time.time()
            for session in list(hub.sessions.values()):
                if session.state == OPEN and session.sticky_id and session.server:
                    self.pending.append((session.sticky_id, session.server, wall))
        while self.pending:
            chunk = [self.pending.popleft() for _ in range(min(CHUNK, len(self.pending)))]
            try:
                await self._publish_stream({"op": OP_STICKY, "records": [list(r) for r in chunk]})
            except BaseException:
                self.pending.extendleft(reversed(chunk))
                raise
        fields: dict[str, Any] = {"sent": time.time()}
        if not leaving:
            fields["counts"] = {k: n for k, n in hub.balancer.counts().items() if n}
        await self._report(OP_LEAVE if leaving else OP_COUNTS, fields)

    def offline_kept(self, client_id: str) -> None:
        """A reply was kept for ``client_id``: tell the replica where it may be connected
        (all of them: fanout). Best effort, as the reports: a lost one leaves the reply in
        its queue until the client connects again."""
        self._notice(OP_OFFLINE, {"client_id": client_id})

    def claimed(self, client_id: str, session: str, at: int) -> None:
        """A connection proved ``client_id`` here (stamp ``at``, wall-clock ms): tell every
        replica, so that one holding an older connection of that id closes it. Best effort,
        as the reports (docs/gateway.md, "Client identities")."""
        self._notice(OP_CLAIM, {"client_id": client_id, "session": session, "at": at})

    def _notice(self, op: str, fields: dict[str, Any]) -> None:
        if self._publisher is not None and self._channel is not None:
            self._report(op, fields).add_done_callback(_ignored)

    def _report(self, op: str, fields: dict[str, Any]) -> asyncio.Future[None]:
        """One message on the peers exchange, numbered: transient, expiring with the
        report's usefulness; not mandatory (no replica but this one may be listening)."""
        s = self.settings
        self.seq += 1
        doc = {"v": 1, "op": op, "replica": s.instance, "boot": self.boot, "seq": self.seq}
        assert self._publisher is not None
        return self._publisher.publish(
            s.peers_exchange_name,
            "",
            json.dumps({**doc, **fields}, separators=(",", ":")).encode(),
            Properties(
                content_type="application/json",
                expiration=str(max(1, int(s.peer_ttl_s * 1000))),
            ),
            mandatory=False,
        )

    async def _publish_stream(self, doc: dict[str, Any]) -> None:
        assert self._publisher is not None
        doc = {"v": 1, "replica": self.settings.instance, "boot": self.boot, **doc}
        await self._publisher.publish(
            "",
            self.settings.sticky_stream_name,
            json.dumps(doc, separators=(",", ":")).encode(),
            _STREAM_PROPERTIES,
        )

    # -- what the others say -----------------------------------------------------------

    async def _on_report(self, message: AbstractIncomingMessage) -> None:
        metrics = self.hub.metrics.peer_messages
        try:
            doc = json.loads(message.body)
            if not isinstance(doc, dict):
                raise PeerMessageError("not an object")
            replica, boot, seq, op = doc["replica"], doc["boot"], doc["seq"], doc["op"]
            if not isinstance(replica, str) or not isinstance(boot, str):
                raise PeerMessageError("replica and boot must be strings")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise PeerMessageError("seq must be an integer")
            if op not in (OP_COUNTS, OP_LEAVE, OP_OFFLINE, OP_CLAIM):
                raise PeerMessageError(f"unknown op {op!r}")
            client_id = parse_client_id(doc) if op == OP_OFFLINE else None
            claim = parse_claim(doc) if op == OP_CLAIM else None
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
        if op == OP_OFFLINE:
            metrics.labels(op).inc()
            if self.on_offline is not None and client_id is not None:
                self.on_offline(client_id)
            return
        if claim is not None:
            metrics.labels(op).inc()
            if self.on_claim is not None:
                self.on_claim(claim[0], claim[2], replica)
            return
        last = self._last_seq.get(replica)
        if last is not None and last[0] == boot and seq <= last[1]:
            metrics.labels("stale").inc()
            return
        metrics.labels(op).inc()
        balancer = self.hub.balancer
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

    def on_stream(self, delivery: Delivery) -> None:
        try:
            self._apply_stream(delivery)
        finally:
            if self._stream is not None:
                self._stream.ack(delivery)

    def _apply_stream(self, message: Delivery) -> None:
        metrics = self.hub.metrics.peer_messages
        headers = message.headers or {}
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
        balancer = self.hub.balancer
        wall, mono = time.time(), time.monotonic()
        retention = self.settings.sticky_retention_s
        for client_id, server, at in records:
            balancer.learn_sticky(
                client_id,
                server,
                to_monotonic(at, wall_now=wall, mono_now=mono, max_age=retention + 1),
                mono,
            )


def _ignored(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a lost notice costs a delay, not a reply


_STREAM_PROPERTIES = Properties(content_type="application/json", delivery_mode=2).encode()
