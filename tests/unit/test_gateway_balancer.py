"""Gateway server registry and association records (no I/O, time passed in)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from workers.gateway.balancer import Balancer

TTL = 10.0
RETENTION = 30.0


def make(*servers: str, now: float = 0.0) -> Balancer:
    b = Balancer(server_ttl_s=TTL, sticky_retention_s=RETENTION)
    for server in servers:
        assert b.register(server, now)
    return b


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("events", "alive"),
    [
        pytest.param([("register", "a", 0)], ["a"], id="register"),
        pytest.param([("heartbeat", "a", 0)], ["a"], id="heartbeat-unknown-registers"),
        pytest.param([("register", "a", 0), ("deregister", "a", 1)], [], id="deregister"),
        pytest.param([("deregister", "zz", 0)], [], id="deregister-unknown"),
        pytest.param(
            [("register", "a", 0), ("deregister", "a", 1), ("heartbeat", "a", 2)],
            ["a"],
            id="heartbeat-after-deregister-revives",
        ),
        pytest.param([("register", "a", 0), ("expire", "", 10)], ["a"], id="ttl-boundary"),
        pytest.param([("register", "a", 0), ("expire", "", 10.5)], [], id="expired"),
        pytest.param(
            [("register", "a", 0), ("heartbeat", "a", 8), ("expire", "", 15)],
            ["a"],
            id="heartbeat-extends",
        ),
        pytest.param(
            [("register", "a", 0), ("expire", "", 11), ("heartbeat", "a", 12)],
            ["a"],
            id="heartbeat-after-expiry-revives",
        ),
        pytest.param(
            [("register", "b", 0), ("register", "a", 5), ("expire", "", 12)],
            ["a"],
            id="expire-only-stale",
        ),
    ],
)
def test_registry_table(events: list[tuple[str, str, float]], alive: list[str]) -> None:
    b = make()
    for op, server, now in events:
        if op == "expire":
            b.expire(now)
        else:
            getattr(b, op)(server, now)
    assert b.alive() == alive
    assert all(b.is_alive(s) for s in alive)


@pytest.mark.parametrize(
    ("setup", "op", "expected"),
    [
        pytest.param([], "register", True, id="register-new"),
        pytest.param([], "heartbeat", True, id="heartbeat-new"),
        pytest.param(["register"], "register", False, id="register-alive"),
        pytest.param(["register"], "heartbeat", False, id="heartbeat-alive"),
        pytest.param(["register", "deregister"], "register", True, id="register-deregistered"),
        pytest.param(["register", "deregister"], "heartbeat", True, id="heartbeat-deregistered"),
        pytest.param(["register", "expire"], "register", True, id="register-expired"),
        pytest.param(["register", "expire"], "heartbeat", True, id="heartbeat-expired"),
    ],
)
def test_newly_alive(setup: list[str], op: str, expected: bool) -> None:
    b = make()
    for step in setup:
        if step == "expire":
            assert b.expire(100.0) == ["a"]
        else:
            getattr(b, step)("a", 0.0)
    assert getattr(b, op)("a", 200.0) is expected


def test_expire_reports_each_server_once() -> None:
    b = make("a", "b", "c")
    b.heartbeat("c", 9)
    assert b.expire(11) == ["a", "b"]
    assert b.expire(12) == []
    assert b.alive() == ["c"]


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        Balancer(server_ttl_s=0, sticky_retention_s=1)
    with pytest.raises(ValueError):
        Balancer(server_ttl_s=1, sticky_retention_s=-1)


# ----------------------------------------------------------------------------- assign / release


def test_no_server_alive() -> None:
    b = make()
    assert b.assign("c1", None, 0) is None
    assert b.server_of("c1") is None
    assert b.counts() == {}


def test_least_loaded() -> None:
    b = make("a", "b", "c")
    assert [b.assign(f"x{i}", None, 1) for i in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert b.counts() == {"a": 2, "b": 2, "c": 2}
    b.release("x0", 2)
    b.release("x3", 2)
    assert b.assign("y1", None, 3) == "a"
    assert b.assign("y2", None, 3) == "a"
    # Tied again: the server picked longest ago goes next.
    assert b.assign("y3", None, 3) == "b"


def test_ties_rotate() -> None:
    b = make("a", "b", "c")
    picks = []
    for i in range(9):
        picks.append(b.assign(f"c{i}", None, 1))
        b.release(f"c{i}", 1)
    # Short-lived connections must not all land on the lexicographically first server.
    assert Counter(picks) == {"a": 3, "b": 3, "c": 3}
    assert picks[:3] == ["a", "b", "c"]


def test_new_server_takes_new_clients_first() -> None:
    b = make("a")
    for i in range(3):
        assert b.assign(f"c{i}", None, 0) == "a"
    b.register("b", 1)
    assert [b.assign(f"d{i}", None, 2) for i in range(3)] == ["b", "b", "b"]
    assert b.assign("e", None, 2) == "a"


def test_assign_duplicate_conn_key() -> None:
    b = make("a")
    b.assign("c1", None, 0)
    with pytest.raises(ValueError):
        b.assign("c1", None, 0)
    assert b.counts() == {"a": 1}


def test_release() -> None:
    b = make("a")
    assert b.assign("c1", None, 0) == "a"
    assert b.server_of("c1") == "a"
    assert b.release("c1", 1) == "a"
    assert b.release("c1", 1) is None
    assert b.release("never", 1) is None
    assert b.server_of("c1") is None
    assert b.counts() == {"a": 0}


def test_conn_key_reusable_after_release() -> None:
    b = make("a")
    b.assign("c1", None, 0)
    b.release("c1", 0)
    assert b.assign("c1", None, 0) == "a"


def test_assign_skips_silent_server_before_expire_runs() -> None:
    b = make("a")
    b.register("b", 5)
    assert b.assign("c1", None, 12) == "b"  # "a" is past its TTL though still marked alive
    assert b.assign("c2", None, 16) is None


@pytest.mark.parametrize("leave", ["deregister", "expire"])
def test_leaving_server_keeps_clients_until_released(leave: str) -> None:
    b = make("a", "b")
    b.assign("c1", None, 0)
    b.assign("c2", None, 0)
    owner = b.server_of("c1")
    assert owner is not None
    other = "b" if owner == "a" else "a"
    b.heartbeat(other, 9)
    if leave == "deregister":
        b.deregister(owner, 1)
    else:
        assert b.expire(11) == [owner]
    assert b.alive() == [other]
    assert b.counts() == {"a": 1, "b": 1}
    assert b.connections_of(owner) == ["c1"]
    assert all(b.assign(f"n{i}", None, 11) == other for i in range(3))
    assert b.release("c1", 12) == owner
    # The record of a server that takes no clients and has none left is dropped.
    assert owner not in b.counts()
    assert owner not in b.snapshot(12)["servers"]


# ----------------------------------------------------------------------------- sticky

STICKY_CASES = [
    # (gap after release, what happened to the old server, expect same server)
    pytest.param(0.0, None, True, id="immediate"),
    pytest.param(RETENTION, None, True, id="at-retention"),
    pytest.param(RETENTION + 0.1, None, False, id="after-retention"),
    pytest.param(1.0, "deregister", False, id="server-deregistered"),
    pytest.param(1.0, "expire", False, id="server-expired"),
]


@pytest.mark.parametrize(("gap", "event", "same"), STICKY_CASES)
def test_sticky_reconnect(gap: float, event: str | None, same: bool) -> None:
    b = make("a", "b")
    assert b.assign("c1", "client-x", 0) == "a"
    assert b.release("c1", 1) == "a"
    now = 1 + gap
    b.heartbeat("a", now)
    b.heartbeat("b", now)
    b.set_remote_counts("gw-2", {"a": 10}, now)  # so least-loaded alone would pick "b"
    if event == "deregister":
        b.deregister("a", now)
    elif event == "expire":
        b.heartbeat("b", now + TTL)
        now += TTL + 0.5
        assert b.expire(now) == ["a"]
    assert b.assign("c2", "client-x", now) == ("a" if same else "b")


def test_sticky_while_previous_connection_still_open() -> None:
    # A client that reconnects before the gateway noticed its old socket die.
    b = make("a", "b")
    assert b.assign("old", "client-x", 0) == "a"
    b.assign("o1", None, 0)
    b.assign("o2", None, 0)
    assert b.counts() == {"a": 2, "b": 1}
    assert b.assign("new", "client-x", 5) == "a"
    assert b.release("old", 6) == "a"
    assert b.release("new", 7) == "a"
    assert b.assign("again", "client-x", 8) == "a"


def test_sticky_follows_latest_assignment() -> None:
    b = make("a", "b")
    b.assign("c1", "x", 0)
    assert b.server_of("c1") == "a"
    b.deregister("a", 1)
    assert b.assign("c2", "x", 1) == "b"
    b.release("c1", 2)
    b.release("c2", 2)
    b.register("a", 3)
    b.assign("f1", None, 3)  # lands on "a" (emptiest)
    assert b.assign("c3", "x", 4) == "b"


def test_sticky_table_is_pruned() -> None:
    b = make("a")
    for i in range(1000):
        b.assign(f"c{i}", f"client-{i}", 0)
        b.release(f"c{i}", 0)
    assert b.snapshot(0)["sticky_entries"] == 1000
    b.heartbeat("a", RETENTION + 1)
    b.assign("late", "someone", RETENTION + 1)
    snap = b.snapshot(RETENTION + 1)
    assert snap["sticky_entries"] == 1  # only the live "someone"
    b.release("late", RETENTION + 2)
    b.expire(3 * RETENTION)
    assert b.snapshot(3 * RETENTION)["sticky_entries"] == 0


def test_no_client_id_is_never_sticky() -> None:
    b = make("a", "b")
    assert b.assign("c1", None, 0) == "a"
    b.release("c1", 0)
    assert b.assign("c2", None, 0) == "b"


# ----------------------------------------------------------------------------- replicas


def test_remote_counts_steer_choice() -> None:
    b = make("a", "b")
    b.set_remote_counts("gw-2", {"a": 5, "b": 1, "gone": 3}, 0)
    assert [b.assign(f"c{i}", None, 1) for i in range(5)] == ["b", "b", "b", "b", "a"]
    assert b.counts() == {"a": 1, "b": 4}  # counts() is this replica's own clients only


def test_remote_counts_replaced_and_expired() -> None:
    b = make("a", "b")
    b.set_remote_counts("gw-2", {"a": 5}, 0)
    b.set_remote_counts("gw-2", {"b": 5}, 1)  # a newer report replaces the old one
    assert b.assign("c1", None, 1) == "a"
    b.set_remote_counts("gw-3", {"a": 9}, 1)
    for s in ("a", "b"):
        b.heartbeat(s, 12)
    # Both replicas silent for longer than the TTL: their counts no longer matter.
    assert b.assign("c2", None, 12) == "b"
    assert b.snapshot(12)["replicas"] == {}


def test_remote_counts_never_negative() -> None:
    b = make("a", "b")
    b.set_remote_counts("gw-2", {"a": -50}, 0)
    assert b.snapshot(0)["servers"]["a"]["remote_clients"] == 0


# ----------------------------------------------------------------------------- snapshot


def test_snapshot_is_json() -> None:
    b = make("a", "b")
    b.assign("c1", "x", 1)
    b.set_remote_counts("gw-2", {"a": 2}, 2)
    b.deregister("a", 3)
    snap = b.snapshot(4.5)
    assert json.loads(json.dumps(snap)) == snap
    assert snap["servers"]["a"] == {
        "state": "deregistered",
        "alive": False,
        "last_heartbeat_age_s": 4.5,
        "clients": 1,
        "remote_clients": 2,
    }
    assert snap["servers"]["b"]["alive"] is True
    assert snap["associations"] == 1
    assert snap["sticky_entries"] == 1
    assert snap["replicas"] == {"gw-2": {"age_s": 2.5, "clients": 2}}


# ----------------------------------------------------------------------------- state machine

SERVERS = ["s0", "s1", "s2", "s3"]
CLIENT_IDS = [None, "k0", "k1", "k2"]


class BalancerMachine(RuleBasedStateMachine):
    """Random registry events, clock moves and connections against a plain model."""

    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.b = Balancer(server_ttl_s=TTL, sticky_retention_s=RETENTION)
        self.now = 0.0
        self.next_conn = 0
        # Model.
        self.state: dict[str, str] = {}  # server -> alive/deregistered/expired
        self.seen: dict[str, float] = {}
        self.owner: dict[str, str] = {}  # live conn -> server
        self.conn_client: dict[str, str | None] = {}
        self.last_server: dict[str, str] = {}  # client_id -> latest assignment
        self.released_at: dict[str, float] = {}
        self.remote: dict[str, int] = {}
        self.remote_seen = 0.0

    def eligible(self) -> list[str]:
        return [
            s for s, st_ in self.state.items() if st_ == "alive" and self.now - self.seen[s] <= TTL
        ]

    def live_of_client(self, client_id: str) -> int:
        return sum(1 for c in self.owner if self.conn_client[c] == client_id)

    @rule(server=st.sampled_from(SERVERS), beat=st.booleans())
    def register(self, server: str, beat: bool) -> None:
        was_alive = self.state.get(server) == "alive"
        result = (self.b.heartbeat if beat else self.b.register)(server, self.now)
        assert result is (not was_alive)
        self.state[server] = "alive"
        self.seen[server] = self.now

    @rule(server=st.sampled_from(SERVERS))
    def deregister(self, server: str) -> None:
        self.b.deregister(server, self.now)
        if server in self.state:
            self.state[server] = "deregistered"

    @rule()
    def expire(self) -> None:
        expected = sorted(
            s for s, st_ in self.state.items() if st_ == "alive" and self.now - self.seen[s] > TTL
        )
        assert self.b.expire(self.now) == expected
        for s in expected:
            self.state[s] = "expired"

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, TTL, TTL + 1, RETENTION + 1]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(counts=st.dictionaries(st.sampled_from(SERVERS), st.integers(0, 5), max_size=4))
    def remote_counts(self, counts: dict[str, int]) -> None:
        self.b.set_remote_counts("gw-2", counts, self.now)
        self.remote = dict(counts)
        self.remote_seen = self.now

    @rule(target=conns, client_id=st.sampled_from(CLIENT_IDS))
    def assign(self, client_id: str | None) -> str:
        conn = f"c{self.next_conn}"
        self.next_conn += 1
        eligible = self.eligible()
        remote = self.remote if self.now - self.remote_seen <= TTL else {}
        load = {
            s: sum(1 for o in self.owner.values() if o == s) + remote.get(s, 0) for s in eligible
        }
        sticky: str | None = None
        if client_id is not None and client_id in self.last_server:
            recent = (
                self.live_of_client(client_id) > 0
                or self.now - self.released_at[client_id] <= RETENTION
            )
            if recent and self.last_server[client_id] in eligible:
                sticky = self.last_server[client_id]

        chosen = self.b.assign(conn, client_id, self.now)

        if not eligible:
            assert chosen is None
            return conn  # not associated; releasing it later must return None
        assert chosen in eligible
        assert self.b.is_alive(chosen)
        if sticky is not None:
            assert chosen == sticky
        else:
            assert load[chosen] == min(load.values())
        self.owner[conn] = chosen
        self.conn_client[conn] = client_id
        if client_id is not None:
            self.last_server[client_id] = chosen
        return conn

    @rule(conn=consumes(conns))
    def release(self, conn: str) -> None:
        expected = self.owner.pop(conn, None)
        assert self.b.release(conn, self.now) == expected
        client_id = self.conn_client.pop(conn, None)
        if client_id is not None and self.live_of_client(client_id) == 0:
            self.released_at[client_id] = self.now

    @precondition(lambda self: bool(self.owner))
    @rule(data=st.data())
    def duplicate_assign_rejected(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.owner)))
        before = self.b.counts()
        try:
            self.b.assign(conn, None, self.now)
        except ValueError:
            pass
        else:
            raise AssertionError("assigning a live conn_key must raise")
        assert self.b.counts() == before

    @invariant()
    def each_connection_has_exactly_its_server(self) -> None:
        for conn, server in self.owner.items():
            assert self.b.server_of(conn) == server
            assert conn in self.b.connections_of(server)
        total = sum(len(self.b.connections_of(s)) for s in self.b.counts())
        assert total == len(self.owner)

    @invariant()
    def counts_match_live_connections(self) -> None:
        counts = self.b.counts()
        expected = Counter(self.owner.values())
        assert all(n >= 0 for n in counts.values())
        assert {s: n for s, n in counts.items() if n} == dict(expected)
        # Every alive server is listed; not-alive ones only while they still have clients.
        listed = {s for s, st_ in self.state.items() if st_ == "alive"} | set(expected)
        assert set(counts) == listed
        assert self.b.snapshot(self.now)["associations"] == len(self.owner)

    @invariant()
    def registry_matches(self) -> None:
        assert self.b.alive() == sorted(s for s, st_ in self.state.items() if st_ == "alive")


BalancerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_balancer_state_machine = BalancerMachine.TestCase
