"""Named target groups (workers.directed.groups): membership, changes, resolution."""

from __future__ import annotations

import pytest

from bridge.errors import WireError
from workers.directed.groups import Groups


def test_changes_and_resolution():
    g = Groups(max_size=4)
    assert g.set("eu", ["a", "b", "a"]) == ["a", "b"]
    assert g.add("eu", ["c", "b"]) == ["a", "b", "c"]
    assert g.remove("eu", ["a", "zzz"]) == ["b", "c"]
    g.set("us", ["d"])
    assert g.resolve(["x", "c"], ["eu", "us"]) == ["x", "c", "b", "d"]
    assert g.remove("us", ["d"]) is None and g.get("us") is None  # the last member: gone
    assert g.set("eu", []) is None and len(g) == 0
    with pytest.raises(WireError) as exc:
        g.resolve(["a"], ["nope"])
    assert exc.value.code == "unknown_group"
    g.set("big", ["1", "2", "3", "4"])
    with pytest.raises(WireError) as exc:
        g.add("big", ["5"])
    assert exc.value.code == "too_many_targets" and g.get("big") == ["1", "2", "3", "4"]
    with pytest.raises(WireError) as exc:
        g.resolve(["x"], ["big"])
    assert exc.value.code == "too_many_targets"
