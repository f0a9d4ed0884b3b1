"""Client identities on a real gateway (issue 18, docs/gateway.md "Client identities"):
signed HELLO tokens, TLS client certificates from a CA made in the test with the openssl
command, the header servers see, one connection per proven client_id, and the limit on
failed authentications per source address."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import get_messages
from tests.integration.gateway.helpers import (
    error_code,
    gateway_settings,
    publish_reply,
    raw_exchange,
    running_gateway,
    wait_until,
    where_it_went,
)
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.identity import sign_token
from workers.gateway.wire import FrameType, encode_hello

pytestmark = pytest.mark.integration

SECRET = "identity-test-secret-0123456789"


def token(client_id: str, ttl: float = 3600) -> str:
    return sign_token(SECRET.encode(), client_id, int(time.time() + ttl))


# -- a CA, a server certificate and client certificates, made with openssl -----------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key_and_csr(d: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, csr = d / f"{name}.key", d / f"{name}.csr"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", subject,
    )  # fmt: skip
    return key, csr


def _sign(d: Path, ca: str, name: str, csr: Path, serial: int, extensions: str) -> Path:
    cert, ext = d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(d / f"{ca}.pem"),
        "-CAkey", str(d / f"{ca}.key"), "-set_serial", str(serial), "-days", "1",
        "-out", str(cert), "-extfile", str(ext),
    )  # fmt: skip
    return cert


def _ca(d: Path, name: str) -> Path:
    cert = d / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(cert), "-days", "1",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert


class Pki:
    """ca signs the gateway's certificate and the clients'; rogue is a CA nobody trusts."""

    def __init__(self, d: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("the openssl command is needed to make the test certificates")
        self.dir = d
        self.ca = _ca(d, "ca")
        _ca(d, "rogue")
        key, csr = _key_and_csr(d, "server", "/CN=localhost")
        self.server_key = key
        self.server_cert = _sign(
            d, "ca", "server", csr, 1,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )  # fmt: skip
        self._serial = 10

    def client(self, cn: str, *, ca: str = "ca", dns: str | None = None) -> tuple[Path, Path]:
        self._serial += 1
        name = f"{cn}-{ca}-{self._serial}"
        key, csr = _key_and_csr(self.dir, name, f"/O=devices/CN={cn}")
        ext = "extendedKeyUsage=clientAuth\n"
        if dns is not None:
            ext += f"subjectAltName=DNS:{dns}\n"
        return _sign(self.dir, ca, name, csr, self._serial, ext), key

    def context(self, client: tuple[Path, Path] | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if client is not None:
            context.load_cert_chain(*client)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_settings(unique: str, pki: Pki, **overrides: Any) -> Any:
    return gateway_settings(
        unique,
        listeners=json.dumps(
            [
                {"port": 0, "framing": "frames"},
                {"port": 0, "framing": "frames", "tls": True, "client_auth": "required"},
                {"port": 0, "framing": "lines", "tls": True, "client_auth": "required"},
            ]
        ),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        **overrides,
    )


def auth_failures(gw: Any, reason: str) -> float:
    return gw.metric("bridge_gateway_auth_failures_total", reason=reason)


async def refused_code(port: int, hello: bytes) -> str | None:
    _, frames = await raw_exchange(port, hello)
    return error_code(frames)


# -- signed tokens ----------------------------------------------------------------------------


async def test_signed_tokens(broker_url, tmp_path, unique):
    s = gateway_settings(unique, client_token_secret=SECRET, tokens="shared-1")
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        alice = await gw.connect(client_id="alice", token=token("alice"))
        assert await alice.request(b"hi") == b"hi"
        anonymous = await gw.connect(token="shared-1")
        assert await anonymous.request(b"anon") == b"anon"
        events = await gw.servers["s1"].wait_events(
            lambda evs: {e.body for e in evs} >= {b"hi", b"anon"}
        )
        seen = {e.session: (e.client_id, e.headers.get("x-client-auth")) for e in events}
        assert seen[alice.session] == ("alice", "token")
        assert seen[anonymous.session] == ("", "shared")

        expired = sign_token(SECRET.encode(), "alice", int(time.time()) - 1)
        good = token("alice")
        tampered = good[:-2] + ("AA" if good[-2:] != "AA" else "BB")
        later = token("alice", ttl=7200)
        cases = {
            "expired": (encode_hello("alice", expired), "expired_token"),
            "tampered": (encode_hello("alice", tampered), "wrong_token"),
            "another id": (encode_hello("bob", good), "wrong_token"),
            "expiry moved": (
                encode_hello(
                    "alice",
                    later.split(".")[0] + "." + later.split(".")[1] + "." + good.split(".")[2],
                ),
                "wrong_token",
            ),
            "malformed": (encode_hello("alice", "v1.abc"), "malformed_token"),
            "shared token for an id": (encode_hello("alice", "shared-1"), "unproven_client_id"),
            "no token for an id": (encode_hello("alice"), "unproven_client_id"),
            "no token at all": (encode_hello(), "wrong_shared_token"),
        }
        for what, (hello, reason) in cases.items():
            before = auth_failures(gw, reason)
            assert await refused_code(gw.port, hello) == "unauthorized", what
            assert auth_failures(gw, reason) == before + 1, what
        assert gw.metric("bridge_gateway_authenticated_total", proof="token") == 1
        assert gw.metric("bridge_gateway_authenticated_total", proof="shared") == 1
        # a refused client never reached a server
        assert {e.session for e in gw.servers["s1"].events} == {alice.session, anonymous.session}


async def test_unproven_client_id_as_a_hint(broker_url, tmp_path, unique):
    """unproven_client_id=hint keeps clients that send a client_id with a shared token
    connecting, sticky, with x-client-auth saying it is unproven; a hint replaces nobody."""
    s = gateway_settings(
        unique, client_token_secret=SECRET, tokens="shared-1", unproven_client_id="hint"
    )
    async with running_gateway(broker_url, tmp_path, s, ("s1", "s2")) as gw:
        first = await gw.connect(client_id="old-device", token="shared-1")
        second = await gw.connect(client_id="old-device", token="shared-1")
        assert second.server == first.server, "the hint is sticky"
        assert await first.request(b"a") == b"a" and await second.request(b"b") == b"b"
        server = gw.servers[first.server]
        events = await server.wait_events(lambda evs: {e.body for e in evs} >= {b"a", b"b"})
        data = [e for e in events if e.body in (b"a", b"b")]
        assert {(e.client_id, e.headers["x-client-auth"]) for e in data} == {
            ("old-device", "shared")
        }
        # a signed token that fails is refused, hint or not
        assert await refused_code(gw.port, encode_hello("x", "v1.1.bad")) == "unauthorized"


async def test_default_without_proofs_keeps_client_ids_as_hints(broker_url, tmp_path, unique):
    """No secret, no certificate listener: nothing can be proven, a client_id stays the
    sticky hint it always was (x-client-auth none)."""
    s = gateway_settings(unique)
    assert s.unproven_policy == "hint"
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        client = await gw.connect(client_id="legacy")
        assert await client.request(b"x") == b"x"
        events = await gw.servers["s1"].wait_events(lambda evs: any(e.body == b"x" for e in evs))
        [data] = [e for e in events if e.body == b"x"]
        assert (data.client_id, data.headers["x-client-auth"]) == ("legacy", "none")


# -- one connection per proven client_id -------------------------------------------------------


async def test_newer_connection_replaces_the_older(broker_url, tmp_path, unique, amqp):
    s = gateway_settings(unique, client_token_secret=SECRET)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        old = await gw.connect(client_id="alice", token=token("alice"))
        assert await old.request(b"from old") == b"from old"
        bob = await gw.connect(client_id="bob", token=token("bob"))
        new = await gw.connect(client_id="alice", token=token("alice"))
        with pytest.raises(GatewayError) as refused:
            await old.recv(timeout=5)
        assert refused.value.code == "replaced"
        assert new.session != old.session
        # A reply addressed to the replaced connection never reaches it, and reaches the
        # client once at most: kept in gateway.undeliverable (session_gone), or, where
        # replies are kept for offline clients, given to the newer connection; never both.
        await publish_reply(amqp, s, b"for the old one", {"x-session": old.session})
        to_new, kept = await where_it_went(amqp, s, new)
        assert to_new + [m.body for m in kept] == [b"for the old one"]
        assert all(m.headers["x-dead-reason"] == "session_gone" for m in kept)
        assert await new.request(b"from new") == b"from new"
        assert await bob.request(b"bob") == b"bob", "another id is not affected"
        events = await gw.servers["s1"].wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == old.session for e in evs)
        )
        assert [e.body for e in events if e.session == new.session and e.event == "data"] == [
            b"from new"
        ]
        assert gw.metric("bridge_gateway_replaced_total") == 1
        assert gw.metric("bridge_gateway_closed_total", reason="replaced") == 1
        # the newest holds the id: a third replaces the second, not the other way round
        third = await gw.connect(client_id="alice", token=token("alice"))
        with pytest.raises(GatewayError) as again:
            await new.recv(timeout=5)
        assert again.value.code == "replaced"
        assert await third.request(b"3") == b"3"


# -- TLS client certificates --------------------------------------------------------------------


async def test_client_certificates(broker_url, tmp_path, unique, pki):
    await client_certificates(broker_url, tmp_path, unique, pki)


def test_client_certificates_on_uvloop(broker_url, tmp_path, unique, pki):
    """`rabbitmq-bridge run` runs on uvloop, whose TLS transport is its own."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        runner.run(client_certificates(broker_url, tmp_path, unique, pki))


