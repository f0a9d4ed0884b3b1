"""Offline replies: what a server answers a sticky client that is not connected is kept in
RabbitMQ and written to it when it connects again, through any replica (docs/gateway.md,
"Offline replies").

Keeping. A reply whose session is no longer open (:class:`~workers.gateway.replies.Replies`
would keep it in ``gateway.undeliverable`` as ``session_gone``) is kept instead when that
session had a ``client_id``: this replica remembers the ``client_id`` of its sessions that
ended (for ``offline_ttl_s``), and, through its store (:attr:`seen`, saved by the
:class:`~workers.gateway.housekeeping.Housekeeper`), those of a previous run of the same
instance that was killed: their replies waited in its reply queue. It goes, in the order the replies came, to the client's
durable classic queue ``gateway.offline.<client_id>`` (declared by the replica that keeps
the first reply, again when its declaration is older than half the TTL): ``x-max-length``
``offline_max_messages`` with ``x-overflow: reject-publish`` (a reply beyond it is
refused by the broker and kept in ``gateway.undeliverable`` as ``offline_overflow``),
``x-message-ttl`` ``offline_ttl_s`` and dead-lettering to the headers exchange
``gateway.offline``, which routes to ``gateway.undeliverable`` what carries
``x-dead-reason: offline_expired`` (set on every kept reply, so an expired one arrives
there with it and the broker's ``x-death``); ``x-expires`` twice the TTL removes a queue
nobody uses. Once kept, the replica where the client is connected (if it is) is told: this
one directly, the others through the peers exchange (op ``offline``).

Delivering. A session with a ``client_id`` is welcomed, but its ``connect`` waits (the
hub's pump holds it, :attr:`Session.held`) while this module publishes a marker to the
client's offline queue, ``mandatory``: returned, there is no queue and nothing kept, the
session goes on. Routed (or refused: the queue is full), the queue is consumed on the
:class:`~workers.gateway.offline_reader.OfflineReader` channel, each reply written to the
socket and then acknowledged, until the marker comes through: everything kept before the
client came back is written before the server hears of the new session, so before any new
reply. The consume stays while the session is open (a reply to the old session that comes
late is written when it is kept), and ends with it (what was not written goes back to the
queue). A session whose own reading is done that receives another session's marker gives
the queue over: a newer connection of the same client_id (through another replica, before
its claim closed this one) is waiting for that marker, so it goes back to the queue and
this session stops reading.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import aio_pika.exceptions
from aio_pika.abc import AbstractChannel

from bridge.amqp import header_str
from bridge.amqp.frames import Delivery, Properties
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from bridge.errors import PublishFailed
from workers.gateway.config import (
    DEAD_OFFLINE_EXPIRED,
    DEAD_OFFLINE_FAILED,
    DEAD_OFFLINE_OVERFLOW,
    H_CLIENT_ID,
    H_CLOSE,
    H_DEAD_REASON,
    H_OFFLINE_MARKER,
    H_SESSION,
    GatewaySettings,
)
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.offline_reader import OfflineReader, Subscription
from workers.gateway.session import OPEN, Session

log = logging.getLogger("bridge.gateway")

MAX_REMEMBERED = 100_000  # ended sessions whose client_id is remembered; oldest forgotten
PREFETCH = 64  # offline replies on their way to one client
DRAIN_TIMEOUT_S = 10.0  # a new session waits at most this long for its offline replies
MARKER_TTL_MS = 60_000  # a marker left behind by a replica that died goes with it
REFUSED_RETRY_S = 0.05  # the queue was full when the marker came: try again this soon

Dead = Callable[[Delivery, str], None]


def _truthy(value: Any) -> bool:
    text = header_str(value) if isinstance(value, bytes | str) else None
    if text is not None:
        return text.strip().lower() in ("true", "1", "yes")
    return bool(value)


class _Restore:
    """A session's reading of its client's offline queue."""

    __slots__ = ("drained", "marker", "notified", "session", "sub")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.marker = uuid.uuid4().hex
        self.drained = asyncio.Event()
        self.notified = False  # a reply was kept while the marker was on its way
        self.sub: Subscription | None = None


class OfflineReplies:
    """Keeps replies for offline sticky clients and delivers them (see the module)."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        sessions: dict[str, Session],
        publisher: Publisher,
        channel: AbstractChannel,
        link: Link,
        pump: Callable[[Session], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sessions = sessions
        self.publisher = publisher
        self._channel = channel  # declarations (aio-pika, control plane)
        self.pump = pump
        self.dead: Dead | None = None  # keeps a reply in gateway.undeliverable (Replies)
        self.notify: Callable[[str], None] | None = None  # tells the other replicas (Peers)
        self.reader = OfflineReader(link, prefetch=PREFETCH, on_gone=self._gone)
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()  # sid -> client, until
        self.declared: OrderedDict[str, float] = OrderedDict()  # queue -> declared at
        self.waiting: dict[str, deque[tuple[Delivery, bytes, bytes]]] = {}  # queue -> to keep
        self.restores: dict[str, _Restore] = {}  # sid -> its reading of the offline queue
        self.by_client: dict[str, set[str]] = {}  # client_id -> sids open here
        self.seen: dict[str, str] = {}  # sid -> client_id, opened or ended since last saved
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        return self.settings.offline_max_messages > 0

    def queue_arguments(self) -> dict[str, Any]:
        s = self.settings
        ttl_ms = max(1, round(s.offline_ttl_s * 1000))
        return {
            "x-queue-type": "classic",
            "x-max-length": s.offline_max_messages,
            "x-overflow": "reject-publish",
            "x-message-ttl": ttl_ms,
            "x-dead-letter-exchange": s.offline_exchange,
            "x-expires": 2 * ttl_ms,
        }

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- keeping -----------------------------------------------------------------------

    def keep(self, delivery: Delivery) -> bool:
        """A reply for a session that is not open here: keep it for its client if the
        session had a ``client_id``. False: not kept (the caller goes on as before)."""
        if not self.enabled:
            return False
        headers = delivery.properties.headers or {}
        sid = header_str(headers.get(H_SESSION)) or ""
        session = self.sessions.get(sid)
        if session is not None:
            client_id = self.owner(session)
        else:
            remembered = self.ended.get(sid)
            client_id = remembered[0] if remembered is not None else None
        if not client_id:
            return False
        if _truthy(headers.get(H_CLOSE)) and not delivery.body:
            return False  # a close for a connection that is gone: nothing to keep
        headers = {k: v for k, v in headers.items() if k != H_CLOSE}
        headers[H_DEAD_REASON] = DEAD_OFFLINE_EXPIRED
        headers[H_CLIENT_ID] = client_id
        properties = delivery.properties.copy(
            headers=headers, delivery_mode=2, reply_to=None, user_id=None, cluster_id=None
        )
        queue = self.settings.offline_queue(client_id)
        item = (delivery, properties.encode(), client_id.encode())
        waiting = self.waiting.get(queue)
        if waiting is not None:
            waiting.append(item)  # behind the declaration, in order
            return True
        declared = self.declared.get(queue)
        if declared is not None and time.monotonic() - declared < self.settings.offline_ttl_s / 2:
            self._publish(queue, client_id, item, retry=True)
            return True
        self.waiting[queue] = deque([item])
        self._spawn(self._declare_and_keep(queue, client_id))
        return True

    async def _declare_and_keep(self, queue: str, client_id: str) -> None:
        failed: BaseException | None = None
        try:
            await self._channel.declare_queue(queue, durable=True, arguments=self.queue_arguments())
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            log.warning(
                "offline queue exists with other arguments; using it as it is",
                extra={"queue": queue, "detail": str(exc)[:200]},
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed = exc
        items = self.waiting.pop(queue, deque())
        if failed is not None:
            log.error(
                "offline queue cannot be declared; its replies go to the undeliverable queue",
                extra={"queue": queue, "error": str(failed)[:200]},
            )
            for delivery, _, _ in items:
                self._dead(delivery, DEAD_OFFLINE_FAILED)
            return
        self.declared[queue] = time.monotonic()
        self.declared.move_to_end(queue)
        while len(self.declared) > MAX_REMEMBERED:
            self.declared.popitem(last=False)
        for item in items:
            self._publish(queue, client_id, item, retry=True)

    def _publish(
        self, queue: str, client_id: str, item: tuple[Delivery, bytes, bytes], *, retry: bool
    ) -> None:
        delivery, properties, _ = item
        fut = self.publisher.publish("", queue, delivery.body, properties)
        fut.add_done_callback(functools.partial(self._kept, queue, client_id, item, retry))

    def _kept(
        self,
        queue: str,
        client_id: str,
        item: tuple[Delivery, bytes, bytes],
        retry: bool,
        fut: asyncio.Future[None],
    ) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        offline = self.metrics.offline
        if exc is None:
            offline.labels("kept").inc()
            self.arrived(client_id)
            if self.notify is not None:
                self.notify(client_id)
            return
        reason = exc.reason if isinstance(exc, PublishFailed) else "error"
        delivery = item[0]
        if reason == "unroutable" and retry:
            # the queue expired or was deleted since it was declared: once more, declared
            # (this reply may then come after later ones)
            self.declared.pop(queue, None)
            waiting = self.waiting.get(queue)
            if waiting is not None:
                waiting.append(item)
            else:
                self.waiting[queue] = deque([item])
                self._spawn(self._declare_and_keep(queue, client_id))
            return
        if reason == "nacked":
            offline.labels("overflow").inc()
            self._dead(delivery, DEAD_OFFLINE_OVERFLOW)
            return
        offline.labels("failed").inc()
        log.error(
            "offline reply could not be kept", extra={"queue": queue, "error": str(exc)[:200]}
        )
        self._dead(delivery, DEAD_OFFLINE_FAILED)

    def _dead(self, delivery: Delivery, reason: str) -> None:
        if self.dead is not None:
            self.dead(delivery, reason)

    # -- sessions ----------------------------------------------------------------------

    def owner(self, session: Session) -> str | None:
        """Whose offline replies a session takes and leaves: its proven client_id; with no
        identity configured (no token secret, no client_auth listener), the one it claimed
        (there is nothing to prove it with, as for stickiness)."""
        if session.client_id is not None:
            return session.client_id
        s = self.settings
        if s.client_token_secret is None and not s.client_auth_listeners:
            return session.hint
        return None

    def applies(self, session: Session) -> bool:
        return self.enabled and bool(self.owner(session))

    def restore(self, session: Session, server: str) -> None:
        """Welcome ``session`` (a client with a ``client_id``), holding its ``connect``
        until the replies kept for its client are written (see the module)."""
        client_id = self.owner(session)
        assert client_id is not None
        session.held = True
        session.welcome(server)
        self.by_client.setdefault(client_id, set()).add(session.sid)
        self.seen[session.sid] = client_id  # saved for a restart (Housekeeper.save)
        restore = self.restores[session.sid] = _Restore(session)
        self._spawn(self._restore(restore, client_id))

    async def _restore(self, restore: _Restore, client_id: str) -> None:
        session = restore.session
        queue = self.settings.offline_queue(client_id)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        try:
            placed = await asyncio.wait_for(
                self._mark(queue, restore.marker), max(0.0, deadline - time.monotonic())
            )
            if placed is None and not restore.notified:
                return  # no queue: nothing kept for this client
            if not await self._subscribe(restore, queue):
                return
            while placed is False and session.state == OPEN:  # full: room comes as we read
                await asyncio.sleep(REFUSED_RETRY_S)
                if time.monotonic() > deadline:
                    raise TimeoutError
                placed = await self._mark(queue, restore.marker)
            if placed:
                await asyncio.wait_for(
                    restore.drained.wait(), max(0.0, deadline - time.monotonic())
                )
        except TimeoutError:
            log.warning(
                "offline replies not all written within the wait; the session goes on",
                extra={"queue": queue, "session": session.sid, "wait_s": DRAIN_TIMEOUT_S},
            )
        except Exception as exc:  # the broker did not take the marker (link down, ...)
            log.warning(
                "offline replies could not be read; the session goes on",
                extra={"queue": queue, "session": session.sid, "error": str(exc)[:200]},
            )
        finally:
            self._release(session)

    async def _mark(self, queue: str, marker: str) -> bool | None:
        """Publish the marker: True placed, False refused (the queue is full), None
        returned (there is no such queue)."""
        properties = Properties(headers={H_OFFLINE_MARKER: marker}, expiration=str(MARKER_TTL_MS))
        try:
            await self.publisher.publish("", queue, b"", properties)
        except PublishFailed as exc:
            if exc.reason == "unroutable":
                return None
            if exc.reason == "nacked":
                return False
            raise
        return True

    async def _subscribe(self, restore: _Restore, queue: str) -> bool:
        if restore.sub is not None:
            return True
        session = restore.session
        if session.state != OPEN:
            return False
        sub = restore.sub = Subscription(
            session.sid, queue, functools.partial(self._deliver, restore)
        )
        ok = await self.reader.subscribe(sub)
        if not ok:
            restore.sub = None
        return ok

    def _release(self, session: Session) -> None:
        if session.held:
            session.held = False
            self.pump(session)

    def _deliver(self, restore: _Restore, delivery: Delivery) -> None:
        headers = delivery.properties.headers or {}
        marker = headers.get(H_OFFLINE_MARKER)
        if marker is not None:  # never written to a client
            if header_str(marker) == restore.marker:
                self.reader.settle(delivery, ok=True)
                restore.drained.set()
            elif not restore.session.held and restore.sub is not None:
                # Another session's, once ours is read: a newer connection of this client_id (on
                # another replica, whose claim has not closed this one yet) reads the queue
                # now. The marker goes back for it, and this session stops reading (until
                # the next reply kept for it, see arrived).
                self.reader.settle(delivery, ok=False)
                self.reader.unsubscribe(restore.sub)
                restore.sub = None
            else:
                self.reader.settle(delivery, ok=True)  # left by an older session: dropped
            return
        session = restore.session
        if session.state != OPEN:
            self.reader.settle(delivery, ok=False)  # back to the queue, for the next session
            return
        session.send_data(delivery.body)
        self.reader.settle(delivery, ok=True)
        self.metrics.offline.labels("delivered").inc()

    def _gone(self, sub: Subscription) -> None:
        """The broker cancelled a consume (the queue was deleted): stop waiting for it."""
        restore = self.restores.get(sub.key)
        if restore is not None and restore.sub is sub:
            restore.sub = None
            restore.drained.set()

    def arrived(self, client_id: str) -> None:
        """A reply was kept for ``client_id`` (here or by another replica): its sessions
        open here read the queue, if they do not already."""
        for sid in self.by_client.get(client_id, ()):
            restore = self.restores.get(sid)
            if restore is None or restore.sub is not None:
                continue
            restore.notified = True
            if not restore.session.held:  # else its restore subscribes once the marker is back
                queue = self.settings.offline_queue(client_id)
                self._spawn(self._subscribe(restore, queue))

    def session_ended(self, session: Session) -> None:
        """The hub lost ``session``: stop reading for it, remember its client_id."""
        client_id = self.owner(session)
        if not client_id or not self.enabled:
            return
        sids = self.by_client.get(client_id)
        if sids is not None:
            sids.discard(session.sid)
            if not sids:
                del self.by_client[client_id]
        restore = self.restores.pop(session.sid, None)
        if restore is not None:
            if restore.sub is not None:
                self.reader.unsubscribe(restore.sub)
                restore.sub = None
            restore.drained.set()
        self._release(session)
        self.seen[session.sid] = client_id  # its row's time is now the time it ended
        self.remember(session.sid, client_id)

    def remember(self, sid: str, client_id: str) -> None:
        """``sid`` (of ``client_id``) is not open here: a reply for it is kept for
        ``offline_ttl_s``. Also for the sessions the store had when this instance started:
        their replies waited in its reply queue while it was down."""
        now = time.monotonic()
        ended = self.ended
        ended[sid] = (client_id, now + self.settings.offline_ttl_s)
        ended.move_to_end(sid)
        while ended:
            _, (_, until) = next(iter(ended.items()))
            if until > now and len(ended) <= MAX_REMEMBERED:
                break
            ended.popitem(last=False)


# The binding of the offline exchange to the undeliverable queue: expired replies only (a
# marker that expires is dropped).
EXPIRED_BINDING: dict[str, Any] = {"x-match": "all", H_DEAD_REASON: DEAD_OFFLINE_EXPIRED}
