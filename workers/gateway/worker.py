"""The gateway worker: lifecycle and wiring only.

The parts, in the order a client's DATA meets them: a
:class:`~workers.gateway.session.Session` per connection (framing, HELLO, its event queue),
the :class:`~workers.gateway.hub.GatewayHub` (assignment to a server by the pure
:class:`~workers.gateway.core.Balancer`, the publish window, the server queues); the
reply comes back through :class:`~workers.gateway.replies.Replies`. The servers announce
themselves to :class:`~workers.gateway.registry.ServerRegistry`; replicas share counts and
sticky records through :class:`~workers.gateway.peers.Peers`; the
:class:`~workers.gateway.housekeeping.Housekeeper` sweeps timeouts and saves state.

Per-message traffic (client events to the server queues, replies, undeliverable replies,
the replicas' sticky stream) goes over one :class:`~bridge.amqp.link.Link` of the
gateway's own, through :mod:`bridge.amqp`, and so does the servers' registry;
declarations stay on an aio-pika channel of the host's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import ssl
import time
import urllib.parse
from typing import Any

from aio_pika.abc import AbstractChannel

from bridge.amqp import declare_exchange, declare_quorum_queue
from bridge.amqp.consumer import Consumer, Lease, QueueSpec
from bridge.amqp.link import Link
from bridge.amqp.publisher import Publisher
from bridge.errors import ConfigError, LinkError
from bridge.host import WorkerContext
from bridge.settings import load_settings
from bridge.tls import server_context
from workers.gateway.config import (
    GatewaySettings,
)
from workers.gateway.core import Balancer
from workers.gateway.housekeeping import Housekeeper
from workers.gateway.hub import GatewayHub
from workers.gateway.metrics import GatewayMetrics
from workers.gateway.offline import EXPIRED_BINDING, OfflineReplies
from workers.gateway.peers import Peers
from workers.gateway.registry import ServerRegistry
from workers.gateway.replies import Replies
from workers.gateway.session import Session, StreamSession
from workers.gateway.store import GatewayStore

log = logging.getLogger("bridge.gateway")

# How long a publish may wait (for a reconnect, a resource alarm, a confirm) before it fails.
PUBLISH_TIMEOUT_S = 30.0
UNDELIVERABLE_WINDOW = 64


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
        self.hub: GatewayHub | None = None
        self.listeners: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}
        self.store: GatewayStore | None = None
        self.housekeeper: Housekeeper | None = None
        self.peers: Peers | None = None
        self._channels: list[AbstractChannel] = []
        self._consuming = False
        self._served = False  # it held the instance and started serving (peers, listeners)
        self.link: Link | None = None  # the data path (bridge.amqp), set up by start()
        self._registry: Consumer | None = None
        self.offline: OfflineReplies | None = None

    @property
    def sessions(self) -> dict[str, Session]:
        return self.hub.sessions if self.hub is not None else {}

    @property
    def in_flight(self) -> int:
        return self.hub.in_flight if self.hub is not None else 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ctx: WorkerContext) -> None:
        s = self.settings
        self.metrics = GatewayMetrics(ctx.registry)
        ssl_context = self._ssl_context()
        self._client_context = self._client_auth_context()
        self.store = GatewayStore(ctx.state_dir(self.name), s.state_name)

        broker = ctx.broker
        # Declarations on an aio-pika channel of the host's connection (control plane).
        self._declare_channel = await broker.channel(confirms=False)
        self._channels = [self._declare_channel]
        await declare_exchange(self._declare_channel, s.servers_exchange, "fanout")
        undeliverable = await declare_quorum_queue(self._declare_channel, s.undeliverable_queue)
        if s.offline_max_messages:
            # expired offline replies go on to the undeliverable queue (workers/gateway/offline)
            offline_exchange = await declare_exchange(
                self._declare_channel, s.offline_exchange, "headers"
            )
            await undeliverable.bind(offline_exchange, arguments=EXPIRED_BINDING)

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
        hub = self.hub = GatewayHub(
            s, self.metrics, self.balancer, self.tokens, self.publisher, self._declare_channel
        )
        self.metrics.watch(hub, link)
        self.offline = OfflineReplies(
            s, self.metrics, hub.sessions, self.publisher, self._declare_channel, link, hub.pump
        )
        hub.offline = self.offline
        self.housekeeper = Housekeeper(hub, self.store, lambda: link.ready)
        saved_servers = await self.housekeeper.restore()
        if s.offline_max_messages and s.client_token_secret is None and not s.client_auth_listeners:
            log.warning(
                "gateway: no client identities configured (no client_token_secret, no "
                "client_auth listener): a client_id is taken on trust, and replies kept for an "
                "offline client_id go to whoever claims it next; see docs/gateway.md, Client "
                "identities"
            )
        replies = Replies(hub.sessions, self.publisher, s, self.metrics, self.offline)
        # One process serves an instance: it holds the lease on the reply queue, and the
        # consumers below wait for it (bridge.amqp.consumer). A second replica with the same
        # instance waits, not ready and not listening, until the first goes away.
        lease = self.lease = Lease(
            link,
            s.reply_queue,
            hint=f"two gateways share BRIDGE_GATEWAY__INSTANCE={s.instance}: give each "
            "replica its own",
        )
        # The reply queue is not exclusive: an exclusive queue dies with the connection, and
        # with it every reply in it or published while the gateway reconnects, although the
        # sessions survive. Durable, so that it is there when the servers come back after a
        # broker restart, before this gateway does. It expires once nobody consumes it
        # (declared at every setup of the consumer: after a long outage it may have
        # expired); the consumer is exclusive too.
        self.reply_consumer = Consumer(
            link,
            QueueSpec(s.reply_queue, durable=True, arguments=self._reply_queue_arguments()),
            replies.on_reply,
            no_ack=True,
            exclusive=True,
            declare=True,
            name=f"consumer {s.reply_queue}",
            lease=lease,
            poison=replies.failed,
        )
        for server_id in saved_servers:
            await hub.declare_server_queue(server_id)
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
            ServerRegistry(hub, self.metrics).on_message,
            no_ack=True,
            declare=True,
            name=f"consumer {s.registry_queue}",
            lease=lease,
        )
        if s.peers:
            self.peers = Peers(hub)
            hub.on_association = self.peers.associated
            self.offline.notify = self.peers.offline_kept
            self.peers.on_offline = self.offline.arrived
            hub.auth.announce = self.peers.claimed
            self.peers.on_claim = hub.auth.claimed_elsewhere
            await self.peers.attach(broker, link, lease)
        try:
            await link.start()
        except LinkError as exc:
            error = self._start_error(exc)
            if error is exc:
                raise
            raise error from exc
        if lease.held.is_set():
            await self._serve(broker, ssl_context)
        else:  # not ready, not listening: another process serves this instance
            hub.spawn(self._serve_once_owned(broker, ssl_context))

    async def _serve_once_owned(self, broker: Any, ssl_context: ssl.SSLContext | None) -> None:
        await self.lease.held.wait()
        try:
            await self._serve(broker, ssl_context)
        except Exception:
            log.exception("gateway could not start serving after it took its instance over")

    async def _serve(self, broker: Any, ssl_context: ssl.SSLContext | None) -> None:
        """The instance is this process's: read the other replicas, listen."""
        s = self.settings
        hub = self.hub
        assert hub is not None and self.housekeeper is not None and self.link is not None
        try:
            if self.peers is not None:
                # Before listening: the first clients are placed on the global view, and a
                # returning client_id finds the server another replica gave it.
                await self.peers.start(broker)
        except BaseException:
            await self.link.close()  # a worker whose start failed is not stopped
            raise
        self._served = True
        self._consuming = True

        loop = asyncio.get_running_loop()
        for label, _, listener in s.bound_listeners():
            kind = Session if listener.framing == "frames" else StreamSession
            context = self._client_context if listener.client_auth == "required" else ssl_context
            server = await loop.create_server(
                functools.partial(kind, hub, listener),
                s.host,
                listener.port,
                backlog=s.backlog,
                ssl=context if listener.tls else None,
                ssl_handshake_timeout=s.hello_timeout_s if listener.tls else None,
            )
            self.listeners.append(server)
            self.ports[label] = server.sockets[0].getsockname()[1]
        self.housekeeper.start()
        log.info(
            "gateway listening",
            extra={"host": s.host, **self.ports, "instance": s.instance},
        )

    def _reply_queue_arguments(self) -> dict[str, Any]:
        return {"x-expires": max(1, round(self.settings.reply_queue_expires_s * 1000))}

    def _start_error(self, exc: LinkError) -> Exception:
        """What the broker refused about the reply queue at start, as the operator's fix
        (another process holding it is not an error: this one waits for it, see start)."""
        queue = self.settings.reply_queue
        if f"'{queue}'" not in exc.text:
            return exc
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
        return server_context(
            s.tls_cert, s.tls_key, settings="BRIDGE_GATEWAY__TLS_CERT / BRIDGE_GATEWAY__TLS_KEY"
        )

    def _client_auth_context(self) -> ssl.SSLContext | None:
        """The TLS context of the listeners with ``client_auth: required``: the client's
        certificate must be signed by ``tls_client_ca``. It is asked for, not demanded
        (CERT_OPTIONAL), so that a client without one gets ERROR ``unauthorized`` from the
        session (counted, rate-limited) instead of a bare TLS alert; one that does not
        verify fails the handshake."""
        s = self.settings
        if not s.client_auth_listeners or s.tls_client_ca is None or s.tls_cert is None:
            return None
        # Not create_default_context: it would also trust the system's CAs, and any
        # certificate a public CA signed for a name would then prove that client_id.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(s.tls_cert, s.tls_key)
            context.load_verify_locations(cafile=s.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load TLS certificate {s.tls_cert} / key {s.tls_key} / client CA "
                f"{s.tls_client_ca}: {exc}"
            ) from exc
        context.verify_mode = ssl.CERT_OPTIONAL
        return context

    @property
    def port(self) -> int:
        """The first plain frames listener's port (0 if there is none)."""
        for label, _, listener in self.settings.bound_listeners():
            if listener.framing == "frames" and not listener.tls and label in self.ports:
                return self.ports[label]
        return 0

    async def stop(self, grace: float) -> None:
        if self.hub is not None:
            self.hub.stopping = True
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
                if not (self.sessions or self.in_flight or (self.hub and self.hub.waiting)):
                    break
                await asyncio.sleep(0.02)
            for session in list(self.sessions.values()):
                if session.transport is not None:
                    session.transport.abort()
            for pipe in list(self.hub.relays if self.hub is not None else ()):
                if pipe.transport is not None:
                    pipe.transport.abort()  # pass-through connections end with the gateway
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
            if self.peers is not None and self._served:
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
            if self.hub is not None:
                self.hub.cancel_tasks()
                self.hub.auth.close()  # the last failed authentications, in their line
            if self.offline is not None:
                self.offline.close()
            for channel in self._channels:
                with contextlib.suppress(Exception):
                    await channel.close()
            if self.store is not None:
                self.store.close()

    def listen_ports(self) -> list[tuple[str, str, int]]:
        """The listeners' (variable, host, port), for the host to check before it connects."""
        s = self.settings
        return [(variable, s.host, x.port) for _, variable, x in s.bound_listeners()]

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
        link = self.link
        if link is None or not link.ready:
            return False, "; ".join(link.not_ready() if link is not None else ["no broker link"])
        if not self._consuming:
            return False, "not consuming"
        if not self.listeners:
            return False, "not listening"
        return True, f"listening {self.ports}, {len(self.sessions)} connections"

    def admin(self, view: str) -> Any:
        now = time.monotonic()
        if view in ("", "summary"):
            states: dict[str, int] = {}
            for session in self.sessions.values():
                name = session.state.label
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
                "sessions_waiting_for_window": len(self.hub.waiting) if self.hub else 0,
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
                        "state": session.state.label,
                        "client_id": session.sticky_id,
                        "client_auth": session.proof,
                        "client_addr": session.peer,
                        "server": session.server,
                        "age_s": round(now - session.accepted_at, 3),
                        "idle_s": round(now - session.last_rx, 3),
                        "in_flight": session.in_flight,
                    }
                )
            return out
        return None
