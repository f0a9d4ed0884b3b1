"""The directed replies (workers.directed.replies): the JSON and binary forms of a pull reply."""

from __future__ import annotations

import base64
import datetime
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    entries = [replies.encode_message(m.id, m.body, m.props) for m in messages]
    as_json = json.loads(
        replies.encode_reply("t", "r1", False, entries, missed=1, missed_ids=["m0"])
    )
    assert replies.decode_binary_reply(replies.json_reply_to_binary(as_json)) == doc
    with pytest.raises(ValueError):
        replies.decode_binary_reply(raw + b"x")


TEXT = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(
    ["", "é", '"\\', "\u2028"]
)
HEADER = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | TEXT
    | st.just(datetime.datetime(2026, 1, 2, 3, 4, 5)),  # encoded through default=str
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@given(
    topic=TEXT,
    record_id=st.none() | TEXT,
    redelivered=st.booleans(),
    messages=st.lists(
        st.tuples(TEXT, st.binary(max_size=20), st.none() | TEXT, st.dictionaries(TEXT, HEADER)),
        max_size=3,
    ),
    missed_ids=st.lists(TEXT, max_size=3),
    recalled_ids=st.lists(TEXT, max_size=3),
)
def test_json_reply_is_byte_identical_to_one_dumps_of_the_whole_reply(
    topic, record_id, redelivered, messages, missed_ids, recalled_ids
):
    """The contract's bytes (docs/directed.md) do not change with the per-message encoding
    shared between targets: the reply is what json.dumps of the whole document gives."""
    missed = len(missed_ids)
    doc: dict = {"topic": topic, "record_id": record_id, "redelivered": redelivered}
    doc["messages"] = [
        {
            "id": mid,
            "body": base64.b64encode(body).decode("ascii"),
            "content_type": ctype,
            "headers": headers,
        }
        for mid, body, ctype, headers in messages
    ]
    if missed:
        doc["missed"] = missed
        doc["missed_ids"] = missed_ids
    if recalled_ids:
        doc["recalled"] = recalled_ids
    expected = json.dumps(doc, separators=(",", ":"), default=str).encode()
    entries = [
        replies.encode_message(mid, body, {"content_type": ctype, "headers": headers})
        for mid, body, ctype, headers in messages
    ]
    got = replies.encode_reply(
        topic,
        record_id,
        redelivered,
        entries,
        missed=missed,
        missed_ids=missed_ids,
        recalled_ids=recalled_ids,
    )
    assert got == expected
