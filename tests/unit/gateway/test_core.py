"""Gateway server registry and association records (no I/O, time passed in)."""

from __future__ import annotations

import json
import random
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

from workers.gateway.core import Balancer

TTL = 10.0
RETENTION = 30.0


class FirstChoice(random.Random):
    """Breaks the remaining ties by id, so expected picks can be written down."""

    def choice(self, seq):  # type: ignore[no-untyped-def, override]
        return seq[0]


def make(*servers: str, now: float = 0.0, **kwargs: object) -> Balancer:
    kwargs.setdefault("rng", FirstChoice())
    b = Balancer(server_ttl_s=TTL, sticky_retention_s=RETENTION, **kwargs)  # type: ignore[arg-type]
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
    b = make("a", "b", herd_estimate=False)
    b.set_remote_counts("gw-2", {"a": 5, "b": 1, "gone": 3}, 0)
    assert [b.assign(f"c{i}", None, 1) for i in range(5)] == ["b", "b", "b", "b", "a"]
    assert b.counts() == {"a": 1, "b": 4}  # counts() is this replica's own clients only
    assert b.global_counts(1) == {"a": 6, "b": 5, "gone": 3}


def test_herd_estimate_counts_own_assignments_once_per_other_replica() -> None:
    b = make("a", "b")
    b.set_remote_counts("gw-2", {"a": 5, "b": 1}, 0)
    b.set_remote_counts("gw-3", {"a": 5, "b": 1}, 0)
    # Each assignment here is assumed to be mirrored by both other replicas until they report.
    assert b.assign("c0", None, 1) == "b"
    assert b.global_counts(1) == {"a": 10, "b": 5}
    assert b.assign("c1", None, 1) == "b"
    assert b.global_counts(1) == {"a": 10, "b": 8}
    assert b.assign("c2", None, 1) == "b"
    assert b.global_counts(1) == {"a": 10, "b": 11}
    assert b.assign("c3", None, 1) == "a"
    # gw-2 reports what it really did: its estimate is replaced by the report.
    b.set_remote_counts("gw-2", {"a": 5, "b": 1}, 2)
    assert b.global_counts(2) == {"a": 5 + 5 + 1 + 1, "b": 1 + 1 + 3 + 3}
    assert b.snapshot(2)["replicas"]["gw-3"]["assigned_here_since"] == 4
    assert b.snapshot(2)["replicas"]["gw-2"]["assigned_here_since"] == 0


def test_forget_replica() -> None:
    b = make("a", "b")
    b.set_remote_counts("gw-2", {"a": 5}, 0)
    assert b.replicas(0) == ["gw-2"]
    b.forget_replica("gw-2")
    b.forget_replica("never-heard-of")
    assert b.replicas(0) == []
    assert b.global_counts(0) == {"a": 0, "b": 0}


def test_replica_ttl_separate_from_server_ttl() -> None:
    b = make("a", "b", replica_ttl_s=2.0)
    b.set_remote_counts("gw-2", {"a": 5}, 0)
    assert b.replicas(2.0) == ["gw-2"]
    assert b.replicas(2.5) == []  # killed -9: its clients leave the global view
    assert b.global_counts(2.5) == {"a": 0, "b": 0}


def test_first_ties_are_random_across_replicas() -> None:
    # Fresh replicas (default rng) must not all send their first client to the same server.
    firsts: Counter[str | None] = Counter()
    for _ in range(300):
        b = Balancer(server_ttl_s=TTL, sticky_retention_s=RETENTION)
        for server in ("a", "b", "c"):
            b.register(server, 0)
        firsts[b.assign("c0", None, 0)] += 1
    assert set(firsts) == {"a", "b", "c"}


