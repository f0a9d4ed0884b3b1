"""The directed wire contract's parsers (workers.directed.wire), without a broker."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.directed import wire
from workers.directed.config import ENVELOPE_CONTENT_TYPE, DirectedSettings

S = DirectedSettings(max_targets=5, max_body_bytes=100)


def req(headers=None, body=b"x", ctype=None, mid=None):
    return wire.parse_request(
        body=body, headers=headers, content_type=ctype, message_id=mid, settings=S
    )


def test_targets_are_deduplicated_in_order():
    assert req({"x-targets": ["b", "a", "b", b"c"]}).targets == ["b", "a", "c"]


def test_without_message_id_the_id_is_a_content_digest():
    a = req({"x-targets": ["a", "b"]}, b"body")
    b = req({"x-targets": ["a", "b"]}, b"body")
    c = req({"x-targets": ["a", "c"]}, b"body")
    assert a.message_id == b.message_id != c.message_id
    assert a.message_id.startswith("sha256:")
    assert req({"x-targets": ["a"]}, mid="given").message_id == "given"


def test_envelope_carries_targets_body_and_headers():
    env = {
        "targets": ["a", "b"],
        "body": base64.b64encode(b"\x00bin").decode(),
        "content_type": "app/x",
        "headers": {"k": 1},
        "ttl_ms": 500,
    }
    r = wire.parse_request(
        body=json.dumps(env).encode(),
        headers=None,
        content_type=ENVELOPE_CONTENT_TYPE,
        message_id=None,
        settings=DirectedSettings(),
    )
    assert (r.targets, r.body, r.content_type, r.headers, r.ttl_ms) == (
        ["a", "b"],
        b"\x00bin",
        "app/x",
        {"k": 1},
        500,
    )


@pytest.mark.parametrize(
    ("headers", "body", "ctype", "code"),
    [
        (None, b"x", None, "missing_targets"),
        ({"x-targets": []}, b"x", None, "empty_targets"),
        ({"x-targets": "a"}, b"x", None, "invalid_targets"),
        ({"x-targets": [None]}, b"x", None, "invalid_targets"),
        ({"x-targets": [b"\xff"]}, b"x", None, "invalid_targets"),
        ({"x-targets": ["a" * 256]}, b"x", None, "invalid_target_name"),
        ({"x-targets": list("abcdef")}, b"x", None, "too_many_targets"),
        ({"x-targets": ["a"], "x-ttl-ms": 0}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"], "x-ttl-ms": 1.5}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"], "x-ttl-ms": True}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"], "x-ttl-ms": 10**12}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"]}, b"x" * 101, None, "oversized"),
        (None, b"[1]", ENVELOPE_CONTENT_TYPE, "invalid_envelope"),
        (None, b'{"targets": ["a"], "body": 5}', ENVELOPE_CONTENT_TYPE, "invalid_envelope"),
        (None, b'{"targets": ["a"], "headers": []}', ENVELOPE_CONTENT_TYPE, "invalid_envelope"),
        (None, b"[" * 50, ENVELOPE_CONTENT_TYPE, "invalid_envelope"),
    ],
)
def test_bad_requests(headers, body, ctype, code):
    with pytest.raises(wire.WireError) as info:
        req(headers, body, ctype)
    assert info.value.code == code and info.value.message


def test_pull_defaults_and_caps():
    p = wire.parse_pull(
        b'{"topic": "a", "max": 100000, "wait_ms": 10000000}',
        "a",
        DirectedSettings(max_batch=7, max_wait_ms=900),
    )
    assert (p.topic, p.record_id, p.max, p.wait_ms) == ("a", None, 7, 900)


@given(st.binary(max_size=300))
def test_any_pull_body_parses_or_raises_wire_error(body):
    try:
        wire.parse_pull(body, "a", DirectedSettings())
    except wire.WireError as exc:
        assert exc.code in {"bad_json", "invalid_pull", "unknown_op", "topic_mismatch", "too_large"}


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=10,
    )
)
def test_any_json_pull_document_parses_or_raises_wire_error(doc):
    body = json.dumps({"topic": "a", "record_id": doc} if isinstance(doc, str) else doc).encode()
    try:
        wire.parse_pull(body, "a", DirectedSettings())
    except wire.WireError:
        pass


@given(
    st.dictionaries(
        st.text(max_size=10),
        st.none() | st.integers() | st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=7),
        max_size=4,
    ),
    st.binary(max_size=150),
)
def test_any_request_parses_or_raises_wire_error(headers, body):
    try:
        r = wire.parse_request(
            body=body, headers=headers, content_type=None, message_id=None, settings=S
        )
    except wire.WireError:
        return
    assert 1 <= len(r.targets) <= S.max_targets


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
