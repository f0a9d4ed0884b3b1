"""The gateway's side of client identities: it applies the pure decisions of
:mod:`workers.gateway.identity` to a connection (its certificate, its source address),
counts them, logs failed authentications in one line per interval, and keeps one live
connection per proven ``client_id`` (the newer one wins, the older gets ERROR
``replaced``): at once among this replica's connections, and across replicas when their
claims arrive through the peers exchange (workers/gateway/peers.py). "Newer" is the
claim's stamp, ``(admit time in wall-clock ms, replica instance)``, the same order on
every replica, so of two connections on two replicas exactly one survives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from workers.gateway.config import (
    E_RATE_LIMITED,
    E_REPLACED,
    E_UNAUTHORIZED,
    GatewaySettings,
    Listener,
)
from workers.gateway.identity import (
    Admitted,
    FailureLimiter,
    Proof,
    Refused,
    authenticate,
    cert_identity,
    source_of,
)
from workers.gateway.states import State

log = logging.getLogger("bridge.gateway")


class Client(Protocol):
    """What the authenticator needs of a session (and sets: who the client is)."""

    sid: str
    peer: str
    listener: Listener
    transport: asyncio.Transport | None
    state: State
    client_id: str | None
    hint: str | None
    proof: Proof

    def fail(self, code: str, message: str) -> None: ...


def peer_certificate(client: Client) -> dict[str, Any] | None:
    """The client's verified TLS certificate (``ssl`` getpeercert form), if any."""
    transport = client.transport
    cert = None if transport is None else transport.get_extra_info("peercert")
    return cert if isinstance(cert, dict) else None


@dataclass(slots=True)
class Claim:
    client: Client
    at: int  # wall-clock ms when it was admitted (with the instance: the claim's order)