def simulate(
    *, replicas: int, delay: int, report_every: int, herd_estimate: bool, steps: int = 300
) -> tuple[dict[str, int], int]:
    """Replicas behind a round-robin load balancer, one new client per step. Servers "a" and
    "b" hold 100 older clients each (reported by a replica "old"); "n" has just joined.
    Each replica reports every ``report_every`` steps and a report arrives ``delay`` steps
    after it was sent ("old", which takes no new clients, reports at every step). Returns the final totals and the worst overshoot of "n" above the
    busier of the other two at any step (a herd shows as a large overshoot)."""
    names = [f"gw-{i}" for i in range(replicas)]
    bal = {
        r: Balancer(
            server_ttl_s=1e9,
            sticky_retention_s=0,
            replica_ttl_s=1e9,
            herd_estimate=herd_estimate,
            rng=random.Random(i),
        )
        for i, r in enumerate(names)
    }
    base = {"a": 100, "b": 100}
    for b in bal.values():
        for server in ("a", "b", "n"):
            b.register(server, 0)
        b.set_remote_counts("old", base, 0)
    in_transit: list[tuple[int, str, dict[str, int], int]] = []
    worst = 0
    total: Counter[str] = Counter()
    for step in range(1, steps + 1):
        for b in bal.values():
            b.set_remote_counts("old", base, step)
        for message in [m for m in in_transit if m[0] <= step]:
            in_transit.remove(message)
            _, sender, counts, sent = message
            for r in names:
                if r != sender:
                    bal[r].set_remote_counts(sender, counts, step, sent_at=sent)
        bal[names[step % replicas]].assign(f"c{step}", None, step)
        if step % report_every == 0:
            for name in names:
                in_transit.append((step + delay, name, bal[name].counts(), step))
        total = Counter(base)
        for b in bal.values():
            total.update(b.counts())
        worst = max(worst, total["n"] - max(total["a"], total["b"]))
    return dict(total), worst


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize(("delay", "report_every"), [(10, 1), (30, 1), (3, 20), (10, 10)])
def test_herd_estimate_limits_overshoot_on_a_new_server(
    replicas: int, delay: int, report_every: int
) -> None:
    damped, damped_worst = simulate(
        replicas=replicas, delay=delay, report_every=report_every, herd_estimate=True
    )
    herd, herd_worst = simulate(
        replicas=replicas, delay=delay, report_every=report_every, herd_estimate=False
    )
    assert sum(damped.values()) == sum(herd.values()) == 500
    # 500 clients over 3 servers: 166-167 each; the new server never runs more than 3
    # ahead, however stale the reports; without the estimate it overshoots further.
    assert max(damped.values()) - min(damped.values()) <= 3, damped
    assert damped_worst <= 3
    assert damped_worst <= herd_worst
    if delay * replicas >= 30:
        assert herd_worst > damped_worst + 3, (herd_worst, damped_worst)


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
    assert snap["replicas"] == {"gw-2": {"age_s": 2.5, "clients": 2, "assigned_here_since": 0}}
    assert snap["global_clients"] == {"a": 3, "b": 0}


# ----------------------------------------------------------------------------- state machine

