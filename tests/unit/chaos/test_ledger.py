"""The fault suite's bookkeeping (bench/chaos/), which every worker's scenarios share."""

from __future__ import annotations

from bench.chaos.ledger import Ledger
from bench.chaos.suite import parse_args, total


def test_ledger_counts_losses_and_classifies_duplicates():
    ledger = Ledger()
    ledger.sent("never-confirmed")
    ledger.acknowledged("m1", ["a", "b"])
    ledger.acknowledged("m2", ["a"])
    assert ledger.delivered("m1", "a") is True
    assert ledger.delivered("m1", "a", allowed_reason="resent batch") is False
    assert ledger.delivered("m2", "a") is True
    assert ledger.delivered("m2", "a") is False  # no reason given: a violation
    counters = ledger.counters()
    assert counters["sent"] == 3 and counters["acknowledged"] == 2
    assert counters["expected"] == 3 and counters["delivered"] == 2 and counters["lost"] == 1
    assert ledger.missing() == [("m1", "b")]
    assert counters["duplicated"]["allowed"] == 1
    assert counters["duplicated"]["violations"] == 1
    assert counters["duplicated"]["reasons"]["resent batch"] == 1


def test_deliveries_of_unconfirmed_publishes_are_not_losses_or_gains():
    ledger = Ledger()
    ledger.sent("m")
    ledger.delivered("m", "a")  # arrived although the confirm was lost
    assert ledger.counters()["lost"] == 0 and ledger.counters()["delivered"] == 0


def test_totals_skip_workers_without_scenarios():
    one = Ledger()
    one.acknowledged("x", ["a"])
    one.delivered("x", "a")
    report = {**one.counters(), "kills": 3, "reconnects": 1, "max_rss_bytes": 5}
    summed = total({"directed": report, "delay": {"skipped": "no module"}})
    assert summed["workers_run"] == 1 and summed["kills"] == 3 and summed["lost"] == 0


def test_seed_and_defaults():
    args = parse_args(["--seed", "7", "--quick", "--workers", "directed"])
    assert (args.seed, args.kills, args.workers) == (7, 8, ["directed"])
    assert parse_args([]).kills == 20


