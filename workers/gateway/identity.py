"""Who a gateway client is, with no I/O: signed client tokens, the identity a TLS client
certificate carries, the decision a HELLO gets, and the limit on failed authentications
per source address (docs/gateway.md, "Client identities").

A ``client_id`` is an identity only when it is proven, by a signed token (``proof`` =
``token``) or by the listener's client certificate (``cert``). Otherwise a client is
``shared`` (it gave one of the shared ``tokens``) or ``none``; such a client may still carry
its ``client_id`` as a sticky *hint* when the gateway is told to accept unproven ids
(``unproven_client_id = hint``), but a hint is never an identity: it replaces no other
connection and is not what a proven client's replies are kept for.

Signed token, version 1::

    v1.<expiry, epoch seconds>.<base64url, unpadded, of HMAC-SHA256(secret, client_id + "." + expiry)>

The expiry in the MAC is the decimal text of the token (no sign, no leading zero).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

TOKEN_VERSION: Final = "v1"
MAX_EXPIRY: Final = 10**12 - 1  # 12 digits: the year 33658, far enough
MAX_ID_CHARS: Final = 256  # protocol.MAX_CLIENT_ID_CHARS: an id a HELLO could carry

_TOKEN = re.compile(r"v1\.(0|[1-9][0-9]{0,11})\.([A-Za-z0-9_-]{43})")
_TTL = re.compile(r"([0-9]+)([smhdw]?)")
_TTL_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Proof = Literal["token", "cert", "shared", "none"]
CertIdSource = Literal["cn", "dns", "email", "uri"]
UnprovenPolicy = Literal["refuse", "hint"]


class TokenCheck(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed_token"  # not v1.<digits>.<43 base64url characters>
    EXPIRED = "expired_token"
    WRONG = "wrong_token"  # well formed, but not signed for this client_id by this secret


# ----------------------------------------------------------------------- signed tokens


def _mac(secret: bytes, client_id: str, expiry: str) -> str:
    digest = hmac.new(secret, f"{client_id}.{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign_token(secret: bytes, client_id: str, expiry: int) -> str:
    """The v1 token that proves ``client_id`` until ``expiry`` (epoch seconds)."""
    if not secret:
        raise ValueError("the secret is empty")
    if not 0 <= expiry <= MAX_EXPIRY:
        raise ValueError(f"expiry {expiry} is outside 0..{MAX_EXPIRY}")
    text = str(int(expiry))
    return f"{TOKEN_VERSION}.{text}.{_mac(secret, client_id, text)}"


def verify_token(secret: bytes, client_id: str, token: str, now: float) -> TokenCheck:
    """Whether ``token`` proves ``client_id`` at ``now``. The MAC is compared with
    ``hmac.compare_digest`` (time independent of where it differs), and computed whatever
    the expiry says, so an expired token costs the same as a valid one."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return TokenCheck.MALFORMED
    expiry, given = match.groups()
    good = hmac.compare_digest(_mac(secret, client_id, expiry).encode(), given.encode())
    if not good:
        return TokenCheck.WRONG
    if int(expiry) <= now:
        return TokenCheck.EXPIRED
    return TokenCheck.OK


def looks_signed(token: str | None) -> bool:
    """A token meant as a signed one (as opposed to a shared token)."""
    return token is not None and token.startswith(TOKEN_VERSION + ".")


def parse_ttl(text: str) -> int:
    """``30d``, ``12h``, ``15m``, ``90s``, ``2w`` or plain seconds, as seconds (> 0)."""
    match = _TTL.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 15m, 90s or 3600")
    seconds = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("the duration must be longer than 0 s")
    return seconds


# ----------------------------------------------------------------------- certificates


_SAN_KIND: Final = {"dns": "DNS", "email": "email", "uri": "URI"}


def cert_identity(cert: Mapping[str, Any] | None, source: CertIdSource) -> str | None:
    """The client id a verified peer certificate carries, from the dict of
    ``ssl.SSLSocket.getpeercert()``: its subject's (last) commonName for ``cn``, its first
    subjectAltName of that kind for ``dns``, ``email`` or ``uri``. None when there is no
    certificate, no such name, or a name no HELLO could carry (empty, too long)."""
    if not cert:
        return None
    value: str | None = None
    if source == "cn":
        for rdn in cert.get("subject", ()):
            for attr in rdn:
                if len(attr) == 2 and attr[0] == "commonName":
                    value = str(attr[1])  # the most specific (last) CN
    else:
        kind = _SAN_KIND[source]
        for entry in cert.get("subjectAltName", ()):
            if len(entry) == 2 and entry[0] == kind:
                value = str(entry[1])
                break
    if not value or len(value) > MAX_ID_CHARS:
        return None
    return value


# ----------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class Admitted:
    """The HELLO is accepted. ``client_id`` is set only when proven (``token``, ``cert``);
    ``hint`` is an unproven ``client_id`` kept for stickiness only."""

    proof: Proof
    client_id: str | None = None
    hint: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """ERROR ``unauthorized``; ``reason`` labels the failure metric, ``message`` is for
    the client."""

    reason: str
    message: str


