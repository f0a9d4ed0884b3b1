"""The directed control queries (workers.directed.queries): parsing, without a broker."""

from __future__ import annotations

import pytest

from bridge.errors import WireError
from workers.directed import queries
from workers.directed.config import DirectedSettings


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"message_id": 5},
        {"message_id": ""},
        {"message_id": "m", "cursor": 3},
        {"message_id": "m", "limit": 0},
        {"message_id": "m", "limit": 1001},
        {"message_id": "m", "limit": True},
        {"message_id": "m", "limit": "10"},
    ],
)
def test_pending_targets_query_refusals(doc):
    with pytest.raises(WireError) as exc:
        queries.parse_pending_targets(doc)
    assert exc.value.code == "invalid_query"


def test_pending_targets_query_defaults():
    assert queries.parse_pending_targets({"message_id": "m"}) == queries.PendingTargets(
        "m", None, 100
    )


@pytest.mark.parametrize(
    "doc",
    [
        {"op": "group_set", "targets": ["a"]},
        {"op": "group_set", "group": "", "targets": ["a"]},
        {"op": "group_set", "group": 3, "targets": ["a"]},
        {"op": "group_add", "group": "g"},
        {"op": "group_add", "group": "g", "targets": []},
        {"op": "group_remove", "group": "g", "targets": "a"},
        {"op": "group_add", "group": "g", "targets": [1]},
    ],
)
def test_group_change_refusals(doc):
    with pytest.raises(WireError) as exc:
        queries.parse_group_change(doc, DirectedSettings())
    assert exc.value.code == "invalid_query"


def test_group_set_to_nothing_is_a_deletion():
    change = queries.parse_group_change(
        {"op": "group_set", "group": "g", "targets": []}, DirectedSettings()
    )
    assert (change.op, change.targets) == ("group_set", [])


# ----------------------------------------------------------------------------- shards' answers


def status(state: str, **counts: int) -> dict:
    base = dict.fromkeys(("total", "acked", "pending", "expired", "dropped", "recalled"), 0)
    return {"message_id": "m", **base, **counts, "state": state}


@pytest.mark.parametrize(
    ("states", "merged"),
    [
        (["done", "active"], "active"),
        (["done", "recalled", "expired"], "recalled"),
        (["expired", "expired"], "expired"),
        (["expired", "done"], "done"),
    ],
)
def test_total_status_adds_the_shards_counts_and_picks_the_state(states, merged):
    parts = [status(s, total=2, acked=1, pending=1) for s in states]
    total = queries.total_status(parts, [3])
    assert total is not None
    assert (total["state"], total["total"], total["acked"], total["pending"]) == (
        merged,
        2 * len(states),
        len(states),
        len(states),
    )
    assert total["shards"] == {"holding": len(states), "unanswered": [3]}


def test_total_status_of_a_message_no_shard_holds():
    assert queries.total_status([], []) is None
    with pytest.raises(WireError) as exc:
        queries.total_status([], [1])
    assert exc.value.code == "shards_unavailable"


def test_total_stats_adds_the_counts():
    parts = [{"messages": 2, "targets": 3, "commits": None}, {"messages": 1, "commits": 4}]
    assert queries.total_stats(parts, [2]) == {
        "messages": 3,
        "targets": 3,
        "commits": 4,
        "shards": {"answered": 2, "unanswered": [2]},
    }


def test_pending_page_merges_the_shards_pages_in_name_order():
    query = queries.PendingTargets("m", None, 3)
    others = [
        {"pending_targets": {"targets": ["d", "a"], "cursor": None}},
        {"error": {"code": "not_found"}},
    ]
    page = queries.pending_page(query, (["c", "b"], False), others)
    assert page == {"message_id": "m", "targets": ["a", "b", "c"], "cursor": "c"}
    assert queries.pending_page(query, None, others[:1])["targets"] == ["a", "d"]
    with pytest.raises(WireError) as exc:
        queries.pending_page(query, None, others[1:])
    assert exc.value.code == "not_found"
