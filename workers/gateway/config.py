"""Settings of the gateway worker (``BRIDGE_GATEWAY__*``) and the wire names it uses.

Every exchange and queue name is the default of a setting; AMQP headers, event names and the
ERROR codes the gateway adds to those of :mod:`workers.gateway.wire` are defined here once.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from bridge.amqp.poison import H_DEAD_DETAIL as H_DEAD_DETAIL
from bridge.amqp.poison import H_DEAD_REASON as H_DEAD_REASON
from bridge.settings import worker_settings_config
from workers.gateway.identity import CertIdSource, UnprovenPolicy

# AMQP headers of the contract (gateway -> server and server -> gateway).
H_EVENT = "x-event"
H_SESSION = "x-session"
H_CLIENT_ID = "x-client-id"
H_CLIENT_ADDR = "x-client-addr"
H_GATEWAY = "x-gateway"
H_CLOSE = "x-close"
H_MOVED_FROM = "x-moved-from"  # on the connect of a client moved off a server that is gone
H_CLIENT_AUTH = "x-client-auth"  # how the client was identified: token, cert, shared, none

EVENT_CONNECT = "connect"
EVENT_DATA = "data"
EVENT_DISCONNECT = "disconnect"

# Registry operations on the servers exchange.
OP_REGISTER = "register"
OP_HEARTBEAT = "heartbeat"
OP_DEREGISTER = "deregister"
REGISTRY_OPS = (OP_REGISTER, OP_HEARTBEAT, OP_DEREGISTER)

# ERROR codes the adapter sends besides the framing ones (protocol.ErrorCode).
E_BUSY = "busy"
E_UNAUTHORIZED = "unauthorized"
E_NO_SERVER = "no_server"
E_HELLO_TIMEOUT = "hello_timeout"
E_IDLE_TIMEOUT = "idle_timeout"
E_SLOW_CONSUMER = "slow_consumer"
E_UNAVAILABLE = "unavailable"
E_SERVER_GONE = "server_gone"
E_REPLACED = "replaced"  # a newer connection proved the same client_id
E_RATE_LIMITED = "rate_limited"  # too many failed authentications from the source address

# x-dead-reason values on gateway.undeliverable.
DEAD_SESSION_GONE = "session_gone"
DEAD_NO_SESSION = "missing_session"
DEAD_TOO_LARGE = "too_large"  # longer than the client's length prefix can say
DEAD_INVALID_HEADERS = "invalid_headers"  # the reply's headers table could not be decoded
# offline replies (workers/gateway/offline.py): set on every reply kept for a client that is
# offline, so that the broker's dead-lettering of an expired one carries it
DEAD_OFFLINE_EXPIRED = "offline_expired"
DEAD_OFFLINE_OVERFLOW = "offline_overflow"  # the client's offline queue was full
DEAD_OFFLINE_FAILED = "offline_failed"  # the offline queue could not be declared
H_OFFLINE_MARKER = "x-offline-marker"  # the marker a reconnecting session drains up to
H_SEQ = "x-seq"  # protocol v2: the client's sequence number of a DATA

# A server id becomes part of a queue name, so it is held to a safe alphabet and length.
SERVER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")


class Listener(BaseModel):
    """One listening port of ``BRIDGE_GATEWAY__LISTENERS`` (docs/gateway.md, Listeners)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(ge=0, le=65535, description="0 = any free port")
    framing: Literal["frames", "length", "lines", "raw"] = "frames"
    length_bytes: Literal[1, 2, 4] = 4
    byte_order: Literal["big", "little"] = "big"
    proxy_protocol: bool = False
    tls: bool = False
    client_auth: Literal["none", "required"] = Field(
        default="none",
        description="required: TLS client certificate signed by tls_client_ca; it names the "
        "client (tls only)",
    )
    passthrough: str | None = Field(
        default=None,
        description="host:port: a connection whose first bytes are not a HELLO is relayed "
        "there byte for byte instead of being refused (frames only)",
    )

    @field_validator("passthrough")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"passthrough {value!r} is not host:port")
        return value

    @property
    def upstream(self) -> tuple[str, int] | None:
        if self.passthrough is None:
            return None
        host, _, port = self.passthrough.rpartition(":")
        return host.strip("[]"), int(port)

    @model_validator(mode="after")
    def _check(self) -> Listener:
        if self.client_auth == "required" and not self.tls:
            raise ValueError('client_auth "required" needs tls: true')
        if self.passthrough is not None and self.framing != "frames":
            raise ValueError(
                f'passthrough only applies to framing "frames" (a {self.framing} listener '
                "has no HELLO to tell its clients from other traffic)"
            )
        if self.framing != "length":
            given = {"length_bytes", "byte_order"} & self.model_fields_set
            if given:
                raise ValueError(
                    f'{" and ".join(sorted(given))} only apply to framing "length", '
                    f"not {self.framing!r}"
                )
        return self

    def label(self, taken: set[str]) -> str:
        """Name in ``worker.ports``, the ready line and the metrics' ``listener`` label:
        the framing (``+tls``, ``+proxy``), numbered from the second of a kind."""
        base = (
            self.framing + ("+tls" if self.tls else "") + ("+proxy" if self.proxy_protocol else "")
        )
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        return name


