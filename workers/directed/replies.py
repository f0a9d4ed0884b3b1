"""What the directed worker answers, as pure functions: a pull's reply (JSON, or the binary
form with unencoded bodies for HTTP) and the JSON of the control replies. No I/O.

Error replies are :func:`bridge.errors.encode_error` (``{"error": {"code", "message"}}``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """A message of a reply, before encoding."""

    id: str
    body: bytes
    props: Mapping[str, Any]


def encode_reply(
    topic: str,
    record_id: str | None,
    redelivered: bool,
    messages: Sequence[bytes],
    *,
    missed: int = 0,
    missed_ids: Sequence[str] = (),
    recalled_ids: Sequence[str] = (),
) -> bytes:
    """A pull's reply, its ``messages`` already encoded (:func:`encode_message`, done once per
    message and shared by every target that pulls it); ``missed``/``missed_ids`` only when
    the batch reports a gap, ``recalled`` only when messages of the batch were recalled after
    it was handed out. The bytes are those of ``json.dumps`` of the whole reply with
    ``separators=(",", ":")``, the keys in the order of :func:`_reply_head`."""
    head = json_dumps({"topic": topic, "record_id": record_id, "redelivered": redelivered})
    tail: dict[str, Any] = {}
    if missed:
        tail["missed"] = missed
        tail["missed_ids"] = list(missed_ids)
    if recalled_ids:
        tail["recalled"] = list(recalled_ids)
    end = b"," + json_dumps(tail)[1:] if tail else b"}"
    return b"".join((head[:-1], b',"messages":[', b",".join(messages), b"]", end))


def encode_binary_reply(
    topic: str,
    record_id: str | None,
    redelivered: bool,
    messages: Sequence[Message],
    *,
    missed: int = 0,
    missed_ids: Sequence[str] = (),
    recalled_ids: Sequence[str] = (),
) -> bytes:
    """The reply as :data:`BINARY_REPLY_CONTENT_TYPE`: a 4-byte big-endian length, that many
    bytes of the JSON reply whose messages carry ``"length"`` instead of ``"body"``, then the
    messages' bodies one after the other, unencoded."""
    head = _reply_head(topic, record_id, redelivered, missed, missed_ids, recalled_ids)
    head["messages"] = [
        {
            "id": m.id,
            "length": len(m.body),
            "content_type": m.props.get("content_type"),
            "headers": m.props.get("headers") or {},
        }
        for m in messages
    ]
    return _binary(head, [m.body for m in messages])


def json_reply_to_binary(doc: Mapping[str, Any]) -> bytes:
    """A JSON reply (another shard's) in the binary form."""
    head = dict(doc)
    bodies = []
    head["messages"] = []
    for m in doc.get("messages", []):
        body = base64.b64decode(m.get("body", ""))
        bodies.append(body)
        head["messages"].append(
            {**{k: v for k, v in m.items() if k != "body"}, "length": len(body)}
        )
    return _binary(head, bodies)


def decode_binary_reply(data: bytes) -> dict[str, Any]:
    """The binary form read back into a reply whose messages carry ``body`` as bytes."""
    size = int.from_bytes(data[:4], "big")
    head = json.loads(data[4 : 4 + size])
    offset = 4 + size
    for m in head["messages"]:
        m["body"] = data[offset : offset + m["length"]]
        offset += m.pop("length")
    if offset != len(data):
        raise ValueError(f"binary reply: {len(data) - offset} bytes after the last body")
    return dict(head)


def _binary(head: dict[str, Any], bodies: list[bytes]) -> bytes:
    encoded = json.dumps(head, separators=(",", ":"), default=str).encode()
    return b"".join([len(encoded).to_bytes(4, "big"), encoded, *bodies])


def _reply_head(
    topic: str,
    record_id: str | None,
    redelivered: bool,
    missed: int,
    missed_ids: Sequence[str],
    recalled_ids: Sequence[str],
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "topic": topic,
        "record_id": record_id,
        "redelivered": redelivered,
        "messages": [],
    }
    if missed:
        doc["missed"] = missed
        doc["missed_ids"] = list(missed_ids)
    if recalled_ids:
        doc["recalled"] = list(recalled_ids)
    return doc


def encode_message(message_id: str, body: bytes, props: Mapping[str, Any]) -> bytes:
    """One message of a JSON reply, encoded: its id, base64 body, content type and headers."""
    return json_dumps(
        {
            "id": message_id,
            "body": base64.b64encode(body).decode("ascii"),
            "content_type": props.get("content_type"),
            "headers": props.get("headers") or {},
        }
    )


def json_safe(value: Any) -> Any:
    """AMQP header values (bytes, datetimes, decimals) as JSON-friendly values: how a
    request's headers are stored, to be sent with the message in replies."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def json_dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode()
