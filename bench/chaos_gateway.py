"""Fault, overload, bad-input and security suite of the ``gateway`` worker (issue 6).

    python -m bench.chaos_gateway                     # full run (about 6 minutes)
    python -m bench.chaos_gateway --quick             # shorter, fewer kills
    python -m bench.chaos_gateway --seed 7 --only crash,broker
    python -m bench.chaos_gateway --no-broker-restart # leave the broker alone

Prints one JSON object on stdout (progress on stderr). Scenarios:

``crash``
    ``kill -9`` of the gateway process at random moments (seeded) during sustained echo
    load, restart under the same instance and state directory. Clients reconnect with their
    ``client_id`` and resend what was not answered.
``broker``
    The gateway talks to the broker through a proxy that drops, stalls (short and long) and
    slows every connection, then the broker itself restarts (``rabbitmqctl stop_app`` /
    ``start_app``; only here, never in tests/). A ledger of the publishes the broker
    confirmed is kept inside the gateway (it runs in this process for that).
``overload``
    Clients send open-loop at about twice what the only backend can handle, for a while;
    then they stop. Gateway memory, its publish window, the backlog in the broker and the
    round trip of a probe client before, during and after.
``input``
    ``bench/chaos_gateway_input.py``: the corpus, seeded mutations of it, slowloris HELLOs,
    a client that never reads, a connection flood, secrets in DEBUG logs.

What "acknowledged" means here. The gateway tells a client nothing when the broker confirms
its DATA: there is no ack frame, and the server's reply is the only sign that a message got
through. So a client cannot know which of its messages were taken when a session ends
without a reply (gateway killed, ERROR ``unavailable``): per socket the gateway path is
*at most once*. It is *at least once* for clients that resend what was not answered, keyed
by an id inside the payload, which is what the clients here do; duplicates at the server
are then expected and reported with their reason. The figures:

- ``sent``: distinct message ids; ``acknowledged``: ids answered by the echo server (the
  client's only acknowledgement); ``lost`` = sent - acknowledged, after the clients' resends
  (must be 0);
- ``delivered``: distinct ids the servers received; ``duplicated``: ids received more than
  once, by reason (``client_resend_after_reconnect`` / ``..._after_timeout``; a
  ``gateway_duplicate`` -- one attempt received twice -- must be 0);
- ``attempts_lost_in_flight``: sends that never reached a server (read by a gateway that
  was then killed, or failed with ``unavailable``): what "at most once per socket" costs;
- ``broker_confirmed_lost`` (broker scenario): publishes the broker confirmed to the
  gateway that no server received (must be 0);
- per session, the server sees the client's DATA in order: ``order_violations`` must be 0;
  ``gaps`` counts sessions where a message in the middle is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python bench/chaos_gateway.py` works too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    WorkerProcess,
    broker_url,
    emit,
    free_port,
    percentile,
    progress,
    rabbitmqctl,
    rnd,
    rss_bytes,
    unique,
)
from bench.gateway import gateway_env
from bridge.amqp.frames import Properties
from workers.gateway.backend import BackendServer, Reply, ServerEvent
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.config import GatewaySettings
from workers.gateway.protocol import FrameType, encode_data

NAME = "gateway"
SERVERS = ("s1", "s2")


# -- the ledger ----------------------------------------------------------------------------


def message(cid: str, seq: int, attempt: int, size: int) -> bytes:
    head = f"{cid}|{seq}|{attempt}|".encode()
    return head + b"." * max(0, size - len(head))


def parse(body: bytes) -> tuple[str, int, int] | None:
    try:
        cid, seq, attempt, _ = body.split(b"|", 3)
        return cid.decode(), int(seq), int(attempt)
    except ValueError:
        return None


@dataclass
class ServerLedger:
    """What the backends received, in the order each received it."""

    data: list[tuple[str, str, int, int]] = field(default_factory=list)  # session, cid, seq, att
    # the same, delivered again by the broker (the server's ack was lost in a broker restart)
    redelivered: list[tuple[str, str, int, int]] = field(default_factory=list)
    connects: set[str] = field(default_factory=set)
    disconnects: set[str] = field(default_factory=set)
    delay_s: float = 0.0  # overload: a slow backend

    async def handle(self, event: ServerEvent) -> list[Reply]:
        if event.event == "connect":
            self.connects.add(event.session or "")
        elif event.event == "disconnect":
            self.disconnects.add(event.session or "")
        elif event.event == "data":
            parsed = parse(event.body)
            if parsed is not None:
                (self.redelivered if event.redelivered else self.data).append(
                    (event.session or "", *parsed)
                )
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return [Reply(event.body)]
        return []


class ChaosClient:
    """A client with an id that keeps ``window`` messages unanswered, reconnects with its
    ``client_id`` after any failure and resends every unanswered message (a new attempt),
    also on a live connection when an answer is ``resend_after_s`` late. With ``rate`` it
    sends open-loop at that many messages per second instead."""

    def __init__(
        self,
        cid: str,
        port: Callable[[], int],
        *,
        window: int = 4,
        size: int = 128,
        rate: float | None = None,
        resend_after_s: float = 10.0,
        token: str | None = None,
        seed: int = 0,
    ) -> None:
        self.cid = cid
        self.port = port
        self.window = window
        self.size = size
        self.rate = rate
        self.resend_after_s = resend_after_s
        self.token = token
        self.rng = random.Random(seed)
        self.sending = True
        self.next_seq = 0
        self.attempts = 0
        self.unanswered: dict[int, tuple[int, float]] = {}  # seq -> (attempt, sent at)
        self.answered: set[int] = set()
        self.reason: dict[tuple[int, int], str] = {}  # (seq, attempt) -> why it was sent
        self.sends: dict[str, list[tuple[int, int]]] = {}  # session -> (seq, attempt) sent
        self.rtts: list[tuple[float, float]] = []  # (answered at, round trip)
        self.duplicate_replies = 0
        self.closes: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.sessions = 0
        self.sticky_same = 0
        self.sticky_moved = 0
        self.timeout_resends = 0
        self._server: str | None = None
        self._next_at = 0.0

    @property
    def done(self) -> bool:
        return not self.sending and not self.unanswered

    async def run(self) -> None:
        while not self.done:
            try:
                client = await GatewayClient.connect(
                    "127.0.0.1", self.port(), client_id=self.cid, token=self.token, timeout=5
                )
            except GatewayError as exc:
                self.connect_failures[exc.code] += 1
            except (OSError, TimeoutError) as exc:
                self.connect_failures[type(exc).__name__] += 1
            else:
                try:
                    await self._session(client)
                except (ConnectionError, OSError, RuntimeError):  # uvloop: "handler is closed"
                    self.closes["reset"] += 1
                finally:
                    client.close()
                if self.done:
                    return
            await asyncio.sleep(self.rng.uniform(0.02, 0.2))

    async def _session(self, client: GatewayClient) -> None:
        self.sessions += 1
        if self._server is not None:
            if client.server == self._server:
                self.sticky_same += 1
            else:
                self.sticky_moved += 1
        self._server = client.server
        sends = self.sends.setdefault(client.session, [])
        for seq in sorted(self.unanswered):
            self._send(client, sends, seq, "reconnect")
        self._next_at = max(self._next_at, time.monotonic())
        while True:
            now = time.monotonic()
            while self.sending and len(self.unanswered) < self.window:
                if self.rate is not None:
                    if now < self._next_at:
                        break
                    self._next_at += 1.0 / self.rate
                self.next_seq += 1  # first: a write that raises must not reuse the number
                self._send(client, sends, self.next_seq - 1, "first")
            for seq, (_, sent_at) in list(self.unanswered.items()):
                if now - sent_at > self.resend_after_s:
                    self.timeout_resends += 1
                    self._send(client, sends, seq, "timeout")
            await client.writer.drain()
            if self.done:
                await client.bye()
                self.closes["client_bye"] += 1
                return
            wait = 0.5 if self.rate is None else max(0.001, min(0.5, self._next_at - now))
            try:
                frame = await asyncio.wait_for(client.next_frame(), wait)
            except TimeoutError:
                continue
            if frame is None:
                self.closes["eof"] += 1
                return
            if frame.type is FrameType.DATA:
                self._answer(frame.payload)
            elif frame.type is FrameType.ERROR:
                self.closes[json.loads(frame.payload).get("code", "?")] += 1
                return
            elif frame.type is FrameType.BYE:
                self.closes["bye"] += 1
                return

    def _send(
        self, client: GatewayClient, sends: list[tuple[int, int]], seq: int, why: str
    ) -> None:
        attempt = self.unanswered[seq][0] + 1 if seq in self.unanswered else 0
        self.unanswered[seq] = (attempt, time.monotonic())
        self.reason[(seq, attempt)] = why
        sends.append((seq, attempt))
        self.attempts += 1
        client.writer.write(encode_data(message(self.cid, seq, attempt, self.size)))

    def _answer(self, body: bytes) -> None:
        parsed = parse(body)
        if parsed is None or parsed[0] != self.cid:
            self.duplicate_replies += 1  # never expected: count rather than crash
            return
        _, seq, _ = parsed
        pending = self.unanswered.pop(seq, None)
        if pending is None:
            self.duplicate_replies += 1
            return
        now = time.monotonic()
        self.answered.add(seq)
        self.rtts.append((now, now - pending[1]))


def analyse(clients: list[ChaosClient], ledger: ServerLedger) -> dict[str, Any]:
    """The ledger: what was sent, acknowledged, delivered, lost, duplicated, reordered."""
    by_client = {c.cid: c for c in clients}
    received_ids: Counter[tuple[str, int]] = Counter()
    received_attempts: Counter[tuple[str, int, int]] = Counter()
    per_session: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for session, cid, seq, attempt in ledger.data:
        if cid not in by_client:
            continue
        received_ids[(cid, seq)] += 1
        received_attempts[(cid, seq, attempt)] += 1
        per_session[session].append((seq, attempt))
    reasons: Counter[str] = Counter()
    reasons["gateway_duplicate"] = sum(n - 1 for n in received_attempts.values() if n > 1)
    for (cid, seq), count in received_ids.items():
        if count > 1:
            attempts = sorted(a for c, s, a in received_attempts if c == cid and s == seq)
            for attempt in attempts[1:]:
                why = by_client[cid].reason.get((seq, attempt), "?")
                reasons[f"client_resend_after_{why}"] += 1
    redelivered = [x for x in ledger.redelivered if x[1] in by_client]
    if redelivered:
        reasons["broker_redelivered_to_server"] = len(redelivered)
    sent = sum(c.next_seq for c in clients)
    acknowledged = sum(len(c.answered) for c in clients)
    attempts = sum(c.attempts for c in clients)
    # A message the broker handed to the server once before (redelivered) may arrive only
    # flagged as redelivered, and after later ones: order is judged on first deliveries,
    # completeness (a prefix, no hole) on everything the server received.
    again: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for session, _, seq, attempt in ledger.redelivered:
        again[session].add((seq, attempt))
    violations = gaps = 0
    for client in clients:
        for session, sent_list in client.sends.items():
            got = per_session.get(session, [])
            positions = {item: i for i, item in enumerate(sent_list)}
            order = [positions.get(item, -1) for item in got]
            if -1 in order or order != sorted(order):
                violations += 1
            received = set(got) | again.get(session, set())
            if received != set(sent_list[: len(received)]):
                gaps += 1
    return {
        "sent": sent,
        "acknowledged": acknowledged,
        "delivered": len(received_ids),
        "lost": sent - acknowledged,
        "duplicated": {
            "count": sum(1 for v in received_ids.values() if v > 1) + len(redelivered),
            "reasons": dict(reasons),
        },
        "attempts": attempts,
        "attempts_lost_in_flight": attempts - len(received_attempts),
        "duplicate_replies_to_clients": sum(c.duplicate_replies for c in clients),
        "timeout_resends": sum(c.timeout_resends for c in clients),
        "sessions": {
            "opened": sum(c.sessions for c in clients),
            "reconnects": sum(max(0, c.sessions - 1) for c in clients),
            "closed_by": dict(sum((c.closes for c in clients), Counter())),
            "connect_failures": dict(sum((c.connect_failures for c in clients), Counter())),
            "sticky_same_server": sum(c.sticky_same for c in clients),
            "sticky_moved": sum(c.sticky_moved for c in clients),
            "order_violations": violations,
            "gaps": gaps,
            "without_disconnect_event": len(ledger.connects - ledger.disconnects),
        },
    }


# -- shared infrastructure -----------------------------------------------------------------


def settings_for(prefix: str) -> GatewaySettings:
    """The names a gateway started with ``gateway_env(prefix, ...)`` uses."""
    return GatewaySettings(
        servers_exchange=f"{prefix}.servers",
        server_queue_prefix=f"{prefix}.server.",
        undeliverable_queue=f"{prefix}.undeliverable",
        reply_queue_prefix=f"{prefix}.reply.",
        registry_queue_prefix=f"{prefix}.registry.",
        instance=prefix,
        peers=False,  # one replica: no peers exchange or sticky stream left in the broker
    )


def env_for(prefix: str, port: int, **settings: Any) -> dict[str, str]:
    env = gateway_env(prefix, port)
    env.update({"BRIDGE_GATEWAY__STATE_FLUSH_S": "0.2", "BRIDGE_GATEWAY__SERVER_TTL_S": "5"})
    env["BRIDGE_GATEWAY__PEERS"] = "false"  # one replica per scenario
    env.update({f"BRIDGE_GATEWAY__{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def start_servers(
    prefix: str, ledger: ServerLedger, ids: tuple[str, ...] = SERVERS, prefetch: int = 256
) -> list[BackendServer]:
    settings = settings_for(prefix)
    servers = [
        BackendServer(
            broker_url(),
            sid,
            settings=settings,
            heartbeat_s=1.0,
            handler=ledger.handle,
            prefetch=prefetch,
        )
        for sid in ids
    ]
    for server in servers:
        await server.start()
    return servers


async def alive_at(gateway: WorkerProcess, ids: tuple[str, ...], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            status, body = gateway.http("/admin/gateway/summary")
            if status == 200 and set(ids) <= set(json.loads(body)["servers_alive"]):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"servers {ids} never alive at the gateway")


async def queue_depth(name: str) -> int:
    import aio_pika
    import aiormq

    conn = await aio_pika.connect(broker_url())
    try:
        channel = await conn.channel()
        try:
            q = await channel.declare_queue(name, passive=True)
            return int(q.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return -1
    finally:
        await conn.close()


async def cleanup(prefix: str) -> None:
    import aio_pika

    s = settings_for(prefix)
    conn = await aio_pika.connect(broker_url())
    try:
        for queue in [s.undeliverable_queue, s.reply_queue, *(s.server_queue(i) for i in SERVERS)]:
            channel = await conn.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                await channel.close()
        channel = await conn.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(s.servers_exchange)
    finally:
        await conn.close()


class RssWatch:
    """Largest RSS of a process whose pid may change (restarts), sampled in the background."""

    def __init__(self, pid: Callable[[], int | None], period: float = 0.2) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            pid = self.pid()
            if pid is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.samples.append((time.monotonic(), rss_bytes(pid)))
            await asyncio.sleep(self.period)

    def max_mib(self, since: float = 0.0, until: float = float("inf")) -> float:
        values = [v for t, v in self.samples if since <= t <= until]
        return rnd(max(values, default=0) / 2**20, 1)

    def stop(self) -> None:
        self._task.cancel()


def _running_pid(proc: WorkerProcess) -> int | None:
    p = proc.proc
    return p.pid if p is not None and p.poll() is None else None


async def finish(
    clients: list[ChaosClient], tasks: list[asyncio.Task[None]], timeout: float
) -> None:
    """Stop new messages; wait until everything sent is answered (resends included)."""
    for client in clients:
        client.sending = False
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


# -- crash ---------------------------------------------------------------------------------


async def crash(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prefix = unique("chaos-gw-crash")
    port = free_port()
    gateway = WorkerProcess(["gateway"], state_dir=root / "crash", env=env_for(prefix, port))
    ledger = ServerLedger()
    servers: list[BackendServer] = []
    await asyncio.to_thread(gateway.start)
    rss = RssWatch(lambda: _running_pid(gateway))
    schedule: list[str] = []  # seconds up before the kill + seconds down
    restart_s: list[float] = []
    start_failures = 0
    try:
        servers = await start_servers(prefix, ledger)
        await alive_at(gateway, SERVERS)
        clients = [
            ChaosClient(f"c{i}", lambda: port, window=4, seed=args.seed * 1000 + i)
            for i in range(args.clients)
        ]
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in clients]
        await asyncio.sleep(2.0)
        for kill in range(args.kills):
            up, down = rng.uniform(0.3, 3.0), rng.uniform(0.0, 1.0)
            schedule.append(f"{up:.2f}+{down:.2f}")
            await asyncio.sleep(up)
            assert gateway.proc is not None
            gateway.proc.kill()  # SIGKILL
            await asyncio.to_thread(gateway.proc.wait)
            await asyncio.sleep(down)
            started = time.monotonic()
            for _ in range(20):
                try:
                    await asyncio.to_thread(gateway.start)
                    break
                except RuntimeError as exc:  # e.g. the broker still saw the old consumer
                    start_failures += 1
                    progress("restart failed, again:", str(exc)[-200:])
                    await asyncio.sleep(0.5)
            restart_s.append(time.monotonic() - started)
            progress(f"crash: kill {kill + 1}/{args.kills} after {up:.2f}s up, {down:.2f}s down")
        await asyncio.sleep(3.0)
        await finish(clients, tasks, timeout=120)
        await asyncio.sleep(1.0)  # the last disconnect events
        out = analyse(clients, ledger)
        out.update(
            {
                "kills": args.kills,
                "kill_schedule_s": schedule,
                "restart_to_ready_s": {
                    "p50": rnd(percentile(restart_s, 50), 2),
                    "max": rnd(max(restart_s, default=0), 2),
                },
                "start_failures": start_failures,
                "clients": args.clients,
                "replies_to_dead_sessions_in_undeliverable": await queue_depth(
                    settings_for(prefix).undeliverable_queue
                ),
                "max_rss_mib": rss.max_mib(),
            }
        )
        return out
    finally:
        rss.stop()
        await asyncio.to_thread(gateway.stop)
        for server in servers:
            await server.stop()
        await cleanup(prefix)


# -- broker faults -------------------------------------------------------------------------


class Readiness:
    """Samples /readyz (the host's readiness, what the endpoint serves) every 20 ms."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready
        self.samples: list[tuple[float, bool]] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.ready()))
            await asyncio.sleep(0.02)

    def not_ready_s(self, since: float) -> float:
        total, last = 0.0, None
        for t, ok in self.samples:
            if t < since:
                continue
            if last is not None and not last[1]:
                total += t - last[0]
            last = (t, ok)
        return rnd(total, 2)

    async def wait_ready(self, timeout: float = 90.0) -> float:
        started = time.monotonic()
        while not self.ready():
            if time.monotonic() - started > timeout:
                raise RuntimeError("not ready again after the fault")
            await asyncio.sleep(0.02)
        return rnd(time.monotonic() - started, 2)

    def stop(self) -> None:
        self._task.cancel()


