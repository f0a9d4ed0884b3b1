"""The host's HTTP endpoint (aiohttp) on a real socket: keep-alive, limits, JSON 404, routes
that a worker contributes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from bench.harness.procs import free_port
from tests.conftest import running_host

pytestmark = pytest.mark.integration


class RoutesWorker:
    """A worker that serves one route of its own and echoes the body it is given."""

    name = "routes"

    async def start(self, ctx: Any) -> None:
        self.started = True

    async def stop(self, grace: float) -> None:
        pass

    def ready(self) -> tuple[bool, str]:
        return True, "ok"

    def admin(self, view: str) -> Any:
        return {"view": view} if view == "hello" else None

    def http_routes(self) -> list[web.RouteDef]:
        return [web.post("/routes/echo", self._echo)]

    async def _echo(self, request: web.Request) -> web.Response:
        return web.Response(body=await request.read())


async def _exchange(
    port: int, raw: bytes, responses: int
) -> list[tuple[int, dict[str, str], bytes]]:
    """Write ``raw`` (one or more requests) on one connection, read ``responses`` replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        writer.write(raw)
        await writer.drain()
        for _ in range(responses):
            status_line = await reader.readline()
            assert status_line, f"connection closed after {len(out)} responses"
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            out.append((status, headers, await reader.readexactly(length) if length else b""))
    finally:
        writer.close()
    return out


async def test_keep_alive_limits_and_worker_routes(broker_url, tmp_path):
    port = free_port()
    async with running_host(
        broker_url, tmp_path, [RoutesWorker()], http_port=port, http_max_body_bytes=4096
    ):
        get = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
        # two requests on one connection: keep-alive (the old server closed after one)
        (s1, _, b1), (s2, _, b2) = await _exchange(port, get + get, 2)
        assert (s1, b1, s2, b2) == (200, b"ok\n", 200, b"ok\n")

        ((status, _, body),) = await _exchange(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 1)
        assert status == 404
        assert "/routes/echo" in json.loads(body)["paths"]

        ((status, _, _),) = await _exchange(port, b"DELETE /livez HTTP/1.1\r\nHost: x\r\n\r\n", 1)
        assert status == 405

        ((status, _, body),) = await _exchange(
            port, b"GET /admin/routes/hello HTTP/1.1\r\nHost: x\r\n\r\n", 1
        )
        assert status == 200 and json.loads(body) == {"view": "hello"}

        echo = b"POST /routes/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        ((status, _, body),) = await _exchange(port, echo, 1)
        assert (status, body) == (200, b"hello")

        big = b"x" * 5000
        oversized = b"POST /routes/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + big
        ((status, _, _),) = await _exchange(port, oversized, 1)
        assert status == 413
