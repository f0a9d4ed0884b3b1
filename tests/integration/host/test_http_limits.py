"""The host's HTTP endpoint on a real socket: TLS with a certificate made here (openssl), the
connection cap (503 with Retry-After, counted), and the settings that are refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from bench.harness.procs import free_port
from bridge.errors import ConfigError
from bridge.host import Host
from bridge.settings import HostSettings, load_settings
from tests.conftest import running_host
from tests.integration.host.test_http import RoutesWorker, _exchange

pytestmark = pytest.mark.integration

GET_LIVEZ = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"


def make_cert(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, by the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_port_serves_https_only(broker_url, tmp_path):
    cert, key = make_cert(tmp_path)
    port = free_port()
    trusting = ssl.create_default_context(cafile=str(cert))
    async with running_host(
        broker_url,
        tmp_path / "state",
        [RoutesWorker()],
        http_port=port,
        http_tls_cert=cert,
        http_tls_key=key,
    ):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"https://127.0.0.1:{port}/routes/echo", data=b"x" * 3000, ssl=trusting) as r:  # fmt: skip
                assert (r.status, await r.read()) == (200, b"x" * 3000)
            # plain HTTP on the TLS port: the handshake fails, nothing is served in clear
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/livez") as r:
                    await r.read()
            # a client that does not trust the certificate refuses it
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(f"https://127.0.0.1:{port}/livez") as r:
                    await r.read()
            # and the port still serves after both
            async with http.get(f"https://127.0.0.1:{port}/livez", ssl=trusting) as r:
                assert (r.status, await r.text()) == (200, "ok\n")


async def test_connection_cap_refuses_with_503_and_counts(broker_url, tmp_path):
    port = free_port()
    async with running_host(
        broker_url, tmp_path, [RoutesWorker()], http_port=port, http_max_connections=2
    ):
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        try:
            for reader, writer in (first, second):  # both served, and kept open
                writer.write(GET_LIVEZ)
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                while await reader.readline() != b"\r\n":
                    pass
                assert await reader.readexactly(3) == b"ok\n"
            # the third is answered 503 whatever it sends, then closed
            ((status, headers, body),) = await _exchange(port, GET_LIVEZ, 1)
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert json.loads(body)["error"]["code"] == "unavailable"
            assert "BRIDGE_HTTP_MAX_CONNECTIONS" in json.loads(body)["error"]["message"]
            # a client library sees the 503 too
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/livez") as r:
                    assert r.status == 503 and r.headers["Retry-After"] == "1"
            reader, writer = first
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            metrics = (await reader.readexactly(length)).decode()
            assert "bridge_http_connections_refused_total 2.0" in metrics
            assert "bridge_http_connections 2.0" in metrics
        finally:
            first[1].close()
        # one closed: a new connection is served again
        for _ in range(100):
            ((status, _, body),) = await _exchange(port, GET_LIVEZ, 1)
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert (status, body) == (200, b"ok\n")
        second[1].close()


def test_tls_settings_go_together(tmp_path):
    cert, _ = make_cert(tmp_path)
    with pytest.raises(ConfigError, match="BRIDGE_HTTP_TLS_CERT and BRIDGE_HTTP_TLS_KEY go together"):  # fmt: skip
        load_settings(HostSettings, http_tls_cert=cert)
    with pytest.raises(ConfigError, match="BRIDGE_HTTP_MAX_CONNECTIONS"):
        load_settings(HostSettings, http_max_connections=0)


async def test_unusable_certificate_stops_the_start(broker_url, tmp_path):
    cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    for tls_cert, tls_key, why in [
        (cert, other_key, "KEY_VALUES_MISMATCH|key values mismatch"),
        (tmp_path / "missing.crt", other_key, "No such file"),
    ]:
        settings = HostSettings(
            amqp_url=broker_url,
            state_dir=tmp_path,
            http_port=free_port(),
            http_tls_cert=tls_cert,
            http_tls_key=tls_key,
        )
        with pytest.raises(ConfigError, match="BRIDGE_HTTP_TLS_CERT / BRIDGE_HTTP_TLS_KEY") as exc:
            await Host(settings, [RoutesWorker()], install_signals=False).run()
        assert any(word in str(exc.value) for word in why.split("|"))