def authenticate(
    *,
    client_id: str | None,
    token: str | None,
    now: float,
    secret: bytes | None,
    shared: bool | None,
    cert_required: bool,
    cert_id: str | None,
    unproven: UnprovenPolicy,
) -> Admitted | Refused:
    """What a HELLO gets (the table of docs/gateway.md, "Client identities").

    ``shared`` is None when no shared tokens are configured, else whether the HELLO's
    token is one of them; ``cert_required`` says the listener requires a client
    certificate, whose identity is ``cert_id`` (None: no usable one)."""
    if cert_required:
        if cert_id is None:
            return Refused(
                "no_certificate", "this port requires a client certificate naming the client"
            )
        if client_id is not None and client_id != cert_id:
            return Refused(
                "certificate_mismatch",
                "HELLO client_id is not the one of the client certificate",
            )
        return Admitted("cert", client_id=cert_id)
    if client_id is not None:
        if secret is not None and looks_signed(token):
            assert token is not None
            check = verify_token(secret, client_id, token, now)
            if check is TokenCheck.OK:
                return Admitted("token", client_id=client_id)
            return Refused(check.value, _TOKEN_MESSAGES[check])
        if unproven == "refuse":
            how = "a signed token" if secret is not None else "a signed token or certificate"
            return Refused(
                "unproven_client_id",
                f"a client_id needs {how} to prove it; leave client_id out to connect without one",
            )
        if shared is None:
            return Admitted("none", hint=client_id)
        if shared:
            return Admitted("shared", hint=client_id)
        return Refused("wrong_shared_token", "HELLO token missing or not accepted")
    if shared is None:
        return Admitted("none")
    if shared:
        return Admitted("shared")
    return Refused("wrong_shared_token", "HELLO token missing or not accepted")


_TOKEN_MESSAGES: Final = {
    TokenCheck.MALFORMED: "HELLO token is not a v1 signed token",
    TokenCheck.EXPIRED: "HELLO token has expired",
    TokenCheck.WRONG: "HELLO token is not valid for this client_id",
}


# ----------------------------------------------------------------------- rate limit


def source_of(peer: str) -> str:
    """The rate limit's key of a peer ``ip:port`` / ``[ip6]:port``: the IPv4 address, or
    the /64 of an IPv6 address (one host usually has a whole /64 to pick from)."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class _Bucket:
    allowance: float
    at: float


@dataclass(frozen=True, slots=True)
class FailureReport:
    """What happened since the last report: for one log line per interval."""

    failures: int
    refused: int  # attempts refused unchecked because their source was blocked
    sources: int  # distinct sources that failed or were refused
    blocked: tuple[str, ...]  # sources blocked now (at most 10 named)
    blocked_count: int


class FailureLimiter:
    """Failed authentications per source: each source may fail ``limit`` times in a row,
    and the allowance comes back at ``limit`` per ``window_s`` (a token bucket). A source
    with less than one failure left is blocked: its attempts are refused without being
    checked, and do not count against it (so a source is never blocked longer than one
    failure's share of the window). At most ``max_sources`` sources are remembered (the
    least recently failing ones are forgotten first). ``limit`` 0 turns the limit off.
    """

    def __init__(self, limit: int, window_s: float, *, max_sources: int = 100_000) -> None:
        self.limit = limit
        self.rate = limit / window_s if limit else 0.0
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._failures = 0
        self._refused = 0
        self._seen: set[str] = set()

    def _allowance(self, bucket: _Bucket, now: float) -> float:
        return min(self.limit, bucket.allowance + max(0.0, now - bucket.at) * self.rate)

    def admits(self, source: str, now: float) -> bool:
        """Whether ``source`` may try to authenticate now; a refusal is counted."""
        if not self.limit:
            return True
        bucket = self._buckets.get(source)
        if bucket is None or self._allowance(bucket, now) >= 1.0:
            return True
        self._refused += 1
        if len(self._seen) < self.max_sources:
            self._seen.add(source)
        return False

    def failed(self, source: str, now: float) -> None:
        self._failures += 1
        if len(self._seen) < self.max_sources:
            self._seen.add(source)
        if not self.limit:
            return
        bucket = self._buckets.pop(source, None)
        allowance = float(self.limit) if bucket is None else self._allowance(bucket, now)
        self._buckets[source] = _Bucket(max(0.0, allowance - 1.0), now)  # most recent last
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)

    def blocked_sources(self, now: float) -> list[str]:
        return [s for s, b in self._buckets.items() if self._allowance(b, now) < 1.0]

    def prune(self, now: float) -> None:
        """Forget the sources whose allowance is full again."""
        full = [s for s, b in self._buckets.items() if self._allowance(b, now) >= self.limit]
        for source in full:
            del self._buckets[source]

    def report(self, now: float) -> FailureReport | None:
        """The failures and refusals since the last report (None if there were none),
        and start counting again."""
        if not (self._failures or self._refused):
            return None
        blocked = self.blocked_sources(now)
        out = FailureReport(
            self._failures, self._refused, len(self._seen), tuple(blocked[:10]), len(blocked)
        )
        self._failures = self._refused = 0
        self._seen = set()
        self.prune(now)
        return out

    def __len__(self) -> int:
        return len(self._buckets)
