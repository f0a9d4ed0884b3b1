"""The fault suite's bookkeeping (bench/chaos.py), which every worker's scenarios share."""

from __future__ import annotations

from bench.chaos import Ledger, parse_args, total


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

    from bench.chaos import run_standalone

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
