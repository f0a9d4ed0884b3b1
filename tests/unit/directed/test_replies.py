"""The directed replies (workers.directed.replies): the JSON and binary forms of a pull reply."""

from __future__ import annotations

import json

import pytest

from workers.directed import replies


def test_binary_reply_round_trip_and_from_json():
    messages = [
        replies.Message("m1", b"\x00\xffbody", {"content_type": "x/y", "headers": {"k": 1}}),
        replies.Message("m2", b"", {}),
    ]
    raw = replies.encode_binary_reply("t", "r1", False, messages, missed=1, missed_ids=["m0"])
    doc = replies.decode_binary_reply(raw)
    assert doc["messages"] == [
        {"id": "m1", "body": b"\x00\xffbody", "content_type": "x/y", "headers": {"k": 1}},
        {"id": "m2", "body": b"", "content_type": None, "headers": {}},
    ]
    assert (doc["record_id"], doc["missed"], doc["missed_ids"]) == ("r1", 1, ["m0"])
    as_json = json.loads(
        replies.encode_reply("t", "r1", False, messages, missed=1, missed_ids=["m0"])
    )
    assert replies.decode_binary_reply(replies.json_reply_to_binary(as_json)) == doc
    with pytest.raises(ValueError):
        replies.decode_binary_reply(raw + b"x")
