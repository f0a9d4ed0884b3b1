"""Hardening of the AMQP frame decoder against invalid UTF-8 from other clients.

pamqp decodes header table keys and short strings (``content_type``, ``message_id``, ...)
with strict UTF-8 inside the connection's frame reader. One message with a non-UTF-8 header
key therefore raised ``UnicodeDecodeError`` there, the connection dropped, the broker
redelivered the message, and the worker looped on it forever. Here such bytes decode with
U+FFFD replacement instead, so the message reaches the worker, which answers or dead-letters
it like any other bad input. Installed once when :mod:`bridge.amqp` is imported.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import common, decode

_installed = False


def _field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    try:
        return _strict_field_table(value)
    except UnicodeDecodeError:
        pass
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "replace")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        return _strict_short_str(value)
    except UnicodeDecodeError:
        length = common.Struct.byte.unpack(value[0:1])[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "replace")


_strict_field_table = decode.field_table
_strict_short_str = decode.short_str


def install() -> None:
    global _installed
    if _installed:
        return
    decode.METHODS["table"] = _field_table
    decode.METHODS["shortstr"] = _short_str
    decode.TABLE_MAPPING[b"F"] = _field_table
    _installed = True
