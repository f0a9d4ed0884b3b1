"""The HTTP pull API of the directed worker: ``POST /directed/v1/targets/{target}/pull``.

Owns what is HTTP about a pull: bearer-token authentication per target, the body's size, and
the mapping of reply codes to HTTP statuses. The pull itself (parsing, the cursor rules, the
long poll, the commit before the answer, shard relaying) is the worker's one pull path, the
same the AMQP pull takes: this module gets it as a function ``(target, body) -> reply``
raising :class:`~workers.directed.wire.WireError`.

Statuses: 200 for a reply and for the pull's own error replies (the body is the AMQP
reply's), 401 without a valid token, 403 for a token of another target, 413 for a body over
``MAX_PULL_BYTES``, 429 for ``overloaded``, 503 for ``unavailable``; aiohttp answers 404/405.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
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


class PullApi:
    def __init__(
        self,
        *,
        tokens: Mapping[str, str] | None,
        max_body_bytes: int,
        pull: PullFunction,
        count: Callable[[int], None],
    ) -> None:
        self.tokens = Tokens(tokens) if tokens is not None else None
        self.max_body_bytes = max_body_bytes
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
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            return self._error(
                wire.WireError("too_large", f"body of {length} bytes exceeds {self.max_body_bytes}")
            )
        binary = BINARY_REPLY_CONTENT_TYPE in request.headers.get("Accept", "")
        try:
            body = await request.read()
            reply = await self.pull(target, body, binary)
        except wire.WireError as exc:
            return self._error(exc)
        return self._answer(200, reply, content_type=BINARY_REPLY_CONTENT_TYPE if binary else None)

    def _error(self, exc: wire.WireError) -> web.Response:
        return self._answer(
            STATUS_OF_CODE.get(exc.code, 200), wire.encode_error(exc.code, exc.message)
        )

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
