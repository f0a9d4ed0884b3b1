"""Pure parsing of the delay worker (workers.delay.wire): ingress headers and control requests."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import WireError, encode_error
from workers.delay import wire
from workers.delay.store import (
    MAX_MID,
)
from workers.delay.wire import (
    CONTROL_HEADERS,
    REJECT_REASONS,
    Reject,
    Schedule,
    parse_ingress,
    strip_control_headers,
)

NOW = 1_700_000_000_000
HORIZON = 60_000


# ---------------------------------------------------------------- parse_ingress

T = {"x-target-exchange": "orders"}

PARSE_CASES: list[tuple[str, dict[str, object] | None, str | None, Schedule | str]] = [
    # valid forms
    ("int delay", {"x-delay": 5000, **T}, None, Schedule(NOW + 5000, "orders", None)),
    ("zero delay", {"x-delay": 0, **T}, None, Schedule(NOW, "orders", None)),
    ("str delay", {"x-delay": "5000", **T}, None, Schedule(NOW + 5000, "orders", None)),
    ("bytes delay", {"x-delay": b"5000", **T}, None, Schedule(NOW + 5000, "orders", None)),
    (
        "deliver-at future",
        {"x-deliver-at": NOW + 10, **T},
        None,
        Schedule(NOW + 10, "orders", None),
    ),
    ("deliver-at past", {"x-deliver-at": NOW - 10**9, **T}, None, Schedule(NOW, "orders", None)),
    ("deliver-at zero", {"x-deliver-at": 0, **T}, None, Schedule(NOW, "orders", None)),
    (
        "deliver-at str",
        {"x-deliver-at": str(NOW + 7), **T},
        None,
        Schedule(NOW + 7, "orders", None),
    ),
    ("delay at horizon", {"x-delay": HORIZON, **T}, None, Schedule(NOW + HORIZON, "orders", None)),
    (
        "deliver-at at horizon",
        {"x-deliver-at": NOW + HORIZON, **T},
        None,
        Schedule(NOW + HORIZON, "orders", None),
    ),
    ("default target", {"x-delay": 1}, "fallback", Schedule(NOW + 1, "fallback", None)),
    ("explicit beats default", {"x-delay": 1, **T}, "fallback", Schedule(NOW + 1, "orders", None)),
    (
        "bytes target",
        {"x-delay": 1, "x-target-exchange": b"orders"},
        None,
        Schedule(NOW + 1, "orders", None),
    ),
    ("target 255 bytes", {"x-delay": 1, "x-target-exchange": "t" * 255}, None, "ok"),
    (
        "str key",
        {"x-delay": 1, "x-delay-key": "order-7", **T},
        None,
        Schedule(NOW + 1, "orders", "order-7"),
    ),
    ("bytes key", {"x-delay": 1, "x-delay-key": b"k", **T}, None, Schedule(NOW + 1, "orders", "k")),
    ("key 255 bytes", {"x-delay": 1, "x-delay-key": "k" * 255, **T}, None, "ok"),
    # ambiguous / missing
    ("both delay headers", {"x-delay": 1, "x-deliver-at": NOW, **T}, None, "ambiguous_delay"),
    ("no delay header", dict(T), None, "missing_delay"),
    ("no headers at all", None, "fallback", "missing_delay"),
    ("empty headers", {}, "fallback", "missing_delay"),
    # invalid delay
    # negative: due now, as the plugin treats it (it stamps -delay on what it delayed)
    ("negative delay", {"x-delay": -1, **T}, None, Schedule(NOW, "orders", None)),
    ("plugin-stamped delay", {"x-delay": -30_000, **T}, None, Schedule(NOW, "orders", None)),
    ("negative str delay", {"x-delay": "-1", **T}, None, Schedule(NOW, "orders", None)),
    ("bool delay", {"x-delay": True, **T}, None, "invalid_delay"),
    ("float delay", {"x-delay": 5000.0, **T}, None, "invalid_delay"),
    ("nan delay", {"x-delay": math.nan, **T}, None, "invalid_delay"),
    ("text delay", {"x-delay": "soon", **T}, None, "invalid_delay"),
    ("float text delay", {"x-delay": "5.5", **T}, None, "invalid_delay"),
    ("padded text delay", {"x-delay": " 5000", **T}, None, "invalid_delay"),
    ("underscore text delay", {"x-delay": "5_000", **T}, None, "invalid_delay"),
    ("arabic-indic digits", {"x-delay": "\u0665", **T}, None, "invalid_delay"),
    ("empty text delay", {"x-delay": "", **T}, None, "invalid_delay"),
    ("none delay", {"x-delay": None, **T}, None, "invalid_delay"),
    ("list delay", {"x-delay": [1], **T}, None, "invalid_delay"),
    ("non-utf8 bytes delay", {"x-delay": b"\xff", **T}, None, "invalid_delay"),
    ("huge digit string", {"x-delay": "9" * 5000, **T}, None, "invalid_delay"),
    ("float deliver-at", {"x-deliver-at": float(NOW), **T}, None, "invalid_delay"),
    ("bool deliver-at", {"x-deliver-at": False, **T}, None, "invalid_delay"),
    ("text deliver-at", {"x-deliver-at": "tomorrow", **T}, None, "invalid_delay"),
    # horizon
    ("delay horizon + 1", {"x-delay": HORIZON + 1, **T}, None, "beyond_horizon"),
    ("deliver-at horizon + 1", {"x-deliver-at": NOW + HORIZON + 1, **T}, None, "beyond_horizon"),
    ("enormous delay", {"x-delay": 10**30, **T}, None, "beyond_horizon"),
    # target
    ("no target, no default", {"x-delay": 1}, None, "missing_target"),
    ("no target, empty default", {"x-delay": 1}, "", "missing_target"),
    ("empty target", {"x-delay": 1, "x-target-exchange": ""}, "fallback", "missing_target"),
    ("int target", {"x-delay": 1, "x-target-exchange": 7}, None, "missing_target"),
    ("none target", {"x-delay": 1, "x-target-exchange": None}, "fallback", "missing_target"),
    ("target 256 bytes", {"x-delay": 1, "x-target-exchange": "t" * 256}, None, "missing_target"),
    (
        "target 256 utf8 bytes",
        {"x-delay": 1, "x-target-exchange": "é" * 128},
        None,
        "missing_target",
    ),
    ("non-utf8 target", {"x-delay": 1, "x-target-exchange": b"\xff"}, None, "missing_target"),
    # key
    ("empty key", {"x-delay": 1, "x-delay-key": "", **T}, None, "invalid_key"),
    ("int key", {"x-delay": 1, "x-delay-key": 5, **T}, None, "invalid_key"),
    ("none key", {"x-delay": 1, "x-delay-key": None, **T}, None, "invalid_key"),
    ("key 256 bytes", {"x-delay": 1, "x-delay-key": "k" * 256, **T}, None, "invalid_key"),
    ("non-utf8 key", {"x-delay": 1, "x-delay-key": b"\xfe", **T}, None, "invalid_key"),
    # first failing check wins: delay, horizon, target, key
    ("bad delay and target", {"x-delay": "x"}, None, "invalid_delay"),
    ("far and no target", {"x-delay": HORIZON + 1}, None, "beyond_horizon"),
    ("no target and bad key", {"x-delay": 1, "x-delay-key": ""}, None, "missing_target"),
]


@pytest.mark.parametrize(
    ("headers", "default", "expected"),
    [c[1:] for c in PARSE_CASES],
    ids=[c[0] for c in PARSE_CASES],
)
def test_parse_ingress(
    headers: dict[str, object] | None, default: str | None, expected: Schedule | str
) -> None:
    got = parse_ingress(headers, NOW, horizon_ms=HORIZON, default_target=default)
    if isinstance(expected, Schedule):
        assert got == expected
    elif expected == "ok":
        assert isinstance(got, Schedule)
    else:
        assert isinstance(got, Reject)
        assert got.reason == expected
        assert got.reason in REJECT_REASONS
        assert got.detail


def test_every_reject_reason_is_covered_by_the_table() -> None:
    covered = {c[3] for c in PARSE_CASES if isinstance(c[3], str)}
    assert set(REJECT_REASONS) <= covered


def test_reject_detail_names_the_value_and_is_truncated() -> None:
    got = parse_ingress({"x-delay": "soon", **T}, NOW, horizon_ms=HORIZON, default_target=None)
    assert isinstance(got, Reject) and "'soon'" in got.detail
    long = "x" * 10_000
    got = parse_ingress({"x-delay": long, **T}, NOW, horizon_ms=HORIZON, default_target=None)
    assert isinstance(got, Reject)
    assert "xxxx" in got.detail and len(got.detail) < 200


def test_strip_control_headers() -> None:
    headers: dict[str, object] = {h: 1 for h in CONTROL_HEADERS}
    headers.update({"x-trace": "abc", "X-Delay": "case differs, kept"})
    # the ingress queue's count of the worker's deliveries is not the target's; x-death
    # (the message's dead-letter history) is the producer's and goes on
    headers.update({"x-delivery-count": 2, "x-death": [{"count": 1}]})
    assert strip_control_headers(headers) == {
        "x-trace": "abc",
        "X-Delay": "case differs, kept",
        "x-death": [{"count": 1}],
    }
    assert strip_control_headers(None) == {}
    assert "x-delay" in headers, "the input is not modified"


# ---------------------------------------------------------------- control requests

PARSE = [
    (b'{"op": "counts"}', wire.Counts()),
    (b'{"op": "cancel", "message_id": "m1"}', wire.Cancel("message_id", "m1")),
    (b'{"op": "cancel", "key": "k"}', wire.Cancel("key", "k")),
    (b'{"op": "list", "topic": "t"}', wire.ListPending("t", 100, None)),
    (b'{"op": "list", "topic": "t", "limit": 5000}', wire.ListPending("t", 1000, None)),
    (
        b'{"op": "list", "topic": "t", "limit": 2, "after": "17:4"}',
        wire.ListPending("t", 2, (17, 4)),
    ),
]

ERRORS = [
    (b"", "bad_json"),
    (b"nope", "bad_json"),
    (b"[1]", "bad_json"),
    (b'{"op": 1}', "unknown_op"),
    (b'{"op": "status"}', "unknown_op"),
    (b"{}", "unknown_op"),
    (b'{"op": "cancel"}', "invalid_request"),
    (b'{"op": "cancel", "message_id": "a", "key": "b"}', "invalid_request"),
    (b'{"op": "cancel", "message_id": ""}', "invalid_request"),
    (b'{"op": "cancel", "key": 5}', "invalid_request"),
    (b'{"op": "list"}', "invalid_request"),
    (b'{"op": "list", "topic": "t", "limit": 0}', "invalid_request"),
    (b'{"op": "list", "topic": "t", "limit": true}', "invalid_request"),
    (b'{"op": "list", "topic": "t", "after": "x:1"}', "invalid_request"),
    (b'{"op": "list", "topic": "t", "after": [1, 2]}', "invalid_request"),
    (b'{"op": "counts", "pad": "' + b"x" * 200 + b'"}', "too_large"),
]


@pytest.mark.parametrize(("body", "expected"), PARSE)
def test_parse_request(body: bytes, expected: wire.Request) -> None:
    assert wire.parse_request(body, max_bytes=100, list_max=1000) == expected


@pytest.mark.parametrize(("body", "code"), ERRORS)
def test_parse_request_errors(body: bytes, code: str) -> None:
    with pytest.raises(WireError) as err:
        wire.parse_request(body, max_bytes=100, list_max=1000)
    assert err.value.code == code
    assert json.loads(encode_error(err.value.code, err.value.message))["error"]["code"]


@given(st.integers(-(10**15), 10**15), st.integers(0, MAX_MID))
def test_cursor_round_trip(due: int, mid: int) -> None:
    assert wire.decode_cursor(wire.encode_cursor(due, mid)) == (due, mid)


# ---------------------------------------------------------------- topics (TOPIC_BY)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exchange", wire.TopicBy("exchange")),
        ("exchange+routing_key", wire.TopicBy("exchange+routing_key")),
        ("header:x-tenant", wire.TopicBy("header", "x-tenant")),
    ],
)
def test_topic_by_parses_the_three_forms_and_prints_them_back(text, expected) -> None:
    rule = wire.TopicBy.parse(text)
    assert rule == expected and str(rule) == text


@pytest.mark.parametrize(
    "text", ["", "Exchange", "routing_key", "header:", "header:x-delay", "header:" + "h" * 256]
)
def test_topic_by_refuses_anything_else_with_the_forms_named(text) -> None:
    with pytest.raises(ValueError, match=r"header"):
        wire.TopicBy.parse(text)


TENANT = wire.TopicBy("header", "x-tenant")


@pytest.mark.parametrize(
    ("rule", "routing_key", "headers", "topic"),
    [
        (wire.TopicBy("exchange"), "eu.created", {"x-tenant": "acme"}, "orders"),
        (wire.TopicBy("exchange+routing_key"), "eu.created", None, "orders/eu.created"),
        (wire.TopicBy("exchange+routing_key"), "", None, "orders/"),
        (TENANT, "rk", {"x-tenant": "acme"}, "acme"),
        (TENANT, "rk", {"x-tenant": b"acme"}, "acme"),
        (TENANT, "rk", {"x-tenant": 42}, "42"),
        (TENANT, "rk", {"x-tenant": True}, "orders"),
        (TENANT, "rk", {"x-tenant": ""}, "orders"),
        (TENANT, "rk", {"x-tenant": {"nested": 1}}, "orders"),
        (TENANT, "rk", {"x-tenant": "t" * 256}, "orders"),
        (TENANT, "rk", {"x-tenant": b"\xff"}, "orders"),
        (TENANT, "rk", {"other": "acme"}, "orders"),
        (TENANT, "rk", None, "orders"),
    ],
)
def test_topic_of(rule, routing_key, headers, topic) -> None:
    assert wire.topic_of(rule, "orders", routing_key, headers) == topic
