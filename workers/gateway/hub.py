"""The gateway's sessions and what they share: the association of clients with servers
(the pure :class:`~workers.gateway.core.Balancer`), the publish window and the server
queues.

A :class:`~workers.gateway.session.Session` calls :meth:`GatewayHub.join` once its HELLO is
accepted, :meth:`GatewayHub.pump` when it has events to publish and :meth:`GatewayHub.lost`
when its socket goes.

Ordering and backpressure. Everything a session publishes goes through its own FIFO
(``Session.pending``) and then through one confirm channel (a
:class:`~bridge.amqp.publisher.Publisher` writes in call order), so a server sees connect,
the DATA in the order the client sent it, then disconnect. A session publishes at most
``session_in_flight`` messages ahead of their confirms and the gateway at most
``publish_window``; a session that cannot publish stops reading its socket, so a slow
broker slows the clients down instead of filling the gateway's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aio_pika.exceptions
from aio_pika.abc import AbstractChannel

from bridge.amqp import declare_quorum_queue
from bridge.amqp.frames import EncodeError, Properties
from bridge.amqp.publisher import UNENCODABLE, Publisher
from bridge.errors import PublishFailed
from workers.gateway.auth import Authenticator
from workers.gateway.config import (
    E_NO_SERVER,
    E_SERVER_GONE,
    E_UNAVAILABLE,
    EVENT_CONNECT,
    EVENT_DATA,
    EVENT_DISCONNECT,
    H_SEQ,
    GatewaySettings,
)
from workers.gateway.core import Balancer
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.passthrough import Pipe, relay
from workers.gateway.session import JOINING, OPEN, Session
from workers.gateway.states import State
from workers.gateway.wire import SEQ_BYTES, encode_ack, split_seq

if TYPE_CHECKING:
    from workers.gateway.offline import OfflineReplies

log = logging.getLogger("bridge.gateway")


class GatewayHub:
    """The sessions of one gateway and the publishing of their events (see the module)."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        balancer: Balancer,
        tokens: tuple[bytes, ...],
        publisher: Publisher,
        channel: AbstractChannel,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.balancer = balancer
        self.tokens = tokens  # SHA-256 digests of the accepted HELLO tokens
        self.auth = Authenticator(settings, metrics.registry)
        self.publisher = publisher
        self._channel = channel  # declarations of server queues (aio-pika, control plane)
        self.sessions: dict[str, Session] = {}
        self.relays: set[Pipe] = set()  # both ends of each pass-through connection
        self.in_flight = 0
        self.waiting: deque[Session] = deque()  # sessions waiting for the publish window
        self.sticky_dirty: set[str] = set()  # client_ids whose sticky record changed
        self.server_up = asyncio.Event()  # pulsed when a server becomes alive
        self.stopping = False
        # Told when a client is associated with a server or released (the replicas' peers).
        self.on_association: Callable[[str | None, str], None] | None = None
        # Offline replies of sticky clients (set by the worker): written before a returning
        # client's connect, and told when a session ends.
        self.offline: OfflineReplies | None = None
        self._declared: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _associated(self, client_id: str | None, server: str) -> None:
        if client_id is not None:
            self.sticky_dirty.add(client_id)
        if self.on_association is not None:
            self.on_association(client_id, server)

    # -- sessions ----------------------------------------------------------------------

    def join(self, session: Session) -> None:
        """HELLO accepted (or, without HELLO, the connection): pick the server, waiting a
        little if none is alive."""
        if self._assign(session):
            return
        if self.settings.no_server_wait_s <= 0 or self.stopping:
            session.fail(E_NO_SERVER, "no server is registered with the gateway")
            return
        self.spawn(self._wait_for_server(session))

    def _assign(self, session: Session) -> bool:
        server = self.balancer.assign(session.sid, session.sticky_id, time.monotonic())
        if server is None:
            return False
        self._associated(session.sticky_id, server)
        offline = self.offline
        if offline is not None and offline.applies(session):
            offline.restore(session, server)  # welcomed; its connect waits for the replies
        else:
            session.welcome(server)
        return True

    async def _wait_for_server(self, session: Session) -> None:
        deadline = time.monotonic() + self.settings.no_server_wait_s
        while session.state == JOINING:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                session.fail(
                    E_NO_SERVER,
                    f"no server registered within {self.settings.no_server_wait_s}s",
                )
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server_up.wait(), remaining)
            if session.state == JOINING and self._assign(session):
                return

    def server_lost(self, server_id: str, why: str) -> None:
        """``server_id`` deregistered or missed its heartbeats: its clients on this replica
        are moved to the least-loaded live server (which gets ``connect`` with
        ``x-moved-from``) or closed with ERROR ``server_gone``, as ``on_server_loss`` says.
        What they sent before stays in the old server's queue for it."""
        now = time.monotonic()
        move = self.settings.on_server_loss == "move"
        moved = closed = 0
        for sid in self.balancer.connections_of(server_id):
            session = self.sessions.get(sid)
            if session is None or session.state != OPEN:
                continue  # closing already: its disconnect goes to the old queue
            server = self.balancer.move(sid, now) if move else None
            if server is None:
                # (after a move that found no server the session is no longer associated;
                # its disconnect still goes to the old server's queue, as with close)
                closed += 1
                self.metrics.server_loss.labels("closed").inc()
                session.fail(E_SERVER_GONE, f"server {server_id} is gone ({why})")
                continue
            moved += 1
            self.metrics.server_loss.labels("moved").inc()
            session.moved_from, session.server = server_id, server
            self._associated(session.sticky_id, server)
            if session.pending is None:
                session.pending = deque()
            if not session.held:  # a held session's connect is still in its queue
                session.pending.appendleft((EVENT_CONNECT, b""))
            self.pump(session)
        if moved or closed:
            log.warning(
                "server gone: its clients moved or closed",
                extra={"server": server_id, "why": why, "moved": moved, "closed": closed},
            )

    def pass_through(
        self, transport: asyncio.Transport, head: bytes, upstream: tuple[str, int]
    ) -> None:
        """A connection that is not a gateway client goes to ``upstream`` byte for byte."""
        self.spawn(
            relay(
                transport, head, upstream, self.metrics, self.settings.hello_timeout_s, self.relays
            )
        )

    def lost(self, session: Session, previous_state: State) -> None:
        self.sessions.pop(session.sid, None)
        self.auth.release(session)
        if session.server is None:  # never welcomed: nothing announced, nothing associated
            return
        if self.offline is not None:
            self.offline.session_ended(session)
        self.balancer.release(session.sid, time.monotonic())
        self._associated(session.sticky_id, session.server)
        self.metrics.closed.labels(session.close_reason or "peer_closed").inc()
        if session.pending is None:
            session.pending = deque()
        session.pending.append((EVENT_DISCONNECT, b""))
        self.pump(session)

    # -- publishing --------------------------------------------------------------------

    def pump(self, session: Session) -> None:
        """Start the session's next publishes, as far as both windows allow."""
        if session.held:  # its client's offline replies first (workers/gateway/offline.py)
            session.update_reading()
            return
        pending = session.pending
        limit = self.settings.session_in_flight
        window = self.settings.publish_window
        while pending and session.in_flight < limit:
            if self.in_flight >= window:
                if not session.waiting:
                    session.waiting = True
                    self.waiting.append(session)
                break
            event, payload = pending.popleft()
            session.in_flight += 1
            self.in_flight += 1
            self._send(session, event, payload)
        if not pending:
            session.pending = None  # an idle connection should not keep a deque block (~600 B)
        session.update_reading()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, session: Session, event: str, payload: bytes, *, retry: bool = True) -> None:
        server = session.server or ""
        # A session's DATA properties (its five headers, reply_to, persistence) are encoded
        # once and kept; every DATA publish writes those bytes as they are. Returns are
        # matched to their publish by exchange and routing key, in order (bridge.amqp's
        # confirm tracker), so no message id per publish.
        encoded: bytes | None = session.prepared if event == EVENT_DATA else None
        body = payload
        seq: int | None = None
        if event == EVENT_DATA and session.version != 1:
            seq, body = split_seq(payload)  # checked when it was read
            encoded = None  # x-seq differs per message
        fut: asyncio.Future[None]
        if encoded is None:
            headers = session.headers(event, self.settings.instance)
            if seq is not None:
                headers[H_SEQ] = seq
            try:
                encoded = Properties(
                    headers=headers, reply_to=self.settings.reply_queue, delivery_mode=2
                ).encode()
            except EncodeError as exc:  # parse_hello refuses what could cause it
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(PublishFailed(UNENCODABLE, f"{type(exc).__name__}: {exc}"))
            else:
                if event == EVENT_DATA and seq is None:
                    session.prepared = encoded
        if encoded is not None:
            fut = self.publisher.publish("", self.settings.server_queue(server), body, encoded)
        if event == EVENT_DATA:
            if session.unsettled is None:
                session.unsettled = deque()
            session.unsettled.append(fut)
        fut.add_done_callback(
            functools.partial(self._published, session, event, payload, server, retry)
        )

    def _published(
        self,
        session: Session,
        event: str,
        payload: bytes,
        server: str,
        retry: bool,
        fut: asyncio.Future[None],
    ) -> None:
        unsettled = session.unsettled
        if unsettled is not None and event == EVENT_DATA:
            with contextlib.suppress(ValueError):
                unsettled.remove(fut)
            if not unsettled:
                session.unsettled = None
        if fut.cancelled():  # given up below, after an earlier DATA of the session failed
            self._release(session)
            return
        exc = fut.exception()
        if exc is None and event == EVENT_DATA and session.version != 1 and session.state == OPEN:
            # protocol v2: the broker has it (persistent, in a quorum queue): tell the client
            session.write(encode_ack(payload[:SEQ_BYTES]))
        if exc is not None:
            reason = exc.reason if isinstance(exc, PublishFailed) else "error"
            if reason == "unroutable" and retry:
                # Someone deleted the server's queue: declare it again and retry once (the
                # retried message may land after later ones of the session).
                self.spawn(self._redeclare_and_retry(session, event, payload, server))
                return
            self.metrics.publish_failures.labels(reason).inc()
            log.warning(
                "publish to server queue failed",
                extra={"server": server, "event": event, "error": str(exc)},
            )
            if session.state == OPEN:
                session.fail(E_UNAVAILABLE, "the broker did not take a message; reconnect")
            if event == EVENT_DATA:
                self._give_up_data(session)
        self._release(session)

    def _give_up_data(self, session: Session) -> None:
        """A DATA of the session was not taken: the session is over and its client told.
        Publishing the DATA it sent after that one would leave a hole in what the server
        sees; without it the server sees a prefix, then the disconnect. Later DATA still
        waiting for the publisher's next write (e.g. for a reconnect) is cancelled too."""
        if session.pending:
            session.pending = deque(e for e in session.pending if e[0] != EVENT_DATA)
        for later in list(session.unsettled or ()):
            later.cancel()  # a no-op for those already settled; unwritten ones are skipped

    async def _redeclare_and_retry(
        self, session: Session, event: str, payload: bytes, server: str
    ) -> None:
        self._declared.pop(server, None)
        try:
            await self.declare_server_queue(server)
        except Exception as exc:
            self.metrics.publish_failures.labels("unroutable").inc()
            log.error(
                "server queue cannot be declared", extra={"server": server, "error": str(exc)}
            )
            if session.state == OPEN:
                session.fail(E_UNAVAILABLE, "the server's queue is gone; reconnect")
            self._release(session)
            return
        self._send(session, event, payload, retry=False)

    def _release(self, session: Session) -> None:
        """One publish of ``session`` is settled: free its slots, let waiting ones go."""
        session.in_flight -= 1
        self.in_flight -= 1
        self.pump(session)
        waiting = self.waiting
        while waiting and self.in_flight < self.settings.publish_window:
            other = waiting.popleft()
            other.waiting = False
            self.pump(other)

    # -- server queues -----------------------------------------------------------------

    async def declare_server_queue(self, server_id: str) -> None:
        fut = self._declared.get(server_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._declared[server_id] = fut
            name = self.settings.server_queue(server_id)
            try:
                await declare_quorum_queue(self._channel, name)
            except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                # The server (or an operator) declared it with other arguments, e.g. a
                # length limit for offline messages: it exists, which is all we need.
                log.warning(
                    "server queue exists with other arguments; using it as it is",
                    extra={"queue": name, "detail": str(exc)[:200]},
                )
            except BaseException as exc:
                self._declared.pop(server_id, None)
                fut.set_exception(exc)
                fut.exception()  # retrieved: other waiters re-raise it, nobody else must
                raise
            fut.set_result(None)
            return
        await fut