def default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class GatewaySettings(BaseSettings):
    model_config = worker_settings_config("gateway")

    host: str = Field(default="0.0.0.0", description="bind address of the TCP listener(s)")
    port: int = Field(
        default=7000, ge=0, le=65535, description="plain TCP listener; 0 = any free port"
    )
    plain_listener: bool = Field(
        default=True, description="false: only the TLS listener runs (needs tls_cert/tls_key)"
    )
    tls_port: int = Field(
        default=7443, ge=0, le=65535, description="TLS listener, started when tls_cert is set"
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain")
    tls_key: Path | None = Field(default=None, description="PEM private key")
    backlog: int = Field(default=1024, ge=1, description="listen() backlog")
    listeners: Annotated[list[Listener], NoDecode] = Field(
        default_factory=list,
        description="JSON list of listening ports with their framing; set, it replaces "
        "port, tls_port and plain_listener",
    )

    servers_exchange: str = "gateway.servers"
    server_queue_prefix: str = "gateway.server."
    undeliverable_queue: str = "gateway.undeliverable"
    reply_queue_prefix: str = "gateway.reply."
    registry_queue_prefix: str = "gateway.registry."
    instance: str = Field(
        default_factory=default_instance,
        min_length=1,
        max_length=120,
        description="this gateway replica's id (x-gateway, reply queue name)",
    )

    peers: bool = Field(
        default=True,
        description="share per-server counts and sticky records with the other replicas of "
        "the same servers exchange; false: each replica balances alone",
    )
    peers_exchange: str = Field(
        default="",
        description="fanout exchange of the replicas' count reports; empty = "
        "<servers_exchange>.peers",
    )
    sticky_stream: str = Field(
        default="",
        description="stream of client_id -> server records shared by the replicas; empty = "
        "<servers_exchange>.sticky",
    )
    peer_report_s: float = Field(
        default=1.0, gt=0, description="a replica reports its counts at least this often"
    )
    peer_debounce_s: float = Field(
        default=0.05,
        ge=0,
        le=5,
        description="a change of counts or sticky records is reported within about this long",
    )
    peer_ttl_s: float = Field(
        default=5.0,
        gt=0,
        description="a replica not heard from this long is dropped from the global view",
    )
    peer_catchup_s: float = Field(
        default=5.0,
        ge=0,
        description="at start, wait up to this long to read the shared sticky records",
    )
    sticky_stream_max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description="size cap of the sticky stream (x-max-length-bytes), fixed at its creation",
    )

    offline_max_messages: int = Field(
        default=1000,
        ge=0,
        description="replies kept for a sticky client_id that is offline (0: none kept, they "
        "go to the undeliverable queue as before)",
    )
    offline_ttl_s: float = Field(
        default=3600.0, gt=0, description="how long a reply is kept for an offline client"
    )
    offline_queue_prefix: str = Field(
        default="gateway.offline.",
        description="a client's offline replies are kept in the queue prefix + client_id",
    )
    offline_exchange: str = Field(
        default="gateway.offline",
        description="headers exchange the offline queues dead-letter to (expired replies on "
        "to the undeliverable queue)",
    )

    reply_queue_expires_s: float = Field(
        default=60.0,
        gt=0,
        description="the reply queue outlives a lost broker connection; it goes this long after "
        "its consumer left",
    )

    heartbeat_s: float = Field(
        default=30.0, gt=0, description="PING a connection silent this long (sent in WELCOME)"
    )
    idle_timeout_s: float = Field(
        default=90.0, gt=0, description="close a connection silent this long"
    )
    hello_timeout_s: float = Field(default=10.0, gt=0, description="time allowed for HELLO")
    server_ttl_s: float = Field(
        default=15.0, gt=0, description="a server missing heartbeats this long takes no clients"
    )
    on_server_loss: Literal["move", "close"] = Field(
        default="move",
        description="when a server deregisters or misses its heartbeats: move its clients to "
        "the least-loaded live server, or close them (ERROR server_gone)",
    )
    sticky_retention_s: float = Field(
        default=300.0, ge=0, description="a returning client_id goes back to its server"
    )
    no_server_wait_s: float = Field(
        default=5.0, ge=0, description="wait this long for a server before ERROR no_server"
    )
    max_frame: int = Field(default=1024 * 1024, ge=1, description="largest payload after HELLO")
    max_hello_frame: int = Field(default=4096, ge=16, description="largest HELLO payload")
    max_connections: int = Field(default=100_000, ge=1, description="beyond: ERROR busy")
    outbound_buffer_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="unsent bytes per client before ERROR slow_consumer",
    )
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted HELLO tokens (comma-separated or JSON list); empty = no check",
    )
    publish_window: int = Field(
        default=1024, ge=1, description="unconfirmed publishes of this gateway"
    )
    session_in_flight: int = Field(
        default=32, ge=1, description="unconfirmed publishes per connection before reading stops"
    )
    close_flush_s: float = Field(
        default=2.0, gt=0, description="how long a closing socket may take to flush"
    )
    tick_s: float = Field(
        default=1.0, gt=0, description="housekeeping period (timeouts, pings, expiry)"
    )
    state_flush_s: float = Field(
        default=2.0,
        gt=0,
        description="how often sticky records and session client_ids are saved for a restart",
    )

    # Client identities (docs/gateway.md, "Client identities"; workers/gateway/identity.py).
    client_token_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of the signed HELLO tokens that prove a client_id "
        "(rabbitmq-bridge gateway token); best from the secrets directory",
    )
    tls_client_ca: Path | None = Field(
        default=None,
        description="PEM bundle of the CAs that sign client certificates (listeners with "
        'client_auth "required")',
    )
    client_cert_id: CertIdSource = Field(
        default="cn",
        description="which name of a client certificate is the client_id: the subject's cn, "
        "or its first dns, email or uri subjectAltName",
    )
    unproven_client_id: UnprovenPolicy | None = Field(
        default=None,
        description="a HELLO client_id without a signed token or certificate: refuse "
        "(ERROR unauthorized) or keep it as a sticky hint only; unset = refuse when "
        "client_token_secret or a client_auth listener is set, else hint",
    )
    auth_failure_limit: int = Field(
        default=10,
        ge=0,
        description="failed authentications a source address may have in a row before its "
        "HELLOs are refused (ERROR rate_limited); 0 = no limit",
    )
    auth_failure_window_s: float = Field(
        default=60.0,
        gt=0,
        description="a source's allowance of failures comes back at auth_failure_limit per "
        "this long",
    )
    auth_failure_log_s: float = Field(
        default=60.0,
        gt=0,
        description="failed authentications are logged in one line per this long",
    )

    @field_validator("client_token_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError(
                "must be at least 16 characters (e.g. the output of: openssl rand -base64 32)"
            )
        return value

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [t.strip() for t in text.split(",") if t.strip()]
        return value

    @field_validator("listeners", mode="before")
    @classmethod
    def _listeners_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value) if value.strip() else []
            except ValueError as exc:
                raise ValueError(f"not a JSON list of listener objects ({exc})") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("BRIDGE_GATEWAY__TLS_CERT and __TLS_KEY must be set together")
        if self.listeners:
            legacy = {"port", "tls_port", "plain_listener"} & self.model_fields_set
            if legacy:
                names = ", ".join(f"BRIDGE_GATEWAY__{n.upper()}" for n in sorted(legacy))
                raise ValueError(
                    f"BRIDGE_GATEWAY__LISTENERS replaces {names}: set one or the other"
                )
            ports = [x.port for x in self.listeners if x.port]
            if len(ports) != len(set(ports)):
                raise ValueError("BRIDGE_GATEWAY__LISTENERS names a port twice")
            if any(x.tls for x in self.listeners) and self.tls_cert is None:
                raise ValueError("a listener with tls: true needs tls_cert and tls_key")
            if self.client_auth_listeners and self.tls_client_ca is None:
                raise ValueError(
                    'a listener with client_auth "required" needs tls_client_ca (the CA '
                    "bundle of the client certificates)"
                )
        if not self.plain_listener and self.tls_cert is None:
            raise ValueError("plain_listener=false needs tls_cert and tls_key")
        if self.max_hello_frame > self.max_frame:
            raise ValueError("max_hello_frame must not exceed max_frame")
        if self.peer_ttl_s <= self.peer_report_s:
            raise ValueError(
                "peer_ttl_s must be longer than peer_report_s (a few reports), or every "
                "replica would keep dropping the others"
            )
        return self

    def bound_listeners(self) -> list[tuple[str, str, Listener]]:
        """What the gateway listens on, as (label, variable, listener): the LISTENERS list
        if set, else today's frames listeners on PORT and (with a certificate) TLS_PORT."""
        if not self.listeners:
            out = []
            if self.plain_listener:
                out.append(("tcp", "BRIDGE_GATEWAY__PORT", Listener(port=self.port)))
            if self.tls_cert is not None:
                out.append(
                    ("tls", "BRIDGE_GATEWAY__TLS_PORT", Listener(port=self.tls_port, tls=True))
                )
            return out
        taken: set[str] = set()
        out = []
        for i, listener in enumerate(self.listeners):
            label = listener.label(taken)
            taken.add(label)
            out.append((label, f"BRIDGE_GATEWAY__LISTENERS[{i}]", listener))
        return out

    @property
    def client_auth_listeners(self) -> bool:
        return any(x.client_auth == "required" for x in self.listeners)

    @property
    def unproven_policy(self) -> UnprovenPolicy:
        """What an unproven HELLO client_id gets: the setting, else ``refuse`` as soon as
        identities can be proven (a token secret or a client-certificate listener), else
        ``hint`` (nothing could be proven: the client_id stays the sticky hint it was)."""
        if self.unproven_client_id is not None:
            return self.unproven_client_id
        if self.client_token_secret is not None or self.client_auth_listeners:
            return "refuse"
        return "hint"

    @property
    def token_secret(self) -> bytes | None:
        secret = self.client_token_secret
        return None if secret is None else secret.get_secret_value().encode()

    def server_queue(self, server_id: str) -> str:
        return self.server_queue_prefix + server_id

    def offline_queue(self, client_id: str) -> str:
        """The queue that keeps a client's offline replies: the client_id itself when it is
        short and of the server-id alphabet, else ``#`` and its SHA-256 (``#`` is not in
        that alphabet, so the two forms never meet)."""
        if SERVER_ID_RE.fullmatch(client_id):
            return self.offline_queue_prefix + client_id
        digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.offline_queue_prefix}#{digest}"

    @property
    def reply_queue(self) -> str:
        return self.reply_queue_prefix + self.instance

    @property
    def registry_queue(self) -> str:
        return self.registry_queue_prefix + self.instance

    @property
    def peers_exchange_name(self) -> str:
        """Replicas that share a servers exchange share counts, so the default follows it."""
        return self.peers_exchange or f"{self.servers_exchange}.peers"

    @property
    def peers_queue(self) -> str:
        return f"{self.peers_exchange_name}.{self.instance}"

    @property
    def sticky_stream_name(self) -> str:
        return self.sticky_stream or f"{self.servers_exchange}.sticky"

    @property
    def sticky_stream_max_age_s(self) -> int:
        """Records older than the retention are useless; twice it leaves room for a segment
        that is only partly expired (streams drop whole segments)."""
        return max(60, int(self.sticky_retention_s * 2))

    @property
    def state_name(self) -> str:
        """Name of the state file: the instance if it was set, else the host name (the
        default instance has the pid in it, which changes at every restart)."""
        return self.instance if "instance" in self.model_fields_set else socket.gethostname()
