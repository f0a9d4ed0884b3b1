"""One live connection per proven client_id across replicas (workers/gateway/auth.py,
Authenticator.claim / claimed_elsewhere; workers/gateway/peer_messages.py parse_claim):
the order of two claims is the same on every replica, so of two connections exactly one
survives, and a claim message is checked before it is acted on."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from workers.gateway.auth import Authenticator
from workers.gateway.config import GatewaySettings, Listener
from workers.gateway.peer_messages import PeerMessageError, parse_claim
from workers.gateway.states import State


@dataclass
class _Client:
    sid: str
    client_id: str | None = "alice"
    hint: str | None = None
    proof: str = "token"
    peer: str = "127.0.0.1:1"
    listener: Listener = field(default_factory=lambda: Listener(port=0))
    transport: None = None
    state: State = State.JOINING
    errors: list[str] = field(default_factory=list)

    def fail(self, code: str, message: str) -> None:
        self.errors.append(code)
        self.state = State.CLOSING


class _Replica:
    """One replica's authenticator, its announcements collected."""

    def __init__(self, instance: str) -> None:
        self.registry = CollectorRegistry()
        self.auth = Authenticator(GatewaySettings(instance=instance), self.registry)
        self.said: list[tuple[str, str, int]] = []
        self.auth.announce = lambda *claim: self.said.append(claim)
        self.instance = instance

    def replaced(self) -> float:
        return self.registry.get_sample_value("bridge_gateway_replaced_total") or 0.0


def _admit(replica: _Replica, client: _Client, at_ms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workers.gateway.auth.time.time", lambda: at_ms / 1000)
    replica.auth.claim(client)  # type: ignore[arg-type]


@pytest.mark.parametrize(("at_a", "at_b"), [(1000, 2000), (2000, 1000), (1500, 1500)])
def test_of_two_claims_on_two_replicas_exactly_one_survives(monkeypatch, at_a, at_b):
    a, b = _Replica("gw-a"), _Replica("gw-b")
    on_a, on_b = _Client("sa"), _Client("sb")
    _admit(a, on_a, at_a, monkeypatch)
    _admit(b, on_b, at_b, monkeypatch)
    assert a.said == [("alice", "sa", at_a)] and b.said == [("alice", "sb", at_b)]
    # each hears the other's claim (in any order); an answer goes back once
    a.auth.claimed_elsewhere("alice", at_b, "gw-b")
    b.auth.claimed_elsewhere("alice", at_a, "gw-a")
    for answer in a.said[1:]:
        b.auth.claimed_elsewhere(answer[0], answer[2], "gw-a")
    for answer in b.said[1:]:
        a.auth.claimed_elsewhere(answer[0], answer[2], "gw-b")
    a_wins = (at_a, "gw-a") > (at_b, "gw-b")
    assert (on_a.errors, on_b.errors) == (([], ["replaced"]) if a_wins else (["replaced"], []))
    assert (a.replaced(), b.replaced()) == ((0, 1) if a_wins else (1, 0))


def test_an_older_claim_is_answered_and_a_hint_claims_nothing(monkeypatch):
    a = _Replica("gw-a")
    mine = _Client("sa")
    _admit(a, mine, 5000, monkeypatch)
    a.auth.claimed_elsewhere("alice", 4000, "gw-b")  # older: ours stays, and we say so again
    assert mine.errors == [] and a.said[-1] == ("alice", "sa", 5000)
    a.auth.claimed_elsewhere("bob", 9000, "gw-b")  # another id: nothing here
    assert mine.errors == []
    hint = _Client("sh", client_id=None, hint="alice", proof="none")
    _admit(a, hint, 6000, monkeypatch)
    assert mine.errors == [] and len(a.said) == 2
    # a newer local connection wins even if the wall clock went back
    newer = _Client("sn")
    _admit(a, newer, 100, monkeypatch)
    assert mine.errors == ["replaced"] and a.said[-1] == ("alice", "sn", 5001)
    a.auth.release(mine)  # the replaced one going does not free the newer one's claim
    a.auth.claimed_elsewhere("alice", 5000, "gw-b")
    assert newer.errors == []
    a.auth.claimed_elsewhere("alice", 5002, "gw-b")
    assert newer.errors == ["replaced"]


@pytest.mark.parametrize(
    "doc",
    [
        {"session": "s", "at": 1},
        {"client_id": "", "session": "s", "at": 1},
        {"client_id": "x", "at": 1},
        {"client_id": "x", "session": "s" * 65, "at": 1},
        {"client_id": "x", "session": "s", "at": 1.5},
        {"client_id": "x", "session": "s", "at": True},
        {"client_id": "x", "session": "s", "at": -1},
    ],
)
def test_a_malformed_claim_is_refused(doc):
    with pytest.raises(PeerMessageError):
        parse_claim(doc)
    assert parse_claim({"client_id": "x", "session": "s", "at": 7}) == ("x", "s", 7)
