"""Where and how to connect: a broker URL read as aio-pika reads it (``amqp``/``amqps``,
vhost, ``heartbeat``, ``name``, ``cafile``/``certfile``/``keyfile``/``no_verify_ssl``), and
the one mapping of a failed connection to a line an operator can act on.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass, field

from bridge.errors import LinkError
from bridge.settings import redact_url


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, read from a broker URL as aio-pika reads it."""

    host: str
    port: int
    user: str
    password: str
    vhost: str
    tls: bool
    heartbeat: int | None = None
    name: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an AMQP URL: {u.scheme}://")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
        heartbeat = None
        if "heartbeat" in query:
            try:
                heartbeat = int(query["heartbeat"])
            except ValueError as exc:
                raise ValueError(f"heartbeat in the broker URL is not an integer: {exc}") from exc
        return cls(
            host=u.hostname or "localhost",
            port=u.port or (5671 if u.scheme == "amqps" else 5672),
            user=urllib.parse.unquote(u.username or "guest"),
            password=urllib.parse.unquote(u.password or "guest"),
            vhost=urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/",
            tls=u.scheme == "amqps",
            heartbeat=heartbeat,
            name=query.get("name"),
            cafile=query.get("cafile"),
            certfile=query.get("certfile"),
            keyfile=query.get("keyfile"),
            verify=query.get("no_verify_ssl", "0") == "0",
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.cafile)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def describe_connect_error(url: str, exc: BaseException) -> str:
    """One line an operator can act on: the one mapping of a failed connection (this link's
    handshake, aio-pika's for the control plane) to what to check."""
    reason = f"{type(exc).__name__}: {exc}".strip()
    hint = "is RabbitMQ running and reachable? set BRIDGE_AMQP_URL (or its secrets file)"
    text = str(exc).lower()
    code = exc.code if isinstance(exc, LinkError) else None
    if code == 530 or "vhost" in text or "not_allowed" in text or "connection.openok" in text:
        # aio-pika reports a refused connection.open as "Expected one of
        # ['Connection.OpenOk'], got <Connection.Close ...>", without the broker's text
        try:
            e = Endpoint.parse(url)
        except ValueError:
            e = None
        if e is not None:
            return (
                f"broker at {redact_url(url)} refused virtual host {e.vhost!r}: it does not "
                f"exist or user {e.user!r} has no access to it (create it, or grant access "
                "with rabbitmqctl set_permissions; the vhost is the path of BRIDGE_AMQP_URL, "
                "'/' written as %2F)"
            )
    if code == 403 or "access_refused" in text or "login" in text or "auth" in text:
        hint = "the broker refused the credentials: check the user and password in BRIDGE_AMQP_URL"
    return f"broker unreachable at {redact_url(url)} ({reason}); {hint}"
