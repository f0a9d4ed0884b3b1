"""The HTTP pull API of the directed worker: ``POST /directed/v1/targets/{target}/pull``.

Owns what is HTTP about a pull: bearer-token authentication per target, the body's size, a
rate limit per target, and the mapping of reply codes to HTTP statuses. The pull itself
(parsing, the cursor rules, the long poll, the commit before the answer, shard relaying) is
the worker's one pull path, the same the AMQP pull takes: this module gets it as a function
``(target, body) -> reply`` raising :class:`~workers.directed.wire.WireError`.

Statuses: 200 for a reply and for the pull's own error replies (the body is the AMQP
reply's), 401 without a valid token, 403 for a token of another target, 413 for a body over
``MAX_PULL_BYTES``, 429 for ``overloaded`` (the target pulls faster than
``HTTP_RATE_PER_TARGET``, or too many pulls are in progress), 503 for ``unavailable``; 429 and
503 carry ``Retry-After``; aiohttp answers 404/405.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from workers.directed import wire
from workers.directed.config import (
    ANY_TARGET,
    BINARY_REPLY_CONTENT_TYPE,
    HTTP_PULL_PATH,
    REPLY_CONTENT_TYPE,
)

log = logging.getLogger("bridge.directed")

STATUS_OF_CODE = {"too_large": 413, "overloaded": 429, "unavailable": 503}

PullFunction = Callable[[str, bytes, bool], Awaitable[bytes]]  # (target, body, binary)


def token_digest(token: str) -> bytes:
    """What is compared: the SHA-256 of the token (a table value 'sha256:<hex>' is one)."""
    if token.startswith("sha256:"):
        return bytes.fromhex(token[len("sha256:") :])
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The table of ``BRIDGE_DIRECTED__HTTP_TOKENS``: target -> token, ``"*"`` for all."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._digests = {target: token_digest(token) for target, token in table.items()}
        self._known = set(self._digests.values())

    def check(self, target: str, authorization: str | None) -> tuple[int, str] | None:
        """None if the request may pull ``target``; else (401 or 403, why)."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401, "send 'Authorization: Bearer <token>'"
        digest = hashlib.sha256(token.encode()).digest()
        # constant time against each token that could admit this target
        ok = False
        for key in (target, ANY_TARGET):
            expected = self._digests.get(key)
            if expected is not None and hmac.compare_digest(digest, expected):
                ok = True
        if ok:
            return None
        if digest in self._known:
            return 403, f"this token does not give access to target {target!r}"
        return 401, "unknown token"


class RateLimit:
    """At most ``rate`` requests a second per key on average, ``burst`` at once: the generic
    cell rate algorithm, one float per key (the time its budget is back to full, minus one
    burst); keys whose budget is full again are forgotten, so idle targets cost nothing."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval
        self.clock = clock
        self._due: dict[str, float] = {}  # key -> theoretical arrival time of its next request
        self._swept = clock()

    def check(self, key: str) -> float:
        """0 if a request of ``key`` may go now (and it is counted), else the seconds until
        one may."""
        now = self.clock()
        due = max(self._due.get(key, now), now)
        if due - now > self.tolerance:
            return due - now - self.tolerance
        self._due[key] = due + self.interval
        if now - self._swept > 1.0:
            self._swept = now
            for stale in [k for k, t in self._due.items() if t <= now]:
                del self._due[stale]
        return 0.0


class PullApi:
    def __init__(
        self,
        *,
        tokens: Mapping[str, str] | None,
        max_body_bytes: int,
        pull: PullFunction,
        count: Callable[[int], None],
        rate_per_target: float = 0.0,
        rate_burst: int = 1,
    ) -> None:
        self.tokens = Tokens(tokens) if tokens is not None else None
        self.max_body_bytes = max_body_bytes
        self.rate = RateLimit(rate_per_target, rate_burst) if rate_per_target > 0 else None
        self.pull = pull
        self.count = count
        if self.tokens is None:
            log.warning(
                "the HTTP pull API has no authentication: anyone who reaches the HTTP port can "
                "pull (and acknowledge) any target's messages; set BRIDGE_DIRECTED__HTTP_TOKENS",
                extra={"path": HTTP_PULL_PATH},
            )

    def routes(self) -> list[web.RouteDef]:
        return [web.post(HTTP_PULL_PATH, self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        target = request.match_info["target"]
        if self.tokens is not None:
            refused = self.tokens.check(target, request.headers.get("Authorization"))
            if refused is not None:
                status, why = refused
                code = "unauthorized" if status == 401 else "forbidden"
                return self._answer(
                    status,
                    wire.encode_error(code, why),
                    {"WWW-Authenticate": 'Bearer realm="directed"'} if status == 401 else None,
                )
        if self.rate is not None and (wait := self.rate.check(target)) > 0:
            return self._error(
                wire.WireError(
                    "overloaded",
                    f"target {target!r} pulls more often than {1 / self.rate.interval:g} times "
                    f"a second (BRIDGE_DIRECTED__HTTP_RATE_PER_TARGET); retry in {wait:.3f} s",
                ),
                retry_after=wait,
            )
        binary = BINARY_REPLY_CONTENT_TYPE in request.headers.get("Accept", "")
        try:
            body = await self._body(request)
            reply = await self.pull(target, body, binary)
        except wire.WireError as exc:
            return self._error(exc)
        return self._answer(200, reply, content_type=BINARY_REPLY_CONTENT_TYPE if binary else None)

    async def _body(self, request: web.Request) -> bytes:
        """The body, at most ``max_body_bytes`` (chunked ones too). Read from the stream, not
        with ``request.read()``, which keeps a copy on the request for as long as it runs (a
        long poll: 30 s)."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise wire.WireError(
                "too_large", f"body of {length} bytes exceeds {self.max_body_bytes}"
            )
        chunks = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise wire.WireError(
                    "too_large", f"body of over {size} bytes exceeds {self.max_body_bytes}"
                )
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _error(self, exc: wire.WireError, *, retry_after: float = 1.0) -> web.Response:
        status = STATUS_OF_CODE.get(exc.code, 200)
        headers = None
        if status in (429, 503):
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        return self._answer(status, wire.encode_error(exc.code, exc.message), headers)

    def _answer(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        content_type: str | None = None,
    ) -> web.Response:
        """Error replies are JSON whatever the request accepts."""
        self.count(status)
        return web.Response(
            status=status,
            body=body,
            content_type=content_type or REPLY_CONTENT_TYPE,
            headers=headers,
        )
