"""The one dead-letter shape of every worker (bridge.amqp.messages.dead_letter_properties),
without a broker: what a dead letter carries, and that headers which cannot be decoded or
written again never keep a dead letter from being written."""

from __future__ import annotations

import struct

from bridge.amqp import frames as F
from bridge.amqp.messages import dead_letter_properties
from bridge.amqp.poison import H_DEAD_DETAIL, H_DEAD_REASON


def delivery(props: F.Properties) -> F.Delivery:
    d = F.Delivery()
    d.raw_properties = props.encode()
    d.properties = F.Properties.decode(d.raw_properties)
    d.body = b"body"
    return d


def nested_headers(depth: int) -> bytes:
    """Property bytes whose headers table nests ``depth`` tables: the decoder refuses it."""
    table = b""
    for _ in range(depth):
        inner = b"\x01aF" + struct.pack(">I", len(table)) + table
        table = inner
    flags = struct.pack(">H", 1 << 13)  # headers only
    return flags + struct.pack(">I", len(table)) + table


def test_a_dead_letter_is_persistent_and_carries_its_headers_reason_and_detail() -> None:
    d = delivery(F.Properties(message_id="m", delivery_mode=1, headers={"tenant": "a"}))
    out = dead_letter_properties(d, "no_target", "x" * 600, extra={"x-shard": 1})
    assert out.delivery_mode == 2 and out.message_id == "m"
    assert out.headers == {
        "tenant": "a",
        H_DEAD_REASON: "no_target",
        H_DEAD_DETAIL: "x" * 500,
        "x-shard": 1,
    }
    assert F.Properties.decode(out.encode()).headers == out.headers


def test_no_detail_means_no_detail_header_and_other_properties_can_change() -> None:
    d = delivery(F.Properties(reply_to="q", expiration="100", headers={"k": 1}))
    out = dead_letter_properties(d, "gone", None, reply_to=None, expiration=None)
    assert out.headers == {"k": 1, H_DEAD_REASON: "gone"}
    assert out.reply_to is None and out.expiration is None


def test_headers_that_could_not_be_decoded_are_replaced_by_the_reason_and_a_detail() -> None:
    d = F.Delivery()
    d.raw_properties = nested_headers(F.MAX_DEPTH + 10)
    d.properties = F.Properties.decode(d.raw_properties)
    assert d.properties.error  # the decoder refused the table, not the whole delivery
    out = dead_letter_properties(d, "invalid_headers", "not decodable")
    assert out.headers[H_DEAD_REASON] == "invalid_headers"
    assert out.headers[H_DEAD_DETAIL].startswith("not decodable (original headers dropped: ")
    assert set(out.headers) == {H_DEAD_REASON, H_DEAD_DETAIL}
    out.encode()
    # with no detail of its own, the detail says only what was dropped
    alone = dead_letter_properties(d, "gone", None)
    assert alone.headers[H_DEAD_DETAIL].startswith("original headers dropped: ")


def test_headers_that_cannot_be_written_again_are_dropped_not_fatal() -> None:
    d = delivery(F.Properties(message_id="m", headers={"k": 1}))
    d.properties.headers = {"k": object()}  # no AMQP type holds it
    out = dead_letter_properties(d, "processing_failed", "boom", extra={"x-dead-exception": "E"})
    assert out.headers == {
        H_DEAD_REASON: "processing_failed",
        H_DEAD_DETAIL: "boom (original headers dropped: property headers: no AMQP field type for object)",
        "x-dead-exception": "E",
    }
    assert out.message_id == "m"
    out.encode()
