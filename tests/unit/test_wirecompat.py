"""Invalid UTF-8 in frames from other clients decodes with replacement instead of raising."""

from __future__ import annotations

import struct

from pamqp import decode

import bridge.amqp  # noqa: F401  (installs the tolerant decoders)


def _table(raw_key: bytes, value: bytes) -> bytes:
    body = bytes([len(raw_key)]) + raw_key + b"S" + struct.pack(">I", len(value)) + value
    return struct.pack(">I", len(body)) + body


def test_non_utf8_table_key_is_replaced_not_raised():
    consumed, table = decode.by_type(_table(b"\xff\xfe", b"v"), "table")
    assert table == {"\ufffd\ufffd": b"v"} or table == {"\ufffd\ufffd": "v"}
    assert consumed == len(_table(b"\xff\xfe", b"v"))


def test_valid_tables_are_unchanged():
    _, table = decode.by_type(_table(b"x-targets", b"abc"), "table")
    assert table == {"x-targets": "abc"}


def test_non_utf8_short_string_is_replaced():
    consumed, text = decode.by_type(bytes([2]) + b"\xc3\x28", "shortstr")
    assert consumed == 3 and text == "\ufffd("
