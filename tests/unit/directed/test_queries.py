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
