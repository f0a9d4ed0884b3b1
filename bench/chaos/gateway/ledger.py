"""The gateway suite's clients and ledger: echo clients that resend what was not answered, keyed by
an id in the payload, and what the servers received."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.gateway.backend import Reply, ServerEvent
from workers.gateway.client import GatewayClient, GatewayError
from workers.gateway.wire import FrameType, encode_data

NAME = "gateway"
SERVERS = ("s1", "s2")


# -- the ledger ----------------------------------------------------------------------------


def message(cid: str, seq: int, attempt: int, size: int) -> bytes:
    head = f"{cid}|{seq}|{attempt}|".encode()
    return head + b"." * max(0, size - len(head))


def parse(body: bytes) -> tuple[str, int, int] | None:
    try:
        cid, seq, attempt, _ = body.split(b"|", 3)
        return cid.decode(), int(seq), int(attempt)
    except ValueError:
        return None


@dataclass
class ServerLedger:
    """What the backends received, in the order each received it."""

    data: list[tuple[str, str, int, int]] = field(default_factory=list)  # session, cid, seq, att
    # the same, delivered again by the broker (the server's ack was lost in a broker restart)
    redelivered: list[tuple[str, str, int, int]] = field(default_factory=list)
    connects: set[str] = field(default_factory=set)
    disconnects: set[str] = field(default_factory=set)
    delay_s: float = 0.0  # overload: a slow backend

    async def handle(self, event: ServerEvent) -> list[Reply]:
        if event.event == "connect":
            self.connects.add(event.session or "")
        elif event.event == "disconnect":
            self.disconnects.add(event.session or "")
        elif event.event == "data":
            parsed = parse(event.body)
            if parsed is not None:
                (self.redelivered if event.redelivered else self.data).append(
                    (event.session or "", *parsed)
                )
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return [Reply(event.body)]
        return []


class ChaosClient:
    """A client with an id that keeps ``window`` messages unanswered, reconnects with its
    ``client_id`` after any failure and resends every unanswered message (a new attempt),
    also on a live connection when an answer is ``resend_after_s`` late. With ``rate`` it
    sends open-loop at that many messages per second instead."""

    def __init__(
        self,
        cid: str,
        port: Callable[[], int],
        *,
        window: int = 4,
        size: int = 128,
        rate: float | None = None,
        resend_after_s: float = 10.0,
        token: str | None = None,
        seed: int = 0,
    ) -> None:
        self.cid = cid
        self.port = port
        self.window = window
        self.size = size
        self.rate = rate
        self.resend_after_s = resend_after_s
        self.token = token
        self.rng = random.Random(seed)
        self.sending = True
        self.next_seq = 0
        self.attempts = 0
        self.unanswered: dict[int, tuple[int, float]] = {}  # seq -> (attempt, sent at)
        self.answered: set[int] = set()
        self.reason: dict[tuple[int, int], str] = {}  # (seq, attempt) -> why it was sent
        self.sends: dict[str, list[tuple[int, int]]] = {}  # session -> (seq, attempt) sent
        self.rtts: list[tuple[float, float]] = []  # (answered at, round trip)
        self.duplicate_replies = 0
        self.closes: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.sessions = 0
        self.sticky_same = 0
        self.sticky_moved = 0
        self.timeout_resends = 0
        self._server: str | None = None
        self._next_at = 0.0

    @property
    def done(self) -> bool:
        return not self.sending and not self.unanswered

    async def run(self) -> None:
        while not self.done:
            try:
                client = await GatewayClient.connect(
                    "127.0.0.1", self.port(), client_id=self.cid, token=self.token, timeout=5
                )
            except GatewayError as exc:
                self.connect_failures[exc.code] += 1
            except (OSError, TimeoutError) as exc:
                self.connect_failures[type(exc).__name__] += 1
            else:
                try:
                    await self._session(client)
                except (ConnectionError, OSError, RuntimeError):  # uvloop: "handler is closed"
                    self.closes["reset"] += 1
                finally:
                    client.close()
                if self.done:
                    return
            await asyncio.sleep(self.rng.uniform(0.02, 0.2))

    async def _session(self, client: GatewayClient) -> None:
        self.sessions += 1
        if self._server is not None:
            if client.server == self._server:
                self.sticky_same += 1
            else:
                self.sticky_moved += 1
        self._server = client.server
        sends = self.sends.setdefault(client.session, [])
        for seq in sorted(self.unanswered):
            self._send(client, sends, seq, "reconnect")
        self._next_at = max(self._next_at, time.monotonic())
        while True:
            now = time.monotonic()
            while self.sending and len(self.unanswered) < self.window:
                if self.rate is not None:
                    if now < self._next_at:
                        break
                    self._next_at += 1.0 / self.rate
                self.next_seq += 1  # first: a write that raises must not reuse the number
                self._send(client, sends, self.next_seq - 1, "first")
            for seq, (_, sent_at) in list(self.unanswered.items()):
                if now - sent_at > self.resend_after_s:
                    self.timeout_resends += 1
                    self._send(client, sends, seq, "timeout")
            await client.writer.drain()
            if self.done:
                await client.bye()
                self.closes["client_bye"] += 1
                return
            wait = 0.5 if self.rate is None else max(0.001, min(0.5, self._next_at - now))
            try:
                frame = await asyncio.wait_for(client.next_frame(), wait)
            except TimeoutError:
                continue
            if frame is None:
                self.closes["eof"] += 1
                return
            if frame.type is FrameType.DATA:
                self._answer(frame.payload)
            elif frame.type is FrameType.ERROR:
                self.closes[json.loads(frame.payload).get("code", "?")] += 1
                return
            elif frame.type is FrameType.BYE:
                self.closes["bye"] += 1
                return

    def _send(
        self, client: GatewayClient, sends: list[tuple[int, int]], seq: int, why: str
    ) -> None:
        attempt = self.unanswered[seq][0] + 1 if seq in self.unanswered else 0
        self.unanswered[seq] = (attempt, time.monotonic())
        self.reason[(seq, attempt)] = why
        sends.append((seq, attempt))
        self.attempts += 1
        client.writer.write(encode_data(message(self.cid, seq, attempt, self.size)))

    def _answer(self, body: bytes) -> None:
        parsed = parse(body)
        if parsed is None or parsed[0] != self.cid:
            self.duplicate_replies += 1  # never expected: count rather than crash
            return
        _, seq, _ = parsed
        pending = self.unanswered.pop(seq, None)
        if pending is None:
            self.duplicate_replies += 1
            return
        now = time.monotonic()
        self.answered.add(seq)
        self.rtts.append((now, now - pending[1]))


def analyse(clients: list[ChaosClient], ledger: ServerLedger) -> dict[str, Any]:
    """The ledger: what was sent, acknowledged, delivered, lost, duplicated, reordered."""
    by_client = {c.cid: c for c in clients}
    received_ids: Counter[tuple[str, int]] = Counter()
    received_attempts: Counter[tuple[str, int, int]] = Counter()
    per_session: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for session, cid, seq, attempt in ledger.data:
        if cid not in by_client:
            continue
        received_ids[(cid, seq)] += 1
        received_attempts[(cid, seq, attempt)] += 1
        per_session[session].append((seq, attempt))
    reasons: Counter[str] = Counter()
    reasons["gateway_duplicate"] = sum(n - 1 for n in received_attempts.values() if n > 1)
    for (cid, seq), count in received_ids.items():
        if count > 1:
            attempts = sorted(a for c, s, a in received_attempts if c == cid and s == seq)
            for attempt in attempts[1:]:
                why = by_client[cid].reason.get((seq, attempt), "?")
                reasons[f"client_resend_after_{why}"] += 1
    redelivered = [x for x in ledger.redelivered if x[1] in by_client]
    if redelivered:
        reasons["broker_redelivered_to_server"] = len(redelivered)
    sent = sum(c.next_seq for c in clients)
    acknowledged = sum(len(c.answered) for c in clients)
    attempts = sum(c.attempts for c in clients)
    # A message the broker handed to the server once before (redelivered) may arrive only
    # flagged as redelivered, and after later ones: order is judged on first deliveries,
    # completeness (a prefix, no hole) on everything the server received.
    again: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for session, _, seq, attempt in ledger.redelivered:
        again[session].add((seq, attempt))
    violations = gaps = 0
    for client in clients:
        for session, sent_list in client.sends.items():
            got = per_session.get(session, [])
            positions = {item: i for i, item in enumerate(sent_list)}
            order = [positions.get(item, -1) for item in got]
            if -1 in order or order != sorted(order):
                violations += 1
            received = set(got) | again.get(session, set())
            if received != set(sent_list[: len(received)]):
                gaps += 1
    return {
        "sent": sent,
        "acknowledged": acknowledged,
        "delivered": len(received_ids),
        "lost": sent - acknowledged,
        "duplicated": {
            "count": sum(1 for v in received_ids.values() if v > 1) + len(redelivered),
            "reasons": dict(reasons),
        },
        "attempts": attempts,
        "attempts_lost_in_flight": attempts - len(received_attempts),
        "duplicate_replies_to_clients": sum(c.duplicate_replies for c in clients),
        "timeout_resends": sum(c.timeout_resends for c in clients),
        "sessions": {
            "opened": sum(c.sessions for c in clients),
            "reconnects": sum(max(0, c.sessions - 1) for c in clients),
            "closed_by": dict(sum((c.closes for c in clients), Counter())),
            "connect_failures": dict(sum((c.connect_failures for c in clients), Counter())),
            "sticky_same_server": sum(c.sticky_same for c in clients),
            "sticky_moved": sum(c.sticky_moved for c in clients),
            "order_violations": violations,
            "gaps": gaps,
            "without_disconnect_event": len(ledger.connects - ledger.disconnects),
        },
    }


# -- shared infrastructure -----------------------------------------------------------------
