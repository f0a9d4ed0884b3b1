"""Named target groups: the pure membership and the wire of x-target-groups and group_*."""

from __future__ import annotations

import pytest

from workers.directed import wire
from workers.directed.config import ENVELOPE_CONTENT_TYPE, DirectedSettings
from workers.directed.groups import GroupError, Groups


def test_changes_and_resolution():
    g = Groups(max_size=4)
    assert g.set("eu", ["a", "b", "a"]) == ["a", "b"]
    assert g.add("eu", ["c", "b"]) == ["a", "b", "c"]
    assert g.remove("eu", ["a", "zzz"]) == ["b", "c"]
    g.set("us", ["d"])
    assert g.resolve(["x", "c"], ["eu", "us"]) == ["x", "c", "b", "d"]
    assert g.remove("us", ["d"]) is None and g.get("us") is None  # the last member: gone
    assert g.set("eu", []) is None and len(g) == 0
    with pytest.raises(GroupError) as exc:
        g.resolve(["a"], ["nope"])
    assert exc.value.code == "unknown_group"
    g.set("big", ["1", "2", "3", "4"])
    with pytest.raises(GroupError) as exc:
        g.add("big", ["5"])
    assert exc.value.code == "too_many_targets" and g.get("big") == ["1", "2", "3", "4"]
    with pytest.raises(GroupError) as exc:
        g.resolve(["x"], ["big"])
    assert exc.value.code == "too_many_targets"


def test_request_with_groups_alone_or_beside_targets():
    s = DirectedSettings()
    req = wire.parse_request(
        body=b"x",
        headers={"x-target-groups": ["eu", "eu"]},
        content_type=None,
        message_id="m",
        settings=s,
    )
    assert (req.targets, req.groups) == ([], ("eu",))
    req = wire.parse_request(
        body=b"x",
        headers={"x-targets": [], "x-target-groups": ["eu"]},
        content_type=None,
        message_id="m",
        settings=s,
    )
    assert req.groups == ("eu",)
    env = b'{"targets": ["a"], "target_groups": ["eu"], "body": "eA=="}'
    req = wire.parse_request(
        body=env, headers={}, content_type=ENVELOPE_CONTENT_TYPE, message_id="m", settings=s
    )
    assert (req.targets, req.groups, req.body) == (["a"], ("eu",), b"x")
    for bad in ("eu", [], [1], [""]):
        with pytest.raises(wire.WireError) as exc:
            wire.parse_request(
                body=b"x",
                headers={"x-target-groups": bad},
                content_type=None,
                message_id="m",
                settings=s,
            )
        assert exc.value.code == "invalid_groups", bad


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
    with pytest.raises(wire.WireError) as exc:
        wire.parse_group_change(doc, DirectedSettings())
    assert exc.value.code == "invalid_query"


def test_group_set_to_nothing_is_a_deletion():
    change = wire.parse_group_change(
        {"op": "group_set", "group": "g", "targets": []}, DirectedSettings()
    )
    assert (change.op, change.targets) == ("group_set", [])