async def test_a_standalone_suite_is_merged(tmp_path, monkeypatch):
    """A worker suite that is its own command needs only the registry line."""

    from bench.chaos.suite import run_standalone

    summary = {
        "ok": True,
        "sent": 10,
        "acknowledged": 10,
        "delivered": 10,
        "lost": 0,
        "duplicated": {"count": 2, "reasons": {"client_resend": 2}},
        "kills": 20,
        "reconnects": 1,
        "max_rss_mib": 2.0,
        "scenarios": {"crash": {}},
    }
    (tmp_path / "fake_suite.py").write_text(
        "import sys, json\n"
        "assert sys.argv[1:3] == ['--seed', '5'] and '--no-broker-restart' in sys.argv\n"
        f"print(json.dumps({summary!r}))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    args = parse_args(["--seed", "5", "--skip", "broker_restart"])
    report = await run_standalone("fake_suite", args)
    assert report["ok"] and report["kills"] == 20 and report["max_rss_bytes"] == 2 * 2**20
    assert report["scenarios"] == {"crash": {}} and report["expected"] == 0
    assert total({"gateway": report})["duplicated"]["count"] == 2


def test_overload_seconds_default_and_option():
    assert parse_args([]).overload_seconds == 180.0
    assert parse_args(["--quick"]).overload_seconds == 10.0
    assert parse_args(["--overload-seconds", "300"]).overload_seconds == 300.0


# -- the delay scenarios' check (bench/chaos/delay/), without a broker ---------------------


def _delay_load(tmp_path):
    from bench.chaos.delay.deployment import Sinks, settings_for
    from bench.chaos.delay.load import Load
    from bench.chaos.harness import Harness

    h = Harness("delay", parse_args(["--seed", "1", "--workers", "delay"]), tmp_path)
    sinks = Sinks(["t0", "t1"])
    return h, Load(h, settings_for("x"), sinks, "unit"), sinks


def _msg(load, mid, topic="t0", kind="delay", published=1000.0, due=2000, key=None):
    from bench.chaos.delay.deployment import Msg

    m = Msg(mid, topic, kind, published, due, key=key, attempts=1, confirmed=True)
    load.msgs[mid] = m
    load.h.ledger.acknowledged(mid, [topic])
    return m


def _arrive(sinks, m, at, body=None, topic=None):
    from bench.chaos.delay.deployment import Arrival

    sinks.arrivals[m.id].append(Arrival(at, topic or m.topic, body or m.body))


def _pair(load, old_due, new_due=1600, published=1000.0):
    from bench.chaos.delay.deployment import Pair

    old = _msg(load, "old", kind="keyed_old", published=published, due=old_due, key="k")
    new = _msg(load, "new", "t1", "keyed_new", published + 100, new_due, key="k")
    load.pairs.append(Pair(old.id, new.id))
    load.replaces[new.id] = old.id
    load.h.ledger.acknowledged(old.id, [])
    return old, new


def test_delay_check_flags_an_early_arrival_and_counts_lateness(tmp_path):
    h, load, sinks = _delay_load(tmp_path)
    on_time = _msg(load, "a", due=2000)
    early = _msg(load, "b", due=2000)
    _arrive(sinks, on_time, 2000.5)
    _arrive(sinks, early, 1999.0)
    load._check()
    figures = h.scenario("unit")
    assert figures["early"] == 1 and any("early" in f for f in h.failures)
    assert figures["lateness_ms"]["delay"]["n"] == 2


def test_delay_check_replacement_rule(tmp_path):
    # the old message was due after the new one arrived: it was not in flight: violation
    h, load, sinks = _delay_load(tmp_path)
    old, new = _pair(load, old_due=5000)
    _arrive(sinks, new, 1700.0)
    _arrive(sinks, old, 5001.0)
    load._check()
    assert h.scenario("unit")["violation_replaced_delivered"] == 1 and h.failures
    assert h.ledger.counters()["lost"] == 0

    # due before the new one arrived: may have been in flight: allowed
    h, load, sinks = _delay_load(tmp_path)
    old, new = _pair(load, old_due=1500)
    _arrive(sinks, old, 1501.0)
    _arrive(sinks, new, 1700.0)
    load._check()
    assert h.scenario("unit")["replaced_delivered_in_flight"] == 1 and not h.failures

    # a fault that may have reordered them in the broker: allowed and counted apart
    h, load, sinks = _delay_load(tmp_path)
    old, new = _pair(load, old_due=5000)
    load.fault(1200.0, 1200.0, "kill")
    _arrive(sinks, new, 1700.0)
    _arrive(sinks, old, 5001.0)
    load._check()
    assert h.scenario("unit")["replaced_delivered_after_fault"] == 1 and not h.failures


def test_delay_check_old_winning_a_pair_needs_a_fault(tmp_path):
    h, load, sinks = _delay_load(tmp_path)
    old, _ = _pair(load, old_due=5000)
    _arrive(sinks, old, 5001.0)
    load._check()
    assert h.scenario("unit")["violation_old_delivered_new_never"] == 1
    assert h.ledger.counters()["lost"] == 1  # the new one was owed

    h, load, sinks = _delay_load(tmp_path)
    old, _ = _pair(load, old_due=5000)
    load.fault(1050.0, 1300.0, "link")
    _arrive(sinks, old, 5001.0)
    assert load.missing() == 0  # not waited for: the old one may have won
    load._check()
    assert h.scenario("unit")["pairs_old_won_after_fault"] == 1 and not h.failures
    counters = h.ledger.counters()
    assert counters["lost"] == 0 and counters["delivered"] == 1


def test_delay_check_classifies_duplicates(tmp_path):
    from bench.chaos.delay.deployment import KILLED, PRODUCER

    h, load, sinks = _delay_load(tmp_path)
    plain = _msg(load, "plain")
    killed = _msg(load, "killed")
    retried = _msg(load, "retried")
    retried.attempts = 2
    forged = _msg(load, "forged")
    forged.attempts = 2
    load.fault(2500.0, 2500.0, "kill")
    for m in (plain, killed, retried):
        _arrive(sinks, m, 2100.0)
    _arrive(sinks, plain, 2200.0)  # before the kill, nothing explains it
    _arrive(sinks, killed, 2600.0)
    _arrive(sinks, retried, 2300.0)
    _arrive(sinks, forged, 2100.0)
    _arrive(sinks, forged, 2200.0, body=b"another body")
    load._check()
    dup = h.ledger.counters()["duplicated"]
    assert dup["violations"] == 1 and dup["reasons"][KILLED] == 1
    assert dup["reasons"][PRODUCER] == 2  # retried, forged (counted, but its body is wrong)
    assert any("another body" in f for f in h.failures)
