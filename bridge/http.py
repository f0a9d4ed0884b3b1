"""The host's HTTP endpoint on aiohttp's server: /livez, /readyz, /metrics, read-only admin
views, and the routes workers contribute (``http_routes()``, such as the directed pull API).

Limits an operator sets on the host (``BRIDGE_HTTP_*``): the largest request body
(``client_max_size``: 413 beyond) and how long an idle keep-alive connection stays open.
A request line or header field is at most 8 KiB (aiohttp's limit) and a request carries at
most 128 header fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("bridge.http")

PATHS = ["/livez", "/readyz", "/metrics", "/admin/"]


def json_response(status: int, payload: Any) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, default=str, indent=1).encode(),
        content_type="application/json",
    )


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
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.admin = admin
        self.routes = list(routes)
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._json_404])
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/admin/{view:.*}", self._admin)
        app.add_routes(self.routes)
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
        site = web.TCPSite(self.runner, host, port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            self.runner = None
            raise
        self.port = int(self.runner.addresses[0][1])
        log.info("http endpoint listening", extra={"host": host, "port": self.port})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

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

    @web.middleware
    async def _json_404(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """An unknown path is answered in JSON, with the paths there are."""
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return await self._not_found(request)
        return response