async def client_certificates(broker_url: str, tmp_path: Path, unique: str, pki: Pki) -> None:
    s = tls_settings(unique, pki)
    alice = pki.client("alice")
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        port = gw.worker.ports["frames+tls"]

        async def tls(client_cert: Any, **hello: Any) -> GatewayClient:
            client = await GatewayClient.connect(
                "127.0.0.1", port, ssl_context=pki.context(client_cert), **hello
            )
            gw.clients.append(client)
            return client

        named = await tls(alice)  # no client_id in HELLO: the certificate's
        assert await named.request(b"cert") == b"cert"
        events = await gw.servers["s1"].wait_events(lambda evs: any(e.body == b"cert" for e in evs))
        [data] = [e for e in events if e.body == b"cert"]
        assert (data.client_id, data.headers["x-client-auth"]) == ("alice", "cert")

        same = await tls(alice, client_id="alice")  # naming itself: fine, and replaces
        with pytest.raises(GatewayError) as replaced:
            await named.recv(timeout=5)
        assert replaced.value.code == "replaced"
        assert await same.request(b"again") == b"again"

        # a HELLO naming another id, even with a valid signed token for it (no secret here)
        with pytest.raises(GatewayError) as other:
            await tls(alice, client_id="bob")
        assert other.value.code == "unauthorized"
        assert auth_failures(gw, "certificate_mismatch") == 1
        # no certificate: ERROR unauthorized, explained
        with pytest.raises(GatewayError) as none:
            await tls(None)
        assert none.value.code == "unauthorized" and "certificate" in none.value.message
        assert auth_failures(gw, "no_certificate") == 1
        # a certificate another CA signed: the TLS handshake fails, no session
        rogue = pki.client("alice", ca="rogue")
        with pytest.raises((GatewayError, ssl.SSLError, ConnectionError)):
            await tls(rogue)
        # the plain frames listener of the same gateway: a client_id needs a proof there,
        # and there is none (no secret), so unproven ids are refused by default
        assert s.unproven_policy == "refuse"
        assert await refused_code(gw.port, encode_hello("alice")) == "unauthorized"
        plain = await gw.connect()
        assert await plain.request(b"anonymous") == b"anonymous"


