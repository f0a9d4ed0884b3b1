"""Repeated events become counted log lines (bridge.logs.Tally)."""

from __future__ import annotations

import logging

from bridge.logs import Tally


async def test_tally_logs_the_first_event_at_once_and_the_rest_counted(caplog):
    logger = logging.getLogger("test.tally")
    tally = Tally(logger, "dead-lettered", interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.tally"):
        for _ in range(1000):
            tally.add(reason="unroutable", target="a")
        for _ in range(5):
            tally.add(reason="exchange_not_found", target="b")
        assert len(caplog.records) == 1  # the rest waits for the end of the interval
        tally.close()
    seen = [(r.reason, r.target, r.count) for r in caplog.records]  # type: ignore[attr-defined]
    assert seen == [
        ("unroutable", "a", 1),
        ("unroutable", "a", 999),
        ("exchange_not_found", "b", 5),
    ]
