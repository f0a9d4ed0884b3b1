"""Hostile inputs for the directed parsers: every one becomes a WireError with a documented
code, never another exception (which would leave a pull unanswered or make the broker
redeliver a request forever)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.directed import replies, wire
from workers.directed.config import ENVELOPE_CONTENT_TYPE, DirectedSettings

S = DirectedSettings(max_targets=5, max_body_bytes=1000)
REQUEST_REASONS = {
    "missing_targets",
    "empty_targets",
    "invalid_targets",
    "invalid_target_name",
    "too_many_targets",
    "oversized",
    "invalid_ttl",
    "invalid_envelope",
    "invalid_message_id",
    "invalid_headers",
}
PULL_CODES = {"bad_json", "invalid_pull", "unknown_op", "topic_mismatch", "too_large"}


def req(headers=None, body=b"x", ctype=None, mid="m", settings=S):
    return wire.parse_request(
        body=body, headers=headers, content_type=ctype, message_id=mid, settings=settings
    )


def envelope(**doc) -> bytes:
    doc.setdefault("body", base64.b64encode(b"hi").decode())
    return json.dumps(doc).encode()


def deep_envelope(depth: int) -> bytes:
    """An envelope whose headers nest ``depth`` objects (built as text: json.dumps recurses)."""
    deep = '{"k":' * depth + "1" + "}" * depth
    return b'{"targets": ["a"], "body": "", "headers": {"deep": ' + deep.encode() + b"}}"


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def listed(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("headers", "body", "ctype", "code"),
    [
        # a lone surrogate has no UTF-8 form: it can only arrive through a JSON escape
        ({}, envelope(targets=["\ud800"]), ENVELOPE_CONTENT_TYPE, "invalid_target_name"),
        ({}, envelope(targets=["ok", "a\udfffb"]), ENVELOPE_CONTENT_TYPE, "invalid_target_name"),
        ({"x-targets": ["a"], "x-ttl-ms": "²"}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"], "x-ttl-ms": "9" * 5000}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"], "x-ttl-ms": "1e3"}, b"x", None, "invalid_ttl"),
        ({"x-targets": ["a"], "deep": nested(40)}, b"x", None, "invalid_headers"),
        ({"x-targets": ["a"], "deep": listed(40)}, b"x", None, "invalid_headers"),
        (
            {},
            deep_envelope(2000),
            ENVELOPE_CONTENT_TYPE,
            "invalid_envelope",
        ),
        (
            {},
            deep_envelope(500),
            ENVELOPE_CONTENT_TYPE,
            "invalid_headers",
        ),
    ],
)
def test_hostile_requests_get_a_reason(headers, body, ctype, code):
    with pytest.raises(wire.WireError) as err:
        req(headers, body, ctype, settings=DirectedSettings())
    assert err.value.code == code


def test_header_depth_limit():
    assert req({"x-targets": ["a"], "ok": nested(wire.MAX_HEADER_DEPTH - 1)}).targets == ["a"]
    with pytest.raises(wire.WireError, match="invalid_headers"):
        req({"x-targets": ["a"], "deep": nested(wire.MAX_HEADER_DEPTH)})


def test_unicode_target_names_that_are_valid_are_kept():
    names = ["\u05e9\u05dc\u05d5\u05dd", "a\x00b", "\U0001f600", "\u202eevil", "e\u0301"]
    assert req({"x-targets": names}).targets == names


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"topic": "\\ud800"}', "invalid_pull"),
        (b'{"topic": "a\\udc00"}', "invalid_pull"),
        (b'{"topic": "a", "max": 1e400}', "invalid_pull"),
        (b'{"topic": "a", "max": NaN}', "invalid_pull"),
        (b'{"topic": "a", "max": -Infinity}', "invalid_pull"),
        (b'{"topic": "a", "max": ' + b"9" * 5000 + b"}", "bad_json"),
        (b'{"topic": "a"}\x00', "bad_json"),
        (b"\xff\xfe", "bad_json"),
    ],
)
def test_hostile_pulls_get_an_error_code(body, code):
    with pytest.raises(wire.WireError) as err:
        wire.parse_pull(body, "a", DirectedSettings())
    assert err.value.code == code


# Text that may contain lone surrogates, which st.text() leaves out by default.
WILD_TEXT = st.text(
    st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    max_size=6,
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | WILD_TEXT,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(WILD_TEXT, c, max_size=3),
    max_leaves=12,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "op": JSONISH,
            "topic": JSONISH,
            "record_id": JSONISH,
            "max": JSONISH,
            "wait_ms": JSONISH,
        },
    )
)
def test_any_pull_with_wild_text_parses_or_raises_wire_error(doc):
    try:
        wire.parse_pull(json.dumps(doc).encode(), "a", DirectedSettings())
    except wire.WireError as exc:
        assert exc.code in PULL_CODES


@given(
    st.fixed_dictionaries(
        {"targets": JSONISH},
        optional={"body": JSONISH, "content_type": JSONISH, "headers": JSONISH, "ttl_ms": JSONISH},
    )
)
def test_any_envelope_with_wild_text_parses_or_raises_wire_error(doc):
    try:
        r = req({}, json.dumps(doc).encode(), ENVELOPE_CONTENT_TYPE)
    except wire.WireError as exc:
        assert exc.code in REQUEST_REASONS
        return
    assert 1 <= len(r.targets) <= S.max_targets
    replies.encode_reply(
        "t", "r", False, [replies.encode_message("m", r.body, {"headers": r.headers})]
    )