async def test_certificate_identity_from_a_subject_alt_name(broker_url, tmp_path, unique, pki):
    s = tls_settings(unique, pki, client_cert_id="dns")
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        port = gw.worker.ports["frames+tls"]
        context = pki.context(pki.client("ignored-cn", dns="d7.devices.test"))
        client = await GatewayClient.connect("127.0.0.1", port, ssl_context=context)
        gw.clients.append(client)
        assert await client.request(b"san") == b"san"
        events = await gw.servers["s1"].wait_events(lambda evs: any(e.body == b"san" for e in evs))
        assert [e.client_id for e in events if e.body == b"san"] == ["d7.devices.test"]
        # a certificate without a DNS name names nobody
        with pytest.raises(GatewayError) as refused:
            await GatewayClient.connect(
                "127.0.0.1", port, ssl_context=pki.context(pki.client("only-cn"))
            )
        assert refused.value.code == "unauthorized"


async def test_certificate_on_a_listener_without_hello(broker_url, tmp_path, unique, pki):
    """A lines listener requiring client certificates: the certificate names the client
    (x-client-id, x-client-auth cert); a connection without one is closed unannounced."""
    s = tls_settings(unique, pki)
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        port = gw.worker.ports["lines+tls"]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki.context(pki.client("meter-9"))
        )
        writer.write(b"reading 42\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"reading 42\n"
        writer.close()
        events = await gw.servers["s1"].wait_events(
            lambda evs: any(e.body == b"reading 42" for e in evs)
        )
        [data] = [e for e in events if e.body == b"reading 42"]
        assert (data.client_id, data.headers["x-client-auth"]) == ("meter-9", "cert")

        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.context(None))
        writer.write(b"anonymous\n")
        try:
            assert await asyncio.wait_for(reader.read(100), 10) == b""
        except (ssl.SSLError, ConnectionError):
            pass  # the close may arrive as a reset
        writer.close()
        await wait_until(lambda: auth_failures(gw, "no_certificate") == 1, "counted")
        assert not any(e.body == b"anonymous" for e in gw.servers["s1"].events)