async def broker(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from bridge.host import Host
    from bridge.settings import HostSettings
    from tests.proxy import TcpProxy
    from workers.gateway.worker import GatewayWorker

    prefix = unique("chaos-gw-broker")
    parts = urlsplit(broker_url())
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = settings_for(prefix).model_copy(
        update={"host": "127.0.0.1", "port": 0, "state_flush_s": 0.2, "server_ttl_s": 5.0}
    )
    worker = GatewayWorker(s)
    host = Host(
        HostSettings(
            amqp_url=proxy.url(parts.username or "guest", parts.password or "guest"),
            state_dir=root / "broker",
            http_port=0,
            heartbeat_s=2,
            drain_seconds=5,
        ),
        [worker],
        install_signals=False,
    )
    running = asyncio.get_running_loop().create_task(host.run())
    ledger = ServerLedger()
    servers: list[BackendServer] = []
    readiness = Readiness(lambda: host.readiness()[0])
    phases: dict[str, Any] = {}
    try:
        await readiness.wait_ready(60)
        confirmed, failed = _confirm_ledger(worker)
        servers = await start_servers(prefix, ledger)
        for _ in range(600):
            if set(SERVERS) <= set(worker.balancer.alive()):
                break
            await asyncio.sleep(0.05)
        # half of them pipeline deeply: more DATA read than may be in flight per session
        clients = [
            ChaosClient(
                f"b{i}",
                lambda: worker.port,
                window=4 if i % 2 else 100,
                resend_after_s=5.0,
                seed=args.seed * 1000 + i,
            )
            for i in range(args.clients)
        ]
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in clients]
        await asyncio.sleep(2.0)

        async def drop() -> None:
            proxy.accepting = False
            proxy.cut()
            await asyncio.sleep(2.0)
            proxy.accepting = True

        async def stall(seconds: float) -> None:
            proxy.stall()
            await asyncio.sleep(seconds)
            proxy.resume()

        async def slow() -> None:
            proxy.latency = 0.05
            await asyncio.sleep(5.0)
            proxy.latency = 0.0

        async def restart() -> None:
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(rabbitmqctl, "start_app")

        faults: list[tuple[str, Callable[[], Any]]] = [
            ("drop_2s", drop),
            ("stall_1s", lambda: stall(1.0)),
            # aiormq gives up on a silent connection after 3 * (heartbeat + 1) s = 9 s
            ("stall_12s", lambda: stall(12.0)),
            ("slow_50ms_5s", slow),
        ]
        if args.broker_restart:
            faults.append(("broker_restart", restart))
        for name, fault in faults:
            before = sum((c.closes for c in clients), Counter())
            acked_before = sum(len(c.answered) for c in clients)
            timeouts_before = sum(c.timeout_resends for c in clients)
            redelivered_before = len(ledger.redelivered)
            started = time.monotonic()
            progress(f"broker: {name}")
            await fault()
            ready_after = await readiness.wait_ready()
            await asyncio.sleep(3.0)  # load goes on; clients that were cut come back
            closes = sum((c.closes for c in clients), Counter()) - before
            phases[name] = {
                "not_ready_s": readiness.not_ready_s(started),
                "ready_again_after_heal_s": ready_after,
                "sessions_closed_by": dict(closes),
                "answered_during_phase": sum(len(c.answered) for c in clients) - acked_before,
                "replies_late_resent": sum(c.timeout_resends for c in clients) - timeouts_before,
                "redelivered_to_server": len(ledger.redelivered) - redelivered_before,
                "gateway_reconnects": host.broker.reconnects,
            }
        await finish(clients, tasks, timeout=120)
        for _ in range(100):  # the last disconnect events
            if ledger.connects <= ledger.disconnects:
                break
            await asyncio.sleep(0.05)
        out = analyse(clients, ledger)
        delivered = {(cid, seq, att) for _, cid, seq, att in ledger.data + ledger.redelivered}
        out.update(
            {
                "faults": phases,
                "broker_confirmed": len(confirmed),
                "broker_confirmed_lost": len(set(confirmed) - delivered),
                "publishes_failed": len(failed),
                "gateway_reconnects": host.broker.reconnects,
                "gateway_restarted": False,
            }
        )
        return out
    finally:
        readiness.stop()
        host.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 30)
        for server in servers:
            await server.stop()
        await proxy.stop()
        await cleanup(prefix)