SERVERS = ["s0", "s1", "s2", "s3"]
CLIENT_IDS = [None, "k0", "k1", "k2"]
REPLICAS = ["gw-2", "gw-3"]


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
        self.updated: dict[str, float] = {}  # client_id -> when its server was chosen
        # Other replicas: name -> (reported counts, when received, own assignments since).
        self.remotes: dict[str, tuple[dict[str, int], float, Counter[str]]] = {}
        self.assign_log: list[tuple[float, str]] = []

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

    def fresh_remotes(self) -> dict[str, tuple[dict[str, int], float, Counter[str]]]:
        self.remotes = {r: v for r, v in self.remotes.items() if self.now - v[1] <= TTL}
        return self.remotes

    @rule(
        replica=st.sampled_from(REPLICAS),
        counts=st.dictionaries(st.sampled_from(SERVERS), st.integers(0, 5), max_size=4),
        lag=st.sampled_from([0.0, 0.5, 3.0]),
    )
    def remote_counts(self, replica: str, counts: dict[str, int], lag: float) -> None:
        sent = self.now - lag
        self.b.set_remote_counts(replica, counts, self.now, sent_at=sent)
        since = Counter(s for t, s in self.assign_log if t > sent and self.now - t <= TTL)
        self.remotes[replica] = (dict(counts), self.now, since)

    @rule(replica=st.sampled_from(REPLICAS))
    def forget_replica(self, replica: str) -> None:
        self.b.forget_replica(replica)
        self.remotes.pop(replica, None)

    def sticky_known(self, client_id: str) -> bool:
        if client_id not in self.last_server:
            return False
        return (
            self.live_of_client(client_id) > 0
            or self.now - self.released_at[client_id] <= RETENTION
        )

    @rule(
        client_id=st.sampled_from(CLIENT_IDS[1:]),
        server=st.sampled_from(SERVERS),
        age=st.sampled_from([0.0, 1.0, 3.0, RETENTION + 1]),
    )
    def learn_sticky(self, client_id: str, server: str, age: float) -> None:
        at = self.now - age
        applied = self.b.learn_sticky(client_id, server, at, self.now)
        if age > RETENTION:
            assert not applied
            return
        if not self.sticky_known(client_id):
            assert applied
            self.last_server[client_id] = server
            self.updated[client_id] = self.released_at[client_id] = at
            return
        if at < self.updated[client_id]:
            assert not applied
            return
        assert applied
        self.last_server[client_id] = server
        self.updated[client_id] = at
        if self.live_of_client(client_id) == 0:
            self.released_at[client_id] = max(self.released_at[client_id], at)

    @rule(target=conns, client_id=st.sampled_from(CLIENT_IDS))
    def assign(self, client_id: str | None) -> str:
        conn = f"c{self.next_conn}"
        self.next_conn += 1
        eligible = self.eligible()
        remotes = self.fresh_remotes()
        # The global view: own live clients + each fresh replica's report + own
        # assignments made after that report was sent.
        load = {
            s: sum(1 for o in self.owner.values() if o == s)
            + sum(counts.get(s, 0) + since[s] for counts, _, since in remotes.values())
            for s in eligible
        }
        sticky: str | None = None
        if client_id is not None and self.sticky_known(client_id):
            if self.last_server[client_id] in eligible:
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
        self.assign_log.append((self.now, chosen))
        for _, _, since in remotes.values():
            since[chosen] += 1
        if client_id is not None:
            self.last_server[client_id] = chosen
            self.updated[client_id] = self.now
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
    def global_view_matches(self) -> None:
        remotes = self.fresh_remotes()
        expected = Counter(self.owner.values())
        for counts, _, since in remotes.values():
            expected.update(counts)
            expected.update(since)
        got = self.b.global_counts(self.now)
        assert all(n >= 0 for n in got.values())
        assert {s: n for s, n in got.items() if n} == {s: n for s, n in expected.items() if n}
        assert self.b.replicas(self.now) == sorted(remotes)

    @invariant()
    def registry_matches(self) -> None:
        assert self.b.alive() == sorted(s for s, st_ in self.state.items() if st_ == "alive")


BalancerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_balancer_state_machine = BalancerMachine.TestCase


def test_sticky_learnt_from_another_replica() -> None:
    b = make("a", "b")
    b.assign("c0", None, 0)  # "a" is busier, so least-loaded alone would pick "b"
    assert b.learn_sticky("k", "a", at=1, now=2)
    assert b.assign("c1", "k", 3) == "a"
    b.release("c1", 4)
    # An older report does not undo a newer choice; a newer one does.
    assert not b.learn_sticky("k", "b", at=2, now=5)
    assert b.learn_sticky("k", "b", at=4.5, now=5)
    assert b.assign("c2", "k", 6) == "b"
    # Too old to matter.
    assert not b.learn_sticky("other", "a", at=0, now=RETENTION + 1)
    assert b.sticky_record("other") is None


def test_move_goes_to_the_least_loaded_alive_server_and_keeps_the_client_id() -> None:
    b = make("s1", "s2", "s3")
    for i in range(3):
        b.assign(f"x{i}", None, 0.0)  # one on each server
    b.assign("y", None, 0.0)
    b.assign("moved", "cid", 0.0)
    old = b.server_of("moved")
    assert old == "s2"
    b.deregister(old, 1.0)
    new = b.move("moved", 1.0)
    assert new == "s3"  # s1 has two clients, s3 one
    assert b.server_of("moved") == new and "moved" not in b.connections_of(old)
    assert b.sticky_record("cid") == (new, 1, b.sticky_record("cid")[2])  # type: ignore[index]
    assert sum(b.counts().values()) == 5


def test_move_with_no_server_left_leaves_the_connection_unassociated() -> None:
    b = make("s1")
    b.assign("c", "cid", 0.0)
    b.deregister("s1", 1.0)
    assert b.move("c", 1.0) is None
    assert b.server_of("c") is None and b.counts() == {}
    with pytest.raises(ValueError, match="not associated"):
        b.move("c", 1.0)