# -- failed authentications per source address --------------------------------------------------


async def connect_from(
    address: str, port: int, client_id: str | None = None, tok: str | None = None
) -> GatewayClient:
    """GatewayClient.connect from a given local address (127.0.0.2 is loopback too)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    client = GatewayClient(reader, writer)
    writer.write(encode_hello(client_id, tok))
    frame = await asyncio.wait_for(client.next_frame(), 10)
    if frame is None or frame.type is not FrameType.WELCOME:
        client.close()
        raise client.error_of(frame)
    client.welcome = json.loads(frame.payload)
    return client


async def bad_hello_from(address: str, port: int, i: int) -> str | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    try:
        writer.write(encode_hello(f"victim-{i % 3}", f"v1.{int(time.time()) + 60}.{'A' * 43}"))
        frame = await asyncio.wait_for(GatewayClient(reader, writer).next_frame(), 10)
        return None if frame is None else json.loads(frame.payload).get("code")
    finally:
        writer.close()


async def test_failed_authentications_are_rate_limited_per_source(
    broker_url, tmp_path, unique, caplog
):
    limit = 5
    s = gateway_settings(
        unique,
        client_token_secret=SECRET,
        auth_failure_limit=limit,
        auth_failure_window_s=600,  # one more failure every 120 s: none during the test
        auth_failure_log_s=600,
    )
    caplog.set_level(logging.DEBUG, logger="bridge")
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        good: list[GatewayClient] = []
        sent: list[str] = []

        async def good_clients() -> None:
            for i in range(10):
                sent.append(token(f"good-{i}"))
                client = await connect_from("127.0.0.2", gw.port, f"good-{i}", sent[-1])
                gw.clients.append(client)
                assert await client.request(b"ok %d" % i) == b"ok %d" % i
                good.append(client)

        burst = asyncio.gather(*(bad_hello_from("127.0.0.1", gw.port, i) for i in range(60)))
        codes, _ = await asyncio.gather(burst, good_clients())
        assert codes.count("unauthorized") == limit, codes
        assert codes.count("rate_limited") == 60 - limit, codes
        assert len(good) == 10, "clients from another address kept connecting"
        # the source is blocked for everything now, even a valid token
        with pytest.raises(GatewayError) as blocked:
            await connect_from("127.0.0.1", gw.port, "alice", token("alice"))
        assert blocked.value.code == "rate_limited"
        assert auth_failures(gw, "wrong_token") == limit
        assert auth_failures(gw, "rate_limited") == 60 - limit + 1
        assert gw.metric("bridge_gateway_refused_total", reason="rate_limited") == 60 - limit + 1
        # one log line for the whole burst (the next one waits for auth_failure_log_s)
        await asyncio.sleep(0.2)
        lines = [r for r in caplog.records if r.getMessage() == "failed client authentications"]
        assert len(lines) == 1, [r.__dict__ for r in lines]
        assert lines[0].blocked_sources <= 1  # type: ignore[attr-defined]
        # and no token or secret in what was logged (the signatures sent were all "A"s)
        text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
        assert SECRET not in text and "A" * 43 not in text
        assert not any(t.split(".")[2] in text for t in sent)


# -- offline replies (branch gateway-offline) ----------------------------------------------------


async def test_offline_replies_only_reach_the_proven_identity(broker_url, tmp_path, unique, amqp):
    """Replies kept for an offline client_id go to a connection that proves that id, never
    to one that only claims it (a hint) or proves another one."""
    pytest.importorskip(
        "workers.gateway.offline", reason="offline replies are not in this tree (gateway-offline)"
    )
    from bench.harness.broker import delete_names

    s = gateway_settings(unique, client_token_secret=SECRET, unproven_client_id="hint")
    async with running_gateway(broker_url, tmp_path, s, ("s1",)) as gw:
        alice = await gw.connect(client_id="alice", token=token("alice"))
        assert await alice.request(b"hello") == b"hello"
        gone = alice.session
        await alice.bye()
        await gw.servers["s1"].wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == gone for e in evs)
        )
        for i in range(2):
            await publish_reply(amqp, s, b"kept-%d" % i, {"x-session": gone})
        await wait_until(
            lambda: gw.metric("bridge_gateway_offline_replies_total", event="kept") == 2, "kept"
        )

        # claims alice without proof (admitted as a hint): gets its own echo, nothing else
        mallory = await gw.connect(client_id="alice")
        assert await mallory.request(b"m") == b"m"
        with pytest.raises(TimeoutError):
            await mallory.recv(timeout=1.5)
        # a token for another id does not make it alice
        assert await refused_code(gw.port, encode_hello("alice", token("bob"))) == "unauthorized"
        # another proven identity gets nothing of alice's either
        bob = await gw.connect(client_id="bob", token=token("bob"))
        assert await bob.request(b"b") == b"b"
        with pytest.raises(TimeoutError):
            await bob.recv(timeout=1.0)
        # a reply to the hint's session once it is gone is not kept for "alice"
        hinted = mallory.session
        await mallory.bye()
        await gw.servers["s1"].wait_events(
            lambda evs: any(e.event == "disconnect" and e.session == hinted for e in evs)
        )
        await publish_reply(amqp, s, b"to the hint", {"x-session": hinted})
        [dead] = await get_messages(amqp, s.undeliverable_queue, 1)
        assert (dead.body, dead.headers["x-dead-reason"]) == (b"to the hint", "session_gone")
        assert gw.metric("bridge_gateway_offline_replies_total", event="kept") == 2

        # alice, proven again, gets what was kept for her, then her own
        again = await gw.connect(client_id="alice", token=token("alice"))
        await again.send(b"live")
        assert [await again.recv() for _ in range(3)] == [b"kept-0", b"kept-1", b"live"]
        await again.bye()
    await delete_names(broker_url, [], [s.offline_queue("alice"), s.offline_queue("bob")])
