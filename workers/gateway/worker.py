"""TCP + AMQP adapter of the gateway worker.

Owns the listeners, the broker side (server registry consumer, publisher to the server
queues, reply consumer) and the publish window; each connection is a
:class:`~workers.gateway.session.Session`, and the choice of server is the pure
:class:`~workers.gateway.balancer.Balancer`'s.

Per-message traffic (client events to the server queues, replies, undeliverable replies,
the replicas' sticky stream) goes over one :class:`~bridge.amqp.link.Link` of the
gateway's own, through :mod:`bridge.amqp`, and so does the servers' registry;
declarations stay on an aio-pika channel of the host's connection.

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
import hashlib
import json
import logging
import ssl
import time
import urllib.parse
from collections import deque
from typing import Any

import aio_pika.exceptions
from aio_pika.abc import AbstractChannel

from bridge.amqp import declare_exchange, declare_quorum_queue, header_str
from bridge.amqp.consumer import Consumer, QueueSpec
from bridge.amqp.frames import Delivery, EncodeError, Properties
from bridge.amqp.link import Link, LinkError
from bridge.amqp.publisher import UNENCODABLE, Publisher
from bridge.errors import ConfigError, PublishFailed
from bridge.host import WorkerContext
from bridge.settings import load_settings
from workers.gateway.balancer import Balancer
from workers.gateway.config import (
    DEAD_INVALID_HEADERS,
    DEAD_NO_SESSION,
    DEAD_SESSION_GONE,
    E_NO_SERVER,
    E_UNAVAILABLE,
    EVENT_DATA,
    EVENT_DISCONNECT,
    H_CLOSE,
    H_DEAD_DETAIL,
    H_DEAD_REASON,
    H_SESSION,
    OP_DEREGISTER,
    REGISTRY_OPS,
    SERVER_ID_RE,
    GatewaySettings,
)
from workers.gateway.housekeeping import Housekeeper
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.peers import Peers
from workers.gateway.protocol import Hello
from workers.gateway.session import JOINING, OPEN, STATE_NAMES, Session
from workers.gateway.store import GatewayStore

log = logging.getLogger("bridge.gateway")

# How long a publish may wait (for a reconnect, a resource alarm, a confirm) before it fails.
PUBLISH_TIMEOUT_S = 30.0
UNDELIVERABLE_WINDOW = 64


def _truthy(value: Any) -> bool:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and value is not None


class GatewayWorker:
    name = "gateway"
    settings_class = GatewaySettings

    def __init__(self, settings: GatewaySettings | None = None) -> None:
        self.settings = settings or load_settings(GatewaySettings)
        s = self.settings
        self.balancer = Balancer(
            server_ttl_s=s.server_ttl_s,
            sticky_retention_s=s.sticky_retention_s,
            replica_ttl_s=s.peer_ttl_s,
        )
        self.tokens = tuple(hashlib.sha256(t.encode()).digest() for t in s.tokens)
        self.sessions: dict[str, Session] = {}
        self.in_flight = 0
        self.listeners: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}
        self.store: GatewayStore | None = None
        self.housekeeper: Housekeeper | None = None
        self.peers: Peers | None = None
        self._waiting: deque[Session] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._declared: dict[str, asyncio.Future[None]] = {}
        self._registry_lock = asyncio.Lock()
        self._server_up = asyncio.Event()
        self._channels: list[AbstractChannel] = []
        self._consuming = False
        self._stopping = False
        self.sticky_dirty: set[str] = set()
        self.link: Link | None = None  # the data path (bridge.amqp), set up by start()
        self._registry: Consumer | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        s = self.settings
        self.metrics = GatewayMetrics(ctx.registry, lambda: self)
        ssl_context = self._ssl_context()
        self.store = GatewayStore(ctx.state_dir(self.name), s.state_name)
        self.housekeeper = Housekeeper(self, self.store)
        saved_servers = await self.housekeeper.restore()

        broker = ctx.broker
        # Declarations on an aio-pika channel of the host's connection (control plane).
        self._declare_channel = await broker.channel(confirms=False)
        self._channels = [self._declare_channel]
        await declare_exchange(self._declare_channel, s.servers_exchange, "fanout")
        await declare_quorum_queue(self._declare_channel, s.undeliverable_queue)

        # The data path: one connection of the gateway's own (bridge.amqp).
        link = self.link = Link(
            broker.url, name=f"gateway {s.instance}", heartbeat_s=broker.settings.heartbeat_s
        )
        self.publisher = Publisher(
            link,
            name="gateway publisher",
            # the sessions' publishes are bounded by publish_window (pump); the rest is room
            # for undeliverable replies, so that they do not hold back client messages
            window=s.publish_window + UNDELIVERABLE_WINDOW,
            timeout=PUBLISH_TIMEOUT_S,
            confirm_seconds=self.metrics.confirm_seconds.observe,
        )
        # The reply queue is not exclusive: an exclusive queue dies with the connection, and
        # with it every reply in it or published while the gateway reconnects, although the
        # sessions survive. Durable, so that it is there when the servers come back after a
        # broker restart, before this gateway does. It expires once nobody consumes it
        # (declared at every setup of the consumer: after a long outage it may have
        # expired); the consumer is exclusive instead, so a second replica with the same
        # instance is refused here, before it declares its other per-instance queues.
        self.reply_consumer = Consumer(
            link,
            QueueSpec(s.reply_queue, durable=True, arguments=self._reply_queue_arguments()),
            self._on_reply,
            no_ack=True,
            exclusive=True,
            declare=True,
            name=f"consumer {s.reply_queue}",
        )
        for server_id in saved_servers:
            await self._declare_server_queue(server_id)
        # The servers' registry: an exclusive queue of the link's connection, declared (and
        # bound) at every setup of the consumer, so again after each reconnect. Anyone may
        # publish to the servers exchange: its messages are decoded by the data path's
        # codec, which refuses what it cannot read without dropping the connection.
        self._registry = Consumer(
            link,
            QueueSpec(
                s.registry_queue,
                durable=False,
                exclusive=True,
                auto_delete=True,
                bindings=((s.servers_exchange, ""),),
            ),
            self._on_registry,
            no_ack=True,
            declare=True,
            name=f"consumer {s.registry_queue}",
        )
        if s.peers:
            self.peers = Peers(self)
            await self.peers.attach(broker, link)
        try:
            await link.start()
        except LinkError as exc:
            error = self._start_error(exc)
            if error is exc:
                raise
            raise error from exc
        try:
            if self.peers is not None:
                # Before listening: the first clients are placed on the global view, and a
                # returning client_id finds the server another replica gave it.
                await self.peers.start(broker)
        except BaseException:
            await link.close()  # a worker whose start failed is not stopped
            raise
        self._consuming = True

        loop = asyncio.get_running_loop()
        if s.plain_listener:
            server = await loop.create_server(
                lambda: Session(self), s.host, s.port, backlog=s.backlog
            )
            self.listeners.append(server)
            self.ports["tcp"] = server.sockets[0].getsockname()[1]
        if ssl_context is not None:
            server = await loop.create_server(
                lambda: Session(self),
                s.host,
                s.tls_port,
                backlog=s.backlog,
                ssl=ssl_context,
                ssl_handshake_timeout=s.hello_timeout_s,
            )
            self.listeners.append(server)
            self.ports["tls"] = server.sockets[0].getsockname()[1]
        self.housekeeper.start()
        log.info(
            "gateway listening",
            extra={"host": s.host, **self.ports, "instance": s.instance},
        )

    def _reply_queue_arguments(self) -> dict[str, Any]:
        return {"x-expires": max(1, round(self.settings.reply_queue_expires_s * 1000))}

    def _start_error(self, exc: LinkError) -> Exception:
        """What the broker refused about the reply queue at start, as the operator's fix."""
        queue = self.settings.reply_queue
        if f"'{queue}'" not in exc.text:
            return exc
        if exc.code == 403 and "exclusive" in exc.text:
            return ConfigError(
                f"queue {queue} is consumed by another gateway: two replicas share "
                "BRIDGE_GATEWAY__INSTANCE; give each its own"
            )
        if exc.code == 405:
            return ConfigError(
                f"queue {queue} is held by another connection: two gateway replicas "
                "share BRIDGE_GATEWAY__INSTANCE; give each its own"
            )
        if exc.code == 406:
            return ConfigError(
                f"queue {queue} exists with other arguments (left by another version "
                "or another reply_queue_expires_s); it expires once unused, or delete it"
            )
        return exc

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load TLS certificate {s.tls_cert} / key {s.tls_key}: {exc}"
            ) from exc
        return context

    @property
    def port(self) -> int:
        return self.ports.get("tcp", 0)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        began = time.monotonic()
        deadline = began + max(grace - 1.0, 0.5)
        try:
            for server in self.listeners:
                server.close()
            for session in list(self.sessions.values()):
                session.close_gracefully("shutdown")
            # Sockets flush their BYE and close; their disconnect events and any DATA read
            # before are still published. Then whatever is left is cut.
            while time.monotonic() < deadline:
                if not (self.sessions or self.in_flight or self._waiting):
                    break
                await asyncio.sleep(0.02)
            for session in list(self.sessions.values()):
                if session.transport is not None:
                    session.transport.abort()
            for server in self.listeners:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 1)
            self._consuming = False
            if hasattr(self, "reply_consumer"):  # deliveries stop at once; the cancel-ok
                with contextlib.suppress(TimeoutError):  # may not come (a stalled broker)
                    await asyncio.wait_for(self.reply_consumer.cancel(), 1.0)
            if self._registry is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._registry.cancel(), 1.0)
            if self.housekeeper is not None:
                await self.housekeeper.close()
            if self.peers is not None:
                # the last sticky records, then "leave", in what is left of the grace
                left = began + grace - 0.5 - time.monotonic()
                await self.peers.close(timeout=min(3.0, max(left, 0.2)))
        finally:
            # Also when the host gave up waiting (cancelled): the connection is closed and
            # what was never written is failed.
            if self.link is not None:
                await self.link.close()
            if hasattr(self, "publisher"):
                self.publisher.close()
            for task in list(self._tasks):
                task.cancel()
            for channel in self._channels:
                with contextlib.suppress(Exception):
                    await channel.close()
            if self.store is not None:
                self.store.close()

    def listen_ports(self) -> list[tuple[str, str, int]]:
        """The listeners' (variable, host, port), for the host to check before it connects."""
        s = self.settings
        ports = []
        if s.plain_listener:
            ports.append(("BRIDGE_GATEWAY__PORT", s.host, s.port))
        if s.tls_cert is not None:
            ports.append(("BRIDGE_GATEWAY__TLS_PORT", s.host, s.tls_port))
        return ports

    def describe(self) -> dict[str, Any]:
        """For the host's ``ready`` line: the listeners and the queues consumed."""
        queues = [c.queue for c in (self.reply_consumer, self._registry) if c is not None]
        if self.peers is not None:
            queues += [self.settings.peers_queue, self.settings.sticky_stream_name]
        return {
            "listens": ", ".join(
                f"{kind} {self.settings.host}:{p}" for kind, p in self.ports.items()
            ),
            "consumes": ", ".join(queues),
        }

    def ready(self) -> tuple[bool, str]:
        if not self._consuming:
            return False, "not consuming"
        link = self.link
        if link is None or not link.ready:
            return False, "; ".join(link.not_ready() if link is not None else ["no broker link"])
        if not self.listeners:
            return False, "not listening"
        return True, f"listening {self.ports}, {len(self.sessions)} connections"

    def admin(self, view: str) -> Any:
        now = time.monotonic()
        if view in ("", "summary"):
            states: dict[str, int] = {}
            for session in self.sessions.values():
                name = STATE_NAMES[session.state]
                states[name] = states.get(name, 0) + 1
            return {
                "instance": self.settings.instance,
                "ports": self.ports,
                "connections": len(self.sessions),
                "states": states,
                "publish_in_flight": self.in_flight,
                "publishes_per_write": round(
                    self.publisher.published / max(self.publisher.flushes, 1), 2
                ),
                "sessions_waiting_for_window": len(self._waiting),
                "link": None
                if self.link is None
                else {
                    "connected": self.link.connected,
                    "ready": self.link.ready,
                    "not_ready": self.link.not_ready() if not self.link.ready else [],
                    "reconnects": self.link.reconnects,
                },
                "servers_alive": self.balancer.alive(),
                "reply_queue": self.settings.reply_queue,
                "peers": None
                if self.peers is None
                else {
                    "boot": self.peers.boot,
                    "replicas": self.balancer.replicas(now),
                    "sticky_stream": self.peers.stream_ok,
                    "sticky_read_at_start": self.peers.caught_up.is_set(),
                    "sticky_pending": len(self.peers.pending),
                    "sticky_dropped": self.peers.dropped,
                },
            }
        if view == "associations":
            return self.balancer.snapshot(now)
        if view.startswith("sticky/"):
            # Where a returning client_id would go: /admin/gateway/sticky/<client_id>
            client_id = urllib.parse.unquote(view[len("sticky/") :])
            record = self.balancer.sticky_record(client_id)
            if record is None:
                return None
            server, live, released = record
            return {
                "client_id": client_id,
                "server": server,
                "live_here": live,
                "released_age_s": None if live else round(now - released, 3),
            }
        if view == "sessions":
            out = []
            for session in list(self.sessions.values())[:1000]:
                out.append(
                    {
                        "session": session.sid,
                        "state": STATE_NAMES[session.state],
                        "client_id": session.client_id,
                        "client_addr": session.peer,
                        "server": session.server,
                        "age_s": round(now - session.accepted_at, 3),
                        "idle_s": round(now - session.last_rx, 3),
                        "in_flight": session.in_flight,
                    }
                )
            return out
        return None

    # -- sessions ----------------------------------------------------------------------

    def join(self, session: Session, hello: Hello) -> None:
        """HELLO accepted: pick the server (waiting a little if none is alive)."""
        if self._assign(session):
            return
        if self.settings.no_server_wait_s <= 0 or self._stopping:
            session.fail(E_NO_SERVER, "no server is registered with the gateway")
            return
        self._spawn(self._wait_for_server(session))

    def _assign(self, session: Session) -> bool:
        server = self.balancer.assign(session.sid, session.client_id, time.monotonic())
        if server is None:
            return False
        if session.client_id is not None:
            self.sticky_dirty.add(session.client_id)
        if self.peers is not None:
            self.peers.changed()
            if session.client_id is not None:
                self.peers.note(session.client_id, server)
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
                await asyncio.wait_for(self._server_up.wait(), remaining)
            if session.state == JOINING and self._assign(session):
                return

    def lost(self, session: Session, previous_state: int) -> None:
        self.sessions.pop(session.sid, None)
        if session.server is None:  # never welcomed: nothing announced, nothing associated
            return
        self.balancer.release(session.sid, time.monotonic())
        if session.client_id is not None:
            self.sticky_dirty.add(session.client_id)
        if self.peers is not None:
            self.peers.changed()
            if session.client_id is not None:
                self.peers.note(session.client_id, session.server)
        self.metrics.closed.labels(session.close_reason or "peer_closed").inc()
        if session.pending is None:
            session.pending = deque()
        session.pending.append((EVENT_DISCONNECT, b""))
        self.pump(session)

    # -- publishing --------------------------------------------------------------------

    def pump(self, session: Session) -> None:
        """Start the session's next publishes, as far as both windows allow."""
        pending = session.pending
        limit = self.settings.session_in_flight
        window = self.settings.publish_window
        while pending and session.in_flight < limit:
            if self.in_flight >= window:
                if not session.waiting:
                    session.waiting = True
                    self._waiting.append(session)
                break
            event, payload = pending.popleft()
            session.in_flight += 1
            self.in_flight += 1
            self._send(session, event, payload)
        if not pending:
            session.pending = None  # an idle connection should not keep a deque block (~600 B)
        session.update_reading()

    def _spawn(self, coro: Any) -> None:
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
        fut: asyncio.Future[None]
        if encoded is None:
            try:
                encoded = Properties(
                    headers=session.headers(event, self.settings.instance),
                    reply_to=self.settings.reply_queue,
                    delivery_mode=2,
                ).encode()
            except EncodeError as exc:  # parse_hello refuses what could cause it
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(PublishFailed(UNENCODABLE, f"{type(exc).__name__}: {exc}"))
            else:
                if event == EVENT_DATA:
                    session.prepared = encoded
        if encoded is not None:
            fut = self.publisher.publish("", self.settings.server_queue(server), payload, encoded)
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
        if exc is not None:
            reason = exc.reason if isinstance(exc, PublishFailed) else "error"
            if reason == "unroutable" and retry:
                # Someone deleted the server's queue: declare it again and retry once (the
                # retried message may land after later ones of the session).
                self._spawn(self._redeclare_and_retry(session, event, payload, server))
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
            await self._declare_server_queue(server)
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
        waiting = self._waiting
        while waiting and self.in_flight < self.settings.publish_window:
            other = waiting.popleft()
            other.waiting = False
            self.pump(other)

    # -- server registry ---------------------------------------------------------------

    async def _declare_server_queue(self, server_id: str) -> None:
        fut = self._declared.get(server_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._declared[server_id] = fut
            name = self.settings.server_queue(server_id)
            try:
                await declare_quorum_queue(self._declare_channel, name)
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

    async def _on_registry(self, message: Delivery) -> None:
        try:
            doc = json.loads(message.body)
            op = doc["op"]
            server_id = doc["server_id"]
            if op not in REGISTRY_OPS:
                raise ValueError(f"unknown op {op!r}")
            if not isinstance(server_id, str) or not SERVER_ID_RE.match(server_id):
                raise ValueError(f"server_id {server_id!r} is not [A-Za-z0-9._:@-]{{1,200}}")
        except (ValueError, KeyError, TypeError) as exc:
            self.metrics.registry_messages.labels("malformed").inc()
            log.warning(
                "malformed message on the servers exchange ignored",
                extra={"error": str(exc)[:200], "body": message.body[:200]},
            )
            return
        self.metrics.registry_messages.labels(op).inc()
        # One at a time, in delivery order: a deregister must not overtake its register.
        async with self._registry_lock:
            if op == OP_DEREGISTER:
                self.balancer.deregister(server_id, time.monotonic())
                log.info("server deregistered", extra={"server": server_id})
                return
            try:
                await self._declare_server_queue(server_id)
            except Exception as exc:
                log.error(
                    "cannot declare the server's queue; not taking it into service",
                    extra={"server": server_id, "error": str(exc)},
                )
                return
            if self.balancer.register(server_id, time.monotonic()):
                log.info("server alive", extra={"server": server_id, "op": op})
                self._server_up.set()
                self._server_up.clear()

    # -- replies -----------------------------------------------------------------------

    def _on_reply(self, delivery: Delivery) -> None:
        properties = delivery.properties
        if properties.headers is None and properties.error is not None:
            # The headers table could not be decoded (nested too deep, malformed): which
            # session it is for is unknown. Kept for an operator; the next reply goes on.
            self._undeliverable(delivery, DEAD_INVALID_HEADERS, properties.error)
            return
        reason = self._route_reply(properties.headers, delivery.body)
        if reason is not None:
            self._undeliverable(delivery, reason)

    def _route_reply(self, headers: dict[str, Any] | None, body: bytes) -> str | None:
        """Write a reply to its session; the undeliverable reason if there is none."""
        if not headers:
            return DEAD_NO_SESSION
        sid = header_str(headers.get(H_SESSION))
        if not sid:
            return DEAD_NO_SESSION
        session = self.sessions.get(sid)
        if session is None or session.state != OPEN:
            return DEAD_SESSION_GONE
        close = _truthy(headers.get(H_CLOSE))
        if body or not close:
            session.send_data(body)
        if close:
            session.close_gracefully("server_close")
        return None

    def _undeliverable(self, delivery: Delivery, reason: str, detail: str | None = None) -> None:
        """Keep a reply nobody can take in ``gateway.undeliverable``: its body, properties
        and headers, persistent, with ``x-dead-reason`` (and ``x-dead-detail`` when its
        headers were dropped). ``reply_to``, ``expiration``, ``user_id`` and ``cluster_id``
        are not carried over: the kept reply answers nobody, must not expire on the
        server's TTL, and a ``user_id`` other than the gateway's would make the broker
        close the publishing channel."""
        self.metrics.undeliverable.labels(reason).inc()
        original = delivery.properties
        if detail is None:
            headers = dict(original.headers or {})
            headers[H_DEAD_REASON] = reason
        else:
            headers = {H_DEAD_REASON: reason, H_DEAD_DETAIL: detail[:500]}
        properties = original.copy(
            headers=headers,
            delivery_mode=2,
            reply_to=None,
            expiration=None,
            user_id=None,
            cluster_id=None,
        )
        try:
            fut = self.publisher.publish(
                "", self.settings.undeliverable_queue, delivery.body, properties.encode()
            )
        except EncodeError as exc:
            log.error(
                "undeliverable reply could not be kept",
                extra={"reason": reason, "error": f"{type(exc).__name__}: {exc}"},
            )
            return
        fut.add_done_callback(functools.partial(_undeliverable_done, reason))


def _undeliverable_done(reason: str, fut: asyncio.Future[None]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.error(
            "undeliverable reply could not be kept", extra={"reason": reason, "error": str(exc)}
        )
