"""Directed core state (workers.directed.state): the queries, and the restore from what the
store kept (journals replayed into :class:`~tests.unit.directed.replay.ReplayStore`).
"""

from __future__ import annotations

import pytest

from tests.unit.directed.replay import fill, replayed
from workers.directed.core import DirectedCore
from workers.directed.model import (
    Detail,
    Enqueue,
    PullResult,
    SubmitResult,
)

# ----------------------------------------------------------------------------- queries


def test_status_of_unknown_message_is_none() -> None:
    assert DirectedCore().status("nope") is None


def test_detail_is_a_copy() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t"]))
    d = core.detail(1)
    assert d is not None and d.alive
    d.remaining = 99
    assert core.detail(1) == Detail(1, "a", 1, 1)


def test_metrics_properties() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t", "u"]), ("b", ["u"]))
    assert (core.alive_messages, core.target_count, core.tombstones) == (2, 2, 0)
    assert sorted(core.targets()) == ["t", "u"]
    core.pull("t", None, 5, 0, "r1")
    assert core.target_count == 2  # t keeps its buffer
    core.pull("t", "r1", 0, 0, "r2")
    assert (core.alive_messages, core.target_count, core.tombstones) == (2, 1, 0)
    core.pull("u", None, 5, 0, "r3")
    core.pull("u", "r3", 0, 0, "r4")
    assert (core.alive_messages, core.target_count, core.tombstones) == (0, 0, 2)


# ----------------------------------------------------------------------------- restore


def test_restore_continues_mids_and_seqs_with_an_empty_journal() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t", "u"]), ("b", ["t"]), ("c", ["t"]))
    core.pull("t", None, 1, 0, "r1")
    store = replayed(core)
    back = store.restore()
    assert back.take_journal() == []
    assert back.mid_of("b") == 2 and back.backlog("t") == 2 and back.backlog("u") == 1
    assert back.submit("d", ["t", "v"], 1, None) == SubmitResult("accepted", 4)
    assert back.take_journal()[1:] == [Enqueue("t", 4, 4), Enqueue("v", 1, 4)]
    assert back.pull("t", "nope", 5, 2, "r2") == PullResult("resend", "r1", (1,), True, ())


def test_restore_rebuilds_the_expiry_heap() -> None:
    core = DirectedCore()
    core.submit("a", ["t"], 0, 50)
    core.submit("b", ["t"], 0, 20)
    core.submit("c", ["t"], 0, None)
    back = replayed(core).restore()
    assert back.expire(100) == [2, 1]
    assert back.backlog("t") == 1


def test_restore_never_reuses_a_mid_that_a_queue_still_refers_to() -> None:
    core = DirectedCore()
    fill(core, ("keep", ["t"]))
    core.submit("a", ["t"], 0, 1)
    core.expire(1)
    core.purge(1, 0)  # mid 2 forgotten, its dead entry still queued behind mid 1
    back = replayed(core).restore()
    result = back.submit("b", ["t"], 2, None)
    assert result.mid == 3
    assert back.pull("t", None, 5, 3, "r1").mids == (1, 3)


def test_restore_does_not_share_details_with_the_caller() -> None:
    src = Detail(1, "a", 1, 1)
    core = DirectedCore.restore(details=[src], queues={"t": [(1, 1)]}, buffers={})
    core.pull("t", None, 1, 0, "r1")
    core.pull("t", "r1", 0, 0, "r2")
    assert src == Detail(1, "a", 1, 1)


@pytest.mark.parametrize(
    "entries", [[(1, 1), (3, 2)], [(1, 2), (2, 1)]], ids=["seq-gap", "mids-descending"]
)
def test_restore_refuses_a_queue_it_cannot_represent(entries: list[tuple[int, int]]) -> None:
    details = [Detail(1, "a", 1, 1), Detail(2, "b", 1, 1)]
    with pytest.raises(ValueError):
        DirectedCore.restore(details=details, queues={"t": entries}, buffers={})


# ----------------------------------------------------------------------------- pending targets


def test_pending_targets_pages_in_name_order_through_queues_and_batches() -> None:
    core = DirectedCore()
    fill(core, ("a", ["d", "b", "c", "e"]), ("b", ["b"]))
    core.pull("c", None, 1, 0, "r1")  # c holds a in its batch: still pending
    core.pull("e", None, 1, 0, "r2")
    core.pull("e", "r2", 0, 0, "r3")  # e acknowledged it: not pending
    assert core.pending_targets("a", None, 2) == (["b", "c"], True)
    assert core.pending_targets("a", "c", 2) == (["d"], False)
    assert core.pending_targets("b", None, 10) == (["b"], False)
    assert core.pending_targets("nope", None, 10) is None
    core.pull("b", None, 5, 0, "r4")
    core.pull("b", "r4", 0, 0, "r5")
    assert core.pending_targets("b", None, 10) == ([], False)  # done: nobody is pending


def test_recall_survives_restore() -> None:
    core = DirectedCore()
    fill(core, ("a", ["t", "u"]))
    core.pull("u", None, 5, 0, "r1")
    store = replayed(core)
    core.recall("a", 3)
    back = replayed(core, store).restore()
    assert back.status("a") == core.status("a")
    assert back.pull("t", None, 5, 4, "r2").mids == ()
    assert back.pull("u", None, 5, 4, "r3").recalled_ids == ("a",)
