"""The host's HTTP endpoint: /livez, /readyz, /metrics and read-only admin views.

A deliberately tiny HTTP/1.1 server on asyncio streams: probes and Prometheus need GET
and a status code, nothing more, and it keeps the dependency list short.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("bridge.http")

Handler = Callable[[str], Awaitable[tuple[int, str, bytes]] | tuple[int, str, bytes]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def json_response(status: int, payload: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload, default=str, indent=1).encode()


class HttpEndpoint:
    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        ready: Callable[[], tuple[bool, dict[str, str]]],
        admin: Callable[[str], Any] | None = None,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.admin = admin
        self.server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, limit=8192)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("http endpoint listening", extra={"host": host, "port": self.port})

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        path = path.split("?", 1)[0]
        if path == "/livez":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ok, reasons = self.ready()
            return json_response(200 if ok else 503, {"ready": ok, "checks": reasons})
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path.startswith("/admin/") and self.admin is not None:
            result = self.admin(path[len("/admin/") :])
            if asyncio.iscoroutine(result):
                result = await result
            if result is None:
                return json_response(404, {"error": "no such admin view"})
            return json_response(200, result)
        return json_response(
            404, {"error": "not found", "paths": ["/livez", "/readyz", "/metrics", "/admin/"]}
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            parts = line.decode("latin-1").split()
            while True:  # headers are not needed; read them to keep clients happy
                header = await asyncio.wait_for(reader.readline(), 10)
                if header in (b"\r\n", b"\n", b""):
                    break
            if len(parts) < 2:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                status, ctype, body = await self.route(parts[0], parts[1])
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if parts[:1] == ["HEAD"] else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except Exception:  # never let a probe take the endpoint down
            log.exception("http handler failed")
        finally:
            writer.close()