class Authenticator:
    def __init__(self, settings: GatewaySettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.secret = settings.token_secret
        self.unproven = settings.unproven_policy
        self.limiter = FailureLimiter(settings.auth_failure_limit, settings.auth_failure_window_s)
        # the live connection of each proven client_id (sessions of this replica)
        self.claims: dict[str, Claim] = {}
        # tells the other replicas (client_id, session, stamp): Peers.claimed
        self.announce: Callable[[str, str, int], None] | None = None
        self.failures = Counter(
            "bridge_gateway_auth_failures_total",
            "failed authentications (ERROR unauthorized), and attempts refused unchecked "
            "because their source address failed too often (rate_limited), by reason",
            ["reason"],
            registry=registry,
        )
        self.admitted = Counter(
            "bridge_gateway_authenticated_total",
            "clients admitted, by how they were identified: token, cert, shared, none",
            ["proof"],
            registry=registry,
        )
        self.replaced = Counter(
            "bridge_gateway_replaced_total",
            "connections closed because a newer one proved the same client_id",
            registry=registry,
        )
        self._log_due: asyncio.TimerHandle | None = None
        self._logged_at = -float("inf")

    def admit(
        self,
        client: Client,
        client_id: str | None = None,
        token: str | None = None,
        shared: bool | None = None,
    ) -> bool:
        """Authenticate a HELLO (``client_id``, ``token``; ``shared`` as :meth:`decide`
        takes it), or a connection of a certificate listener without HELLO (no arguments):
        set who the client is and replace an older connection of its proven client_id, or
        refuse it (ERROR ``rate_limited`` or ``unauthorized``; a listener without HELLO
        just closes) and return False."""
        if not self.admits(client):
            client.fail(E_RATE_LIMITED, "too many failed authentications from this address")
            return False
        verdict = self.decide(client, client_id, token, shared)
        if isinstance(verdict, Refused):
            client.fail(E_UNAUTHORIZED, verdict.message)
            return False
        client.client_id, client.hint, client.proof = (
            verdict.client_id,
            verdict.hint,
            verdict.proof,
        )
        self.claim(client)
        return True

    def admits(self, client: Client) -> bool:
        """False when the client's source address has failed too often: refuse it unchecked
        (ERROR ``rate_limited``), counted and logged with the failures."""
        if self.limiter.admits(source_of(client.peer), time.monotonic()):
            return True
        self.failures.labels("rate_limited").inc()
        self._log_later()
        return False

    def decide(
        self, client: Client, client_id: str | None, token: str | None, shared: bool | None
    ) -> Admitted | Refused:
        """The HELLO's verdict (``client_id``/``token`` of the HELLO; ``shared`` as
        :func:`~workers.gateway.identity.authenticate` takes it); a refusal is counted
        against the source address."""
        required = client.listener.client_auth == "required"
        verdict = authenticate(
            client_id=client_id,
            token=token,
            now=time.time(),
            secret=self.secret,
            shared=shared,
            cert_required=required,
            cert_id=cert_identity(peer_certificate(client), self.settings.client_cert_id)
            if required
            else None,
            unproven=self.unproven,
        )
        if isinstance(verdict, Refused):
            self.failures.labels(verdict.reason).inc()
            self.limiter.failed(source_of(client.peer), time.monotonic())
            self._log_later()
        else:
            self.admitted.labels(verdict.proof).inc()
        return verdict

    # -- one connection per proven client_id --------------------------------------------

    def claim(self, client: Client) -> None:
        """``client`` proved its ``client_id``: it is that client's connection now, and an
        older live one is closed with ERROR ``replaced`` (before the new one is welcomed,
        so no reply or offline message can reach both); the other replicas are told."""
        client_id = client.client_id
        if client_id is None:
            return
        older = self.claims.get(client_id)
        # the newer arrival wins here even if the wall clock stepped back
        at = max(int(time.time() * 1000), older.at + 1 if older is not None else 0)
        self.claims[client_id] = Claim(client, at)
        if older is not None and older.client is not client:
            self._replace(older.client, "a newer connection proved the same client_id")
        if self.announce is not None:
            self.announce(client_id, client.sid, at)

    def claimed_elsewhere(self, client_id: str, at: int, replica: str) -> None:
        """Replica ``replica`` admitted ``client_id`` with stamp ``at``: close this replica's
        connection of that id if its claim is older; if it is newer, say so again, so that
        the other replica closes its own (their order is the same on both)."""
        mine = self.claims.get(client_id)
        if mine is None or mine.client.state >= State.CLOSING:
            return
        if (mine.at, self.settings.instance) < (at, replica):
            del self.claims[client_id]
            self._replace(mine.client, f"a newer connection proved the same client_id ({replica})")
        elif self.announce is not None:
            self.announce(client_id, mine.client.sid, mine.at)

    def _replace(self, older: Client, message: str) -> None:
        if older.state < State.CLOSING:
            self.replaced.inc()
            older.fail(E_REPLACED, message)

    def release(self, client: Client) -> None:
        """The connection is gone: its client_id is free (unless a newer one holds it)."""
        client_id = client.client_id
        claim = None if client_id is None else self.claims.get(client_id)
        if client_id is not None and claim is not None and claim.client is client:
            del self.claims[client_id]

    # -- one log line per interval -------------------------------------------------------

    def _log_later(self) -> None:
        if self._log_due is not None:
            return
        wait = self._logged_at + self.settings.auth_failure_log_s - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests drive sessions by hand): log at once
            self.log_failures()
            return
        self._log_due = loop.call_later(max(0.0, wait), self.log_failures)

    def log_failures(self) -> None:
        """The failed authentications since the last line, in one line."""
        self._log_due = None
        now = time.monotonic()
        report = self.limiter.report(now)
        if report is None:
            return
        self._logged_at = now
        log.warning(
            "failed client authentications",
            extra={
                "failures": report.failures,
                "refused_rate_limited": report.refused,
                "sources": report.sources,
                "blocked_sources": report.blocked_count,
                "blocked": list(report.blocked),
            },
        )

    def close(self) -> None:
        if self._log_due is not None:
            self._log_due.cancel()
            self.log_failures()
