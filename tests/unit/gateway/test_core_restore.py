"""Balancer sticky records saved before a restart and restored after it (no I/O)."""

from __future__ import annotations

from workers.gateway.core import Balancer


def make() -> Balancer:
    b = Balancer(server_ttl_s=10.0, sticky_retention_s=30.0)
    b.register("a", 0.0)
    b.register("b", 0.0)
    return b


def test_sticky_record_follows_live_and_release() -> None:
    b = make()
    assert b.sticky_record("c") is None
    server = b.assign("k1", "c", 1.0)
    assert server is not None
    assert b.sticky_record("c") == (server, 1, 0.0)
    b.release("k1", 2.0)
    assert b.sticky_record("c") == (server, 0, 2.0)
    b.expire(40.0)  # retention passed: forgotten
    assert b.sticky_record("c") is None


def test_restored_record_steers_and_expires() -> None:
    b = make()
    b.restore_sticky("old", "b", 1.0)
    b.restore_sticky("older-but-later", "b", 2.0)
    assert b.assign("k1", "old", 5.0) == "b"
    assert b.sticky_record("old") == ("b", 1, 1.0)
    # restored records are pruned by the retention window like any other
    b.heartbeat("a", 30.0)
    b.heartbeat("b", 30.0)
    b.expire(33.0)
    assert b.sticky_record("older-but-later") is None
    assert b.assign("k2", "older-but-later", 33.0) == "a"


def test_restore_does_not_override_what_this_process_saw() -> None:
    b = make()
    server = b.assign("k1", "c", 1.0)
    other = "b" if server == "a" else "a"
    b.restore_sticky("c", other, 0.5)
    assert b.sticky_record("c") == (server, 1, 0.0)


def test_restored_record_for_unknown_server_falls_back() -> None:
    b = make()
    b.restore_sticky("c", "gone", 1.0)
    assert b.assign("k1", "c", 2.0) in ("a", "b")
