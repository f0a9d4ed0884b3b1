"""The gateway under faults and bad input, the fast subset of ``python -m bench.chaos.gateway``.

Broker faults through a proxy (stall, slow link, dropped connection with a reply on its
way), bad input over real sockets (the checked-in corpus and hypothesis-generated frame
sequences, each compared with the answer docs/gateway.md promises), slowloris HELLOs, a
client that never reads, a connection flood beyond ``max_connections``, Unicode client
ids, attempts to pick a queue, and secrets in DEBUG logs. In every test a well-behaved
client talks at the same time and must not notice anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import ssl
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from bench.chaos.gateway.wire import (
    CORPUS_LIMITS,
    Limits,
    check,
    corpus,
    exchange,
    expected,
    trickle,
)
from bench.harness.procs import WorkerProcess, free_port
from bench.harness.proxy import TcpProxy
from bridge.amqp.frames import Properties
from bridge.errors import PublishFailed
from tests.broker_cli import rabbitmqctl, require_cli
from tests.conftest import running_host
from tests.integration.gateway.helpers import (
    SERVER_HEARTBEAT_S,
    Gateway,
    cleanup,
    env_for,
    gateway_settings,
    queue_depth,
    running_gateway,
    self_signed_cert,
    small_rcvbuf_socket,
    wait_until,
)
from workers.gateway.backend import BackendServer, Reply, ServerEvent
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.wire import FrameType, encode_data, encode_hello
from workers.gateway.worker import GatewayWorker

pytestmark = pytest.mark.integration


class Talker:
    """A well-behaved client that keeps round-tripping while something else goes on."""

    def __init__(self, client: GatewayClient, name: str) -> None:
        self.client = client
        self.name = name
        self.rounds = 0
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            body = f"{self.name}-{self.rounds}".encode()
            got = await self.client.request(body, timeout=30)
            assert got == body, (got, body)
            self.rounds += 1
            await asyncio.sleep(0.005)

    async def finish(self) -> int:
        """Stop; raise whatever went wrong; the number of round trips."""
        self._stop.set()
        await asyncio.wait_for(self._task, 30)
        assert self.rounds > 0
        return self.rounds


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records: asyncio's "Fatal error: protocol.data_received() call failed",
    "Exception in callback", and the gateway's own."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# ----------------------------------------------------------------------------- bad input


async def test_corpus_gets_its_documented_answers(broker_url, amqp, tmp_path, unique, caplog):
    limits = CORPUS_LIMITS
    s = gateway_settings(
        unique,
        tokens=list(limits.tokens),
        max_hello_frame=limits.max_hello_frame,
        max_frame=limits.max_frame,
        hello_timeout_s=2.0,
        # each sequence is judged alone: a reply kept for a client_id would reach the next
        # connection that uses it, which the per-connection model does not follow
        offline_max_messages=0,
    )
    cases = corpus()
    assert len(cases) >= 60
    async with running_gateway(broker_url, tmp_path, s) as gw:
        talker = Talker(await gw.connect(client_id="good", token="corpus-token"), "good")
        failures: dict[str, list[str]] = {}
        for case in cases:
            want = expected(case.data, limits)
            # the hand-written expectation, the contract model and the gateway agree
            assert want.terminal == case.expect, (case.name, want.terminal)
            seen = await asyncio.to_thread(exchange, gw.port, case.data, want)
            if problems := check(want, seen):
                failures[case.name] = problems
        assert not failures, failures
        await talker.finish()
        # HELLO fields naming a server or queue were ignored, no queue was made from them
        for name in ("gateway.server.evil", s.server_queue("evil")):
            assert await queue_depth(amqp, name) == -1
        await wait_until(lambda: len(gw.worker.sessions) == 1, "only the good client left")
    assert not errors_logged(caplog)


# A frame: its type, payload and how its LENGTH is written.
_HELLO_VALUES = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["\x00", "\u202eabc", "\U0001f600" * 3, "\ud800", "a\udfff", "tok-a"]),
    st.integers(-2, 2),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
_HELLO_DOCS = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 1, 0, 2, True, 1.0, "1", None])},
    optional={
        "client_id": _HELLO_VALUES,
        "token": st.one_of(st.sampled_from(["tok-a", "tok-b", "tok-a ", "tok-c"]), _HELLO_VALUES),
        "server": st.text(max_size=8),
        "queue": st.text(max_size=8),
    },
)
_VALID_HELLO = st.fixed_dictionaries(
    {"v": st.just(1), "token": st.sampled_from(["tok-a", "tok-b"])},
    optional={"client_id": st.text(min_size=1, max_size=20)},
)
_HELLO_PAYLOADS = st.one_of(
    _HELLO_DOCS.map(lambda d: json.dumps(d).encode()),
    _HELLO_DOCS.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=24),
    st.integers(1, 120).map(lambda n: b"[" * n + b"]" * n),
    st.just(b'{"v":1,"token":"tok-a","pad":"' + b"x" * 300 + b'"}'),  # over max_hello_frame
)
_LENGTH_MODE = st.sampled_from(["exact"] * 18 + ["zero", "huge"])


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([1, 3, 3, 3, 4, 5, 7, 2, 6, 0, 8, 200]))
    if kind == 1:
        payload = draw(_HELLO_PAYLOADS)
    elif kind in (4, 5, 7):
        payload = draw(st.one_of(st.just(b""), st.just(b""), st.binary(max_size=3)))
    else:
        payload = draw(st.one_of(st.binary(max_size=64), st.just(b"D" * 2049)))
    mode = draw(_LENGTH_MODE)
    if mode == "zero":
        return b"\x00\x00\x00\x00"
    if mode == "huge":
        return draw(st.sampled_from([0xFFFFFFFF, 2050, 258])).to_bytes(4, "big") + bytes([kind])
    return (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload


@st.composite
def _sequences(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    first = draw(st.sampled_from(["garbage", "valid", "valid", "valid", "hello", "hello", ""]))
    if first == "garbage":
        parts.append(draw(st.binary(min_size=1, max_size=12)))
    elif first == "valid":
        parts.append(_frame(1, json.dumps(draw(_VALID_HELLO)).encode()))
    elif first == "hello":
        parts.append(_frame(1, draw(_HELLO_PAYLOADS)))
    parts.extend(draw(st.lists(_frames(), max_size=6)))
    return b"".join(parts)


def _frame(kind: int, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload


# The gateway serves on the event loop while hypothesis generates in a thread; aiormq's
# consumer tags come from the `random` module, which hypothesis takes for its own strategy
# using `random`.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_generated_frame_sequences_over_real_sockets(broker_url, tmp_path, unique, caplog):
    limits = Limits(max_hello_frame=256, max_frame=2048, tokens=("tok-a", "tok-b"))
    s = gateway_settings(
        unique,
        tokens=list(limits.tokens),
        max_hello_frame=limits.max_hello_frame,
        max_frame=limits.max_frame,
        hello_timeout_s=0.5,
        # each sequence is judged alone: a reply kept for a client_id would reach the next
        # connection that uses it, which the per-connection model does not follow
        offline_max_messages=0,
        # hundreds of wrong tokens from one address: the failure limit (gateway/test_identity.py)
        # would answer rate_limited, which the frame-level model does not predict
        auth_failure_limit=0,
    )
    answers: dict[str, int] = {}
    async with running_gateway(broker_url, tmp_path, s) as gw:
        talker = Talker(await gw.connect(client_id="good", token="tok-b"), "good")

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(data=_sequences())
        # one of each kind of answer whatever the generator draws this time
        @example(data=_frame(3, b"data first"))
        @example(data=_frame(1, b'{"v":1,"token":"tok-a"}') + _frame(3, b"x") + _frame(4, b""))
        @example(data=_frame(1, b'{"v":1,"token":"tok-c"}'))
        @example(data=_frame(1, b'{"v":1,"token":"tok-a"'))
        def one_sequence(data: bytes) -> None:
            want = expected(data, limits)
            assume(want.terminal != "partial")
            seen = exchange(gw.port, data, want, timeout=15)
            problems = check(want, seen)
            assert not problems, (data, problems)
            answers[want.terminal] = answers.get(want.terminal, 0) + 1

        await asyncio.to_thread(one_sequence)
        await talker.finish()
        await wait_until(lambda: len(gw.worker.sessions) == 1, "only the good client left")
    # the generator reaches the interesting answers, not only one kind of rejection
    assert {"open", "error:bad_hello", "error:not_hello", "error:unauthorized"} <= set(answers)
    assert not errors_logged(caplog)


async def test_slowloris_hello_is_cut_at_the_timeout(broker_url, tmp_path, unique):
    s = gateway_settings(unique, hello_timeout_s=1.0)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        talker = Talker(await gw.connect(client_id="good"), "good")
        hello = encode_hello("slow-client")

        results = await asyncio.gather(*(trickle(gw.port, hello, 0.2) for _ in range(10)))
        for sent, answer in results:
            assert sent < len(hello), "the HELLO was never complete"
            assert b'"code":"hello_timeout"' in answer
        await talker.finish()
        await wait_until(lambda: len(gw.worker.sessions) == 1, "slowloris sessions released")


async def test_connection_flood_beyond_the_limit(broker_url, tmp_path, unique):
    s = gateway_settings(unique, max_connections=10, hello_timeout_s=2.0)
    async with running_gateway(broker_url, tmp_path, s) as gw:
        talkers = [Talker(await gw.connect(client_id=f"good{i}"), f"good{i}") for i in range(3)]
        free = s.max_connections - len(talkers)

        async def flood_one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            try:
                return await asyncio.wait_for(reader.read(), 10)
            except ConnectionError:
                return b""
            finally:
                writer.close()

        # the first `free` hold a slot until hello_timeout, every other one is refused
        answers = await asyncio.gather(*(flood_one() for _ in range(150)))
        codes = [json.loads(a[5:])["code"] if len(a) > 5 else "eof" for a in answers]
        assert codes.count("busy") == len(answers) - free, codes
        assert codes.count("hello_timeout") == free
        # existing clients were served throughout, and new ones are welcome again
        rounds = [await t.finish() for t in talkers]
        assert all(rounds)
        late = await gw.connect(client_id="late")
        assert await late.request(b"after the flood") == b"after the flood"
        await late.bye()


async def test_client_that_never_reads_its_echoes(broker_url, tmp_path, unique):
    s = gateway_settings(unique, outbound_buffer_bytes=64 * 1024, close_flush_s=1.0)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        talker = Talker(await gw.connect(client_id="good"), "good")
        sock = small_rcvbuf_socket()
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(encode_hello("deaf"))
        client = GatewayClient(reader, writer)
        frame = await client.next_frame()
        assert frame is not None and frame.type is FrameType.WELCOME
        session = gw.worker.sessions[json.loads(frame.payload)["session"]]
        chunk = encode_data(b"e" * 16 * 1024)
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # 3 MiB of echoes it will not read
                if session.close_reason is not None:
                    break
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
                await asyncio.sleep(0.002)
        await wait_until(lambda: session.close_reason == "slow_consumer", "slow_consumer")
        await wait_until(lambda: session.sid not in gw.worker.sessions, "released")
        client.close()
        await talker.finish()


async def test_unicode_client_ids_reach_the_server_and_the_state_file(
    broker_url, tmp_path, unique, caplog
):
    s = gateway_settings(unique)
    ids = ["a\x00b", "\u202egnp.exe\u200f", "\U0001f600e\u0301", "ключ", "x" * 256]
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        clients = [await gw.connect(client_id=i) for i in ids]
        for c in clients:
            assert await c.request(b"hi") == b"hi"
        events = gw.servers["s1"].events
        assert {e.client_id for e in events if e.event == "connect"} == set(ids)
        path = next((tmp_path / "gateway").glob("*.sqlite3"))

        def saved() -> set[str]:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return {r[0] for r in db.execute("SELECT client_id FROM sticky")}

        await wait_until(lambda: saved() == set(ids), "sticky records saved")
        # and a lone surrogate (valid JSON escape, not Unicode text) is refused at HELLO
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        lone = json.dumps({"v": 1, "client_id": "\ud800"}).encode()  # ASCII: "\\ud800"
        writer.write((len(lone) + 1).to_bytes(4, "big") + b"\x01" + lone)
        last = await GatewayClient(reader, writer).wait_closed()
        assert last is not None and json.loads(last.payload)["code"] == "bad_hello"
        for c in clients:
            await c.bye()
    assert not errors_logged(caplog)


# ----------------------------------------------------------------------------- security


async def test_client_cannot_choose_a_queue(broker_url, amqp, tmp_path, unique):
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s) as gw:
        first = await gw.connect(client_id="first")
        taken = first.server  # least connections now sends the next client elsewhere
        other = ({"s1", "s2"} - {taken}).pop()
        names = [
            taken,
            s.server_queue(taken),
            s.reply_queue,
            s.undeliverable_queue,
            s.servers_exchange,
            "amq.rabbitmq.reply-to",
            "amq.topic",
        ]
        body = {"v": 1, "client_id": s.server_queue(taken)}
        body |= {"server": taken, "server_id": taken, "queue": s.server_queue(taken)}
        body |= {"routing_key": s.server_queue(taken), "exchange": "amq.topic"}
        body |= {"reply_to": s.server_queue(taken), "headers": {"x-session": first.session}}
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        sneaky = GatewayClient(reader, writer)
        payload = json.dumps(body).encode()
        writer.write((len(payload) + 1).to_bytes(4, "big") + b"\x01" + payload)
        frame = await sneaky.next_frame()
        assert frame is not None and frame.type is FrameType.WELCOME
        sneaky.welcome = json.loads(frame.payload)
        assert sneaky.server == other
        for name in names:
            for data in (name.encode(), json.dumps({"routing_key": name, "queue": name}).encode()):
                assert await sneaky.request(data) == data
        await sneaky.bye()
        await first.bye()
        await gw.servers[other].wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == sneaky.session for e in evs)
        )
        # everything the sneaky client sent went to the server the balancer chose, as data
        assert not [e for e in gw.servers[taken].events if e.session == sneaky.session]
        mine = [e for e in gw.servers[other].events if e.session == sneaky.session]
        assert len(mine) == 2 + 2 * len(names)
        assert {e.client_id for e in mine} == {s.server_queue(taken)}
        assert await queue_depth(amqp, s.undeliverable_queue) == 0
        assert await queue_depth(amqp, s.server_queue(taken)) == 0


def _rabbitmqctl(*args: str) -> None:
    rabbitmqctl(*args)  # the broker under test's CLI (TEST_BROKER_RABBITMQCTL)


async def test_secrets_never_logged(broker_url, tmp_path, unique):
    """Tokens and the broker password, at DEBUG, through a reconnect and refused HELLOs."""
    parts = urlsplit(broker_url)
    require_cli(broker_url)  # to make a user with a password
    user, password = f"{unique}-user", f"pw-{uuid.uuid4().hex}"
    tokens = [f"tok-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"]
    near_miss = tokens[0][:-1]  # what a client mistyped may be someone else's secret
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "bridge_gateway__tokens").write_text(",".join(tokens))
    s = gateway_settings(unique, port=free_port(), server_ttl_s=5)
    env = {
        "BRIDGE_SECRETS_DIR": str(secrets),
        "BRIDGE_LOG_LEVEL": "DEBUG",
        "BRIDGE_LOG_FORMAT": "json",
        **env_for(s, "server_ttl_s"),
    }
    await asyncio.to_thread(_rabbitmqctl, "add_user", user, password)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    log = tmp_path / "gateway.log"
    proc = WorkerProcess(
        ["gateway"], broker_url=proxy.url(user, password), state_dir=tmp_path, env=env, log=log
    )
    server = BackendServer(broker_url, "s1", settings=s, heartbeat_s=SERVER_HEARTBEAT_S)
    try:
        await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
        proc.start()
        await asyncio.to_thread(proc.wait_ready, 30)
        await server.start()
        await wait_until(lambda: _alive(proc, "s1"), "s1 alive at the gateway")
        client = await GatewayClient.connect(port=s.port, client_id="c", token=tokens[1])
        assert await client.request(b"with a token") == b"with a token"
        for wrong in (near_miss, None):
            with pytest.raises(GatewayError) as info:
                await GatewayClient.connect(port=s.port, token=wrong)
            assert info.value.code == "unauthorized"
        proxy.accepting = False
        proxy.cut()  # reconnect attempts are logged; with the URL, never its password
        await asyncio.sleep(1.0)
        proxy.accepting = True
        await asyncio.to_thread(proc.wait_ready, 30)
        assert await client.request(b"after the reconnect", timeout=30) == b"after the reconnect"
        await client.bye()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(proc.terminate)
        await server.stop()
        await proxy.stop()
        await asyncio.to_thread(_rabbitmqctl, "delete_user", user)
        await cleanup(broker_url, s, ["s1"])
    text = log.read_text(errors="replace")
    assert "broker connection lost" in text and "gateway listening" in text, text[-2000:]
    for secret in (password, *tokens, near_miss):
        assert secret not in text, "a secret is in the log"


def _alive(proc: WorkerProcess, server: str) -> bool:
    status, body = proc.http("/admin/gateway/summary")
    return status == 200 and server in json.loads(body).get("servers_alive", [])


async def test_tls_only_listener_under_bad_input(broker_url, tmp_path, unique, caplog):
    """TLS with a self-signed certificate, no plain listener: clients that do not trust the
    certificate, never finish the handshake, speak plain text, or send a bad frame inside
    TLS are refused; a verified client is served throughout."""
    cert, key = self_signed_cert(tmp_path)
    s = gateway_settings(
        unique,
        plain_listener=False,
        tls_cert=cert,
        tls_key=key,
        tls_port=0,
        hello_timeout_s=1.0,
        max_frame=1024,
        max_hello_frame=512,
    )
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        assert set(gw.worker.ports) == {"tls"}
        port = gw.worker.ports["tls"]
        trusted = ssl.create_default_context(cafile=str(cert))
        client = await GatewayClient.connect(port=port, ssl_context=trusted, client_id="tls")
        gw.clients.append(client)
        talker = Talker(client, "tls")
        # a client that does not trust the self-signed certificate stops at the handshake
        with pytest.raises(ssl.SSLCertVerificationError):
            await GatewayClient.connect(port=port, ssl_context=ssl.create_default_context())
        # TCP without a handshake is cut after hello_timeout_s; plain text gets no answer
        for opener in (b"", encode_hello("plain"), b"GET / HTTP/1.1\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(opener)
            with contextlib.suppress(ConnectionError):
                data = await asyncio.wait_for(reader.read(), 10)
                assert b"WELCOME" not in data and not data.startswith(b"HTTP/1.1 400")
            writer.close()
        # inside TLS the framing rules are the same
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trusted)
        writer.write(encode_hello("big") + encode_data(b"x" * 1025))
        last = await GatewayClient(reader, writer).wait_closed()
        assert last is not None and json.loads(last.payload)["code"] == "frame_too_large"
        await talker.finish()
        await client.bye()
    assert not errors_logged(caplog)


# ----------------------------------------------------------------------------- broker faults


def _confirm_ledger(worker: GatewayWorker) -> tuple[list[bytes], list[bytes]]:
    """Record every DATA payload the broker confirmed (and those it did not)."""
    confirmed: list[bytes] = []
    failed: list[bytes] = []
    publish = worker.publisher.publish

    def recording(
        exchange: str, routing_key: str, body: bytes, properties: Any = None, **kw: Any
    ) -> Any:
        fut = publish(exchange, routing_key, body, properties, **kw)
        if isinstance(properties, bytes):  # encoded, as the gateway keeps a session's
            properties = Properties.decode(properties)
        if properties is not None and (properties.headers or {}).get("x-event") == "data":
            fut.add_done_callback(
                lambda f: (
                    failed if f.cancelled() or f.exception() is not None else confirmed
                ).append(body)
            )
        return fut

    worker.publisher.publish = recording  # type: ignore[method-assign]
    return confirmed, failed


async def test_broker_stall_and_slow_link_lose_nothing(broker_url, tmp_path, unique):
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique, session_in_flight=8)
    worker = GatewayWorker(s)
    url = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(url, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)  # the backend is not behind the proxy
            try:
                await gw.start_server("s1")
                confirmed, failed = _confirm_ledger(worker)
                clients = [await gw.connect(client_id=f"c{i}") for i in range(4)]
                talker = Talker(await gw.connect(client_id="talker"), "talker")
                sent: dict[str, list[bytes]] = {c.session: [] for c in clients}

                def burst(tag: str, n: int) -> None:
                    for c in clients:
                        for k in range(n):
                            body = f"{c.session}-{tag}-{k}".encode()
                            sent[c.session].append(body)
                            c.writer.write(encode_data(body))

                # stall: no confirms come back, each session stops being read at its
                # in-flight limit (TCP pushes back on the client), nothing is dropped
                proxy.stall()
                burst("stall", 20)
                sessions = [worker.sessions[c.session] for c in clients]
                await wait_until(lambda: all(x.paused for x in sessions), "sessions paused")
                assert all(x.in_flight <= s.session_in_flight for x in sessions)
                proxy.resume()
                # slow link: every chunk delayed 50 ms both ways
                proxy.latency = 0.05
                burst("slow", 10)
                for c in clients:
                    got = [await c.recv(timeout=60) for _ in sent[c.session]]
                    assert got == sent[c.session]  # all of them, in order, same session
                proxy.latency = 0.0
                assert await talker.finish()
                assert host.readiness()[0]
                assert not failed
                delivered = {e.body for e in gw.servers["s1"].events if e.event == "data"}
                assert set(confirmed) <= delivered
                assert len(confirmed) >= 4 * 30
                for c in clients:
                    await c.bye()
            finally:
                for srv in gw.servers.values():
                    await srv.stop()
                gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])


async def test_reply_published_while_the_gateway_reconnects_is_delivered(
    broker_url, tmp_path, unique
):
    """The connection drops after the broker confirmed a client's message and before the
    server answered: the session survives and the answer still reaches it."""
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique, hello_timeout_s=0.5)
    worker = GatewayWorker(s)
    url = proxy.url(parts.username or "guest", parts.password or "guest")
    answer = asyncio.Event()

    async def delayed(event: ServerEvent) -> list[Reply]:
        if event.event != "data":
            return []
        if event.body == b"answered while the gateway is away":
            await answer.wait()
        return [Reply(event.body)]

    try:
        async with running_host(url, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)
            try:
                server = await gw.start_server("s1", delayed)
                client = await gw.connect(client_id="waiting")
                assert await client.request(b"before") == b"before"
                await client.send(b"answered while the gateway is away")
                await server.wait_events(lambda evs: len(evs) == 3)  # connect, 2 DATA
                proxy.accepting = False
                proxy.cut()
                await wait_until(lambda: not host.readiness()[0], "not ready while cut")
                answer.set()  # the server answers into the reply queue meanwhile
                # timeouts hold while the broker is away: a silent connection is cut
                silent = expected(b"", Limits())
                seen = await asyncio.to_thread(exchange, gw.port, b"", silent)
                assert seen.terminal == "error:hello_timeout"
                assert not host.readiness()[0]  # the proxy still refuses the gateway
                proxy.accepting = True
                assert await client.recv(timeout=30) == b"answered while the gateway is away"
                await wait_until(lambda: host.readiness()[0], "ready again", timeout=30)
                assert await client.request(b"after") == b"after"
                await client.bye()
            finally:
                for srv in gw.servers.values():
                    await srv.stop()
                gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"x": 2**70}, id="header-integer-out-of-range"),
        pytest.param("k" * 300, id="routing-key-over-255-bytes"),
        pytest.param({"x": "\ud800"}, id="header-lone-surrogate"),
        pytest.param("k\udfff", id="routing-key-lone-surrogate"),
    ],
)
async def test_a_message_that_cannot_be_encoded_fails_alone(broker_url, tmp_path, unique, bad):
    """Defence in depth below parse_hello: one publish the AMQP encoder refuses fails with
    ``unencodable``; the publishes batched with it and after it are confirmed as usual."""
    s = gateway_settings(unique)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect(client_id="neighbour")
        publisher = gw.worker.publisher
        queue = s.server_queue("s1")

        def properties(**headers: Any) -> Properties:
            return Properties(headers={"x-event": "probe", **headers}, delivery_mode=2)

        if isinstance(bad, dict):
            bad_publish = publisher.publish("", queue, b"bad", properties(**bad))
        else:
            bad_publish = publisher.publish("", queue + bad, b"bad", properties())
        batch = [
            publisher.publish("", queue, b"before", properties()),
            bad_publish,
            publisher.publish("", queue, b"after", properties()),
        ]
        done = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 15)
        assert done[0] is None and done[2] is None
        assert isinstance(done[1], PublishFailed) and done[1].reason == "unencodable"
        # delivery tags stayed in step with the broker: later confirms match their publish
        later = [publisher.publish("", queue, b"%d" % i, properties()) for i in range(20)]
        await asyncio.wait_for(asyncio.gather(*later), 10)
        for i in range(20):
            assert await client.request(b"n%d" % i) == b"n%d" % i
        probes = await gw.servers["s1"].wait_events(
            lambda evs: sum(e.event == "probe" for e in evs) == 22
        )
        assert b"bad" not in {e.body for e in probes}
        await client.bye()


async def test_server_sees_a_prefix_of_a_session_that_failed(broker_url, tmp_path, unique):
    """The broker connection drops with publishes of a session unconfirmed and more DATA
    read: the client gets ERROR unavailable, and the server sees a prefix of what the
    client sent (in order, no hole), then the disconnect."""
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    s = gateway_settings(unique, session_in_flight=4)
    worker = GatewayWorker(s)
    url = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(url, tmp_path, [worker]) as host:
            gw = Gateway(worker, host, s, broker_url)
            try:
                server = await gw.start_server("s1")
                client = await gw.connect(client_id="cut-off")
                assert await client.request(b"m-first") == b"m-first"
                proxy.stall()  # nothing is confirmed any more
                sent = [b"m%d" % i for i in range(100)]
                client.writer.write(b"".join(encode_data(m) for m in sent))
                session = worker.sessions[client.session]
                await wait_until(lambda: session.in_flight == 4 and session.paused, "window full")
                proxy.accepting = False
                proxy.cut()
                last = await client.wait_closed()
                assert last is not None and json.loads(last.payload)["code"] == "unavailable"
                proxy.resume()
                proxy.accepting = True
                await wait_until(lambda: host.readiness()[0], "ready again", timeout=30)
                events = await server.wait_events(
                    lambda evs: any(
                        e.event == "disconnect" and e.session == client.session for e in evs
                    ),
                    timeout=30,
                )
                got = [e.body for e in events if e.session == client.session and e.event == "data"]
                assert got[0] == b"m-first"
                assert got[1:] == sent[: len(got) - 1]
            finally:
                for srv in gw.servers.values():
                    await srv.stop()
                gw.close_clients()
    finally:
        await proxy.stop()
        await cleanup(broker_url, s, ["s1"])
