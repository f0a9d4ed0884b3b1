"""The host's HTTP endpoint on aiohttp's server: /livez, /readyz, /metrics, read-only admin
views, and the routes workers contribute (``http_routes()``, such as the directed pull API).

Limits an operator sets on the host (``BRIDGE_HTTP_*``): the largest request body
(``client_max_size``: 413 beyond), how long an idle keep-alive connection stays open, and how
many connections are open at once (``max_connections``: one beyond is answered 503 with
``Retry-After`` and closed, counted in ``bridge_http_connections_refused_total``). A request
line or header field is at most 8 KiB (aiohttp's limit) and a request carries at most 128
header fields. With a TLS context the port speaks HTTPS only (a TLS handshake must finish
within ``TLS_HANDSHAKE_TIMEOUT_S``; a connection counts against the cap once it has).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

log = logging.getLogger("bridge.http")

PATHS = ["/livez", "/readyz", "/metrics", "/admin/"]
TLS_HANDSHAKE_TIMEOUT_S = 10.0
REFUSAL_LINGER_S = 1.0  # how long a refused connection is read (and discarded) before closing
FILES_RESERVE = 256  # open files the process needs besides HTTP connections (broker, SQLite)


def json_response(status: int, payload: Any) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, default=str, indent=1).encode(),
        content_type="application/json",
    )


def refusal_response(max_connections: int) -> bytes:
    """The whole answer on a connection beyond the cap, written before its request is read."""
    body = json.dumps(
        {
            "error": {
                "code": "unavailable",
                "message": f"this process holds its maximum of {max_connections} HTTP "
                "connections (BRIDGE_HTTP_MAX_CONNECTIONS); retry later",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """A connection beyond the cap: the 503 is written at once, what the client sends is
    read and discarded until it closes or ``REFUSAL_LINGER_S`` passed (closing with unread
    input would reset the connection and could destroy the answer)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.response)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class _Connection(asyncio.Protocol):
    """An accepted connection, counted while it is open: served by aiohttp's request handler,
    or beyond the cap by :class:`_Refusal`."""

    __slots__ = ("counted", "endpoint", "inner")

    def __init__(self, endpoint: HttpEndpoint) -> None:
        self.endpoint = endpoint
        self.inner: asyncio.Protocol | None = None
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        endpoint = self.endpoint
        if endpoint.open >= endpoint.max_connections:
            endpoint.refused.inc()
            self.inner = _Refusal(endpoint.refusal)
        else:
            assert endpoint.runner is not None and endpoint.runner.server is not None
            endpoint.open += 1
            self.counted = True
            self.inner = endpoint.runner.server()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.endpoint.open -= 1
        if self.inner is not None:
            self.inner.connection_lost(exc)
            self.inner = None

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class HttpEndpoint:
    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        ready: Callable[[], tuple[bool, dict[str, str]]],
        admin: Callable[[str], Any] | None = None,
        routes: Iterable[web.AbstractRouteDef] = (),
        max_body_bytes: int = 1024 * 1024,
        keepalive_s: float = 75.0,
        max_connections: int = 16_384,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.admin = admin
        self.routes = list(routes)
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections
        self.refusal = refusal_response(max_connections)
        self.tls = tls
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.port: int | None = None
        self.open = 0  # connections counted against max_connections
        Gauge(
            "bridge_http_connections",
            "HTTP connections open (TLS ones once their handshake finished)",
            registry=registry,
        ).set_function(lambda: float(self.open))
        self.refused = Counter(
            "bridge_http_connections_refused",
            "HTTP connections answered 503 and closed: BRIDGE_HTTP_MAX_CONNECTIONS were open",
            registry=registry,
        )

    def app(self) -> web.Application:
        # no middleware: each would hold a coroutine frame (and aiohttp's own one) for as long
        # as a request runs, which is 30 s for each waiting long poll
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/admin/{view:.*}", self._admin)
        app.add_routes(self.routes)
        app.router.add_route("*", "/{path:.*}", self._unrouted)  # last: what nothing else took
        return app

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(
            self.app(),
            handle_signals=False,  # the host owns SIGTERM
            access_log=None,
            keepalive_timeout=self.keepalive_s,
            max_headers=128,
        )
        await self.runner.setup()
        self._raise_files_limit()
        loop = asyncio.get_running_loop()
        try:
            self.listener = await loop.create_server(
                lambda: _Connection(self),
                host,
                port,
                backlog=1024,
                ssl=self.tls,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if self.tls else None,
            )
        except BaseException:
            await self.runner.cleanup()
            self.runner = None
            raise
        self.port = int(self.listener.sockets[0].getsockname()[1])
        log.info(
            "http endpoint listening",
            extra={
                "host": host,
                "port": self.port,
                "tls": self.tls is not None,
                "max_connections": self.max_connections,
            },
        )

    def _raise_files_limit(self) -> None:
        """One open file per connection: raise the soft open-files limit up to the hard one
        if the cap needs it; warn if even that is too low (accepting then fails with EMFILE
        before the cap refuses anything)."""
        needed = self.max_connections + FILES_RESERVE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            if hard == resource.RLIM_INFINITY or hard > soft:
                soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            if soft < needed:
                log.warning(
                    "the open-files limit is below BRIDGE_HTTP_MAX_CONNECTIONS: connections "
                    "beyond it fail to be accepted instead of being refused with a 503; raise "
                    "the limit (ulimit -n) or lower the cap",
                    extra={"open_files_limit": soft, "max_connections": self.max_connections},
                )

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.runner is not None:
            await self.runner.cleanup()  # closes the connections, idle ones first
            self.runner = None
        if self.listener is not None:
            await self.listener.wait_closed()
            self.listener = None

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, reasons = self.ready()
        return json_response(200 if ok else 503, {"ready": ok, "checks": reasons})

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _admin(self, request: web.Request) -> web.Response:
        if self.admin is None:
            return await self._not_found(request)
        result = self.admin(request.match_info["view"])
        if asyncio.iscoroutine(result):
            result = await result
        if result is None:
            return json_response(404, {"error": "no such admin view"})
        return json_response(200, result)

    async def _not_found(self, request: web.Request) -> web.Response:
        paths = PATHS + sorted({r.path for r in self.routes if isinstance(r, web.RouteDef)})
        return json_response(404, {"error": "not found", "paths": paths})

    async def _unrouted(self, request: web.Request) -> web.Response:
        """A path no route has (404 in JSON, with the paths there are), or a known path with
        another method (405, as aiohttp answers it)."""
        allowed: set[str] = set()
        for route in request.app.router.resources():
            if route is not request.match_info.route.resource:
                allowed |= (await route.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        return await self._not_found(request)