def _confirm_ledger(worker: Any) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Every DATA publish the broker confirmed to the gateway (and those it failed)."""
    confirmed: list[tuple[str, int, int]] = []
    failed: list[tuple[str, int, int]] = []
    publish = worker.publisher.publish

    def recording(
        exchange: str, routing_key: str, body: bytes, properties: Any = None, **kw: Any
    ) -> Any:
        fut = publish(exchange, routing_key, body, properties, **kw)
        if isinstance(properties, bytes):  # encoded, as the gateway keeps a session's
            properties = Properties.decode(properties)
        headers = (properties.headers if properties is not None else None) or {}
        parsed = parse(body) if headers.get("x-event") == "data" else None
        if parsed is not None:

            def settled(f: asyncio.Future[None]) -> None:
                ok = not f.cancelled() and f.exception() is None
                (confirmed if ok else failed).append(parsed)

            fut.add_done_callback(settled)
        return fut

    worker.publisher.publish = recording
    return confirmed, failed


# -- overload ------------------------------------------------------------------------------


async def overload(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    prefix = unique("chaos-gw-overload")
    port = free_port()
    gateway = WorkerProcess(["gateway"], state_dir=root / "overload", env=env_for(prefix, port))
    ledger = ServerLedger(delay_s=0.002)  # one slow backend, one message at a time
    servers: list[BackendServer] = []
    await asyncio.to_thread(gateway.start)
    rss = RssWatch(lambda: _running_pid(gateway), period=0.25)
    window_samples: list[int] = []
    depth_samples: list[tuple[float, int]] = []
    queue = settings_for(prefix).server_queue("s1")
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            with contextlib.suppress(OSError, ValueError):
                summary = json.loads(gateway.http("/admin/gateway/summary")[1])
                window_samples.append(int(summary["publish_in_flight"]))
            depth_samples.append((time.monotonic(), await queue_depth(queue)))
            await asyncio.sleep(0.5)

    try:
        servers = await start_servers(prefix, ledger, ("s1",), prefetch=1)
        await alive_at(gateway, ("s1",))
        sampler = asyncio.get_running_loop().create_task(sample())
        # what the backend can take: a closed loop with many messages outstanding
        calibrate = ChaosClient("cal", lambda: port, window=64, resend_after_s=600, seed=2)
        calibrating = asyncio.get_running_loop().create_task(calibrate.run())
        await asyncio.sleep(4.0)
        capacity = len(calibrate.answered) / 4.0
        await finish([calibrate], [calibrating], timeout=60)
        rate = args.overload_factor * capacity
        probe = ChaosClient("probe", lambda: port, window=1, rate=5.0, resend_after_s=600, seed=1)
        probe_task = asyncio.get_running_loop().create_task(probe.run())
        await asyncio.sleep(5.0)
        baseline_end = time.monotonic()
        handled_before = len(ledger.data)
        load = [
            ChaosClient(
                f"o{i}",
                lambda: port,
                window=10**9,
                rate=rate / args.clients,
                size=256,
                resend_after_s=600,
                seed=100 + i,
            )
            for i in range(args.clients)
        ]
        progress(f"overload: {rate:.0f}/s offered, {capacity:.0f}/s taken, {args.overload_s}s")
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in load]
        await asyncio.sleep(args.overload_s)
        load_end = time.monotonic()
        handled_during = len(ledger.data) - handled_before
        for client in load:
            client.sending = False
        await finish(load, tasks, timeout=args.overload_s * 6 + 120)
        drained = time.monotonic()
        await asyncio.sleep(5.0)
        probe.sending = False
        await asyncio.wait_for(probe_task, 60)
        stop_sampling.set()
        await sampler

        def rtts(since: float, until: float) -> list[float]:
            return [r for t, r in probe.rtts if since <= t < until]

        base = rtts(0, baseline_end)
        base_p50 = percentile(base, 50)
        recovered_at = next(
            (t for t, r in probe.rtts if t > load_end and r <= max(3 * base_p50, base_p50 + 0.05)),
            None,
        )
        out = analyse([*load, probe], ledger)
        out.update(
            {
                "backend_capacity_per_s": rnd(capacity, 1),
                "offered_per_s": rnd(rate, 1),
                "seconds": args.overload_s,
                "backend_handled_per_s": rnd(handled_during / (load_end - baseline_end), 1),
                "backlog_max": max((d for _, d in depth_samples), default=0),
                "backlog_drained_after_load_s": rnd(drained - load_end, 1),
                "publish_in_flight_max": max(window_samples, default=0),
                "publish_window": GatewaySettings().publish_window,
                "rss_mib": {
                    "before": rss.max_mib(0, baseline_end),
                    "max_during": rss.max_mib(baseline_end, load_end),
                    "max_after": rss.max_mib(load_end),
                    "end": rnd(rss.samples[-1][1] / 2**20, 1) if rss.samples else None,
                    "every_10s_of_load": _every(rss.samples, baseline_end, drained, 2**20),
                },
                "backlog_every_10s_of_load": _every(depth_samples, baseline_end, drained),
                "probe_rtt_ms": {
                    "before_p50": rnd(base_p50 * 1000, 1),
                    "during_max": rnd(max(rtts(baseline_end, load_end), default=0) * 1000, 1),
                    "after_drain_p50": rnd(percentile(rtts(drained, float("inf")), 50) * 1000, 1),
                },
                "latency_recovered_after_load_s": (
                    rnd(recovered_at - load_end, 1) if recovered_at is not None else None
                ),
                "max_rss_mib": rss.max_mib(),
            }
        )
        return out
    finally:
        stop_sampling.set()
        rss.stop()
        await asyncio.to_thread(gateway.stop)
        for server in servers:
            await server.stop()
        await cleanup(prefix)


def _every(
    samples: list[tuple[float, int]], since: float, until: float, unit: int = 1
) -> list[float]:
    """The first sample of each 10 s step from ``since`` to ``until`` (RSS, queue depth)."""
    out: list[float] = []
    step = since
    for t, value in samples:
        if since <= t <= until and t >= step:
            out.append(rnd(value / unit, 1))
            step += 10.0
    return out


# -- the run -------------------------------------------------------------------------------

SCENARIOS = ("crash", "broker", "overload", "input")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from bench import chaos_gateway_input

    root = Path(tempfile.mkdtemp(prefix="chaos-gateway-"))
    progress(f"chaos gateway: seed {args.seed}, scenarios {','.join(args.only)}, in {root}")
    started = time.monotonic()
    results: dict[str, Any] = {}
    runners = {
        "crash": crash,
        "broker": broker,
        "overload": overload,
        "input": chaos_gateway_input.run,
    }
    for name in args.only:
        progress(f"== {name}")
        results[name] = await runners[name](args, root)
        progress(name, json.dumps(results[name])[:600])
    return summarise(args, results, time.monotonic() - started)


def summarise(args: argparse.Namespace, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One summary with the counters ``bench/chaos.py`` merges (``sent``, ``acknowledged``,
    ``expected``, ``delivered``, ``lost``, ``duplicated``, ``kills``, ``reconnects``,
    ``max_rss_mib``, ``ok``, ``failures``), the scenarios' own figures under ``scenarios``."""
    ledgers = [r for r in results.values() if "sent" in r]
    reasons: Counter[str] = Counter()
    for r in ledgers:
        reasons.update(r["duplicated"]["reasons"])
    violations = reasons.pop("gateway_duplicate", 0)
    if violations:
        reasons["violation: one attempt delivered twice by the gateway"] = violations
    lost = sum(r["lost"] for r in ledgers)
    failures: list[str] = []
    for name, r in results.items():
        if r.get("lost"):
            failures.append(f"{name}: {r['lost']} messages never answered after resends")
        if r.get("sessions", {}).get("order_violations"):
            failures.append(f"{name}: {r['sessions']['order_violations']} sessions out of order")
        if r.get("sessions", {}).get("gaps"):
            failures.append(f"{name}: {r['sessions']['gaps']} sessions with a hole")
        if r.get("broker_confirmed_lost"):
            failures.append(f"{name}: {r['broker_confirmed_lost']} confirmed publishes lost")
        if r.get("failures"):
            failures.append(f"{name}: {r['failures']} failures: {r.get('failure_examples')}")
    if violations:
        failures.append(f"{violations} attempts delivered twice by the gateway")
    count = sum(r["duplicated"]["count"] for r in ledgers)
    return {
        "worker": NAME,
        "command": "python -m bench.chaos_gateway" + (" --quick" if args.quick else ""),
        "seed": args.seed,
        "ok": not failures,
        "failures": failures,
        "seconds": rnd(seconds, 1),
        "sent": sum(r["sent"] for r in ledgers),
        "acknowledged": sum(r["acknowledged"] for r in ledgers),
        "expected": sum(r["acknowledged"] for r in ledgers),
        "delivered": sum(r["delivered"] for r in ledgers),
        "lost": lost,
        "duplicated": {
            "count": count,
            "allowed": count - violations,
            "violations": violations,
            "reasons": dict(reasons),
        },
        "kills": results.get("crash", {}).get("kills", 0),
        "reconnects": results.get("broker", {}).get("gateway_reconnects", 0),
        "client_reconnects": sum(r["sessions"]["reconnects"] for r in ledgers),
        "max_rss_mib": max((r.get("max_rss_mib", 0) for r in results.values()), default=0),
        "acknowledged_means": (
            "the server's echo reached the client: the gateway sends no ack frame, so a client "
            "cannot tell which DATA the broker confirmed; the path is at most once per socket "
            "and at least once with client resends keyed by an id in the payload, which these "
            "clients do (duplicates at the server are counted with their reason)"
        ),
        "scenarios": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run, fewer kills")
    parser.add_argument("--seed", type=int, help="seed of every random choice (printed)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--kills", type=int, help="kill -9 count (at least 20 in a full run)")
    parser.add_argument("--clients", type=int, help="load clients per scenario")
    parser.add_argument(
        "--overload-s",
        "--overload-seconds",
        dest="overload_s",
        type=float,
        help="seconds of overload (180; 10 with --quick)",
    )
    parser.add_argument(
        "--overload-factor", type=float, help="offered load / backend capacity (default 2)"
    )
    parser.add_argument("--fuzz", type=int, help="mutated corpus sequences in the input run")
    parser.add_argument(
        "--no-broker-restart",
        dest="broker_restart",
        action="store_false",
        help="skip rabbitmqctl stop_app/start_app (it disturbs everything on the broker)",
    )
    args = parser.parse_args(argv)
    args.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    args.only = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    args.kills = args.kills if args.kills is not None else (5 if args.quick else 20)
    args.clients = args.clients or (8 if args.quick else 16)
    args.overload_s = args.overload_s or (10.0 if args.quick else 180.0)
    args.overload_factor = args.overload_factor or 2.0
    args.fuzz = args.fuzz if args.fuzz is not None else (150 if args.quick else 600)
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    result = asyncio.run(main(args))
    emit(result)
    return result


if __name__ == "__main__":
    sys.exit(0 if run()["ok"] else 1)
