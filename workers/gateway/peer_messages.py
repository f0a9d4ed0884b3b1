"""The messages gateway replicas exchange (workers/gateway/peers.py), checked: each parser
takes a decoded JSON document and returns its fields or raises :class:`PeerMessageError`.
Pure: no I/O."""

from __future__ import annotations

import math
from typing import Any

from workers.gateway.config import SERVER_ID_RE

MAX_CLIENT_ID = 4096  # a HELLO is at most max_hello_frame bytes anyway
MAX_SESSION = 64  # a session id is 32 hex digits
MAX_STAMP = 2**53  # a claim's stamp: milliseconds since the epoch, exact in JSON


class PeerMessageError(ValueError):
    pass


def parse_counts(doc: Any) -> dict[str, int]:
    counts = doc.get("counts")
    if not isinstance(counts, dict):
        raise PeerMessageError("counts is not an object")
    out: dict[str, int] = {}
    for server, n in counts.items():
        if not isinstance(server, str) or not SERVER_ID_RE.match(server):
            raise PeerMessageError(f"bad server id {server!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PeerMessageError(f"bad count {n!r}")
        out[server] = n
    return out


def parse_sticky(doc: Any) -> list[tuple[str, str, float]]:
    records = doc.get("records")
    if not isinstance(records, list):
        raise PeerMessageError("records is not an array")
    out: list[tuple[str, str, float]] = []
    for record in records:
        if not isinstance(record, list) or len(record) != 3:
            raise PeerMessageError("a record is not [client_id, server, time]")
        client_id, server, at = record
        if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID:
            raise PeerMessageError("bad client_id")
        if not isinstance(server, str) or not SERVER_ID_RE.match(server):
            raise PeerMessageError(f"bad server id {server!r}")
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            raise PeerMessageError("bad time")
        out.append((client_id, server, float(at)))
    return out


def to_monotonic(wall: float, *, wall_now: float, mono_now: float, max_age: float) -> float:
    """A wall-clock time from another host on this process's monotonic clock, never in
    the future and never older than ``max_age``."""
    age = min(max(0.0, wall_now - wall), max_age)
    return mono_now - age


def parse_client_id(doc: Any) -> str:
    client_id = doc.get("client_id")
    if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID:
        raise PeerMessageError("bad client_id")
    return client_id


def parse_claim(doc: Any) -> tuple[str, str, int]:
    """A ``claim``: (client_id, session, stamp), the stamp in wall-clock milliseconds."""
    client_id = parse_client_id(doc)
    session, at = doc.get("session"), doc.get("at")
    if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION:
        raise PeerMessageError("bad session")
    if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at < MAX_STAMP:
        raise PeerMessageError("at must be an integer (ms)")
    return client_id, session, at
