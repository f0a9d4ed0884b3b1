"""The delay control RPC as pure functions: request parsing, cursors and replies.

Requests are JSON objects published to ``delay.control`` with ``reply_to`` and
``correlation_id``:

- ``{"op": "cancel", "message_id": "..."}`` or ``{"op": "cancel", "key": "..."}``
- ``{"op": "counts"}``
- ``{"op": "list", "topic": "...", "limit": N, "after": "<cursor>" | null}``

Errors come back as ``{"error": {"code": "...", "message": "..."}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPS = ("cancel", "counts", "list")


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Cancel:
    by: str  # "message_id" | "key"
    value: str


@dataclass(frozen=True, slots=True)
class Counts:
    pass


@dataclass(frozen=True, slots=True)
class ListPending:
    topic: str
    limit: int
    after: tuple[int, int] | None


Request = Cancel | Counts | ListPending


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _name(doc: dict[str, Any], field: str) -> str:
    value = doc.get(field)
    if not isinstance(value, str) or not value or len(value.encode()) > 255:
        raise ControlError(
            "invalid_request", f"'{field}' must be a non-empty string, got {_short(value)}"
        )
    return value


def encode_cursor(due_ms: int, mid: int) -> str:
    return f"{due_ms}:{mid}"


def decode_cursor(raw: Any) -> tuple[int, int] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        due, sep, mid = raw.partition(":")
        if sep and due.lstrip("-").isdigit() and mid.isdigit():
            return int(due), int(mid)
    raise ControlError(
        "invalid_request", f"'after' must be a cursor from a reply, got {_short(raw)}"
    )


def parse_request(body: bytes, *, max_bytes: int, list_max: int) -> Request:
    if len(body) > max_bytes:
        raise ControlError("too_large", f"body of {len(body)} bytes exceeds {max_bytes}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ControlError("bad_json", f"body is not JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise ControlError("bad_json", "body must be a JSON object")
    op = doc.get("op")
    if op == "cancel":
        has_id, has_key = "message_id" in doc, "key" in doc
        if has_id == has_key:
            raise ControlError(
                "invalid_request", "cancel needs exactly one of 'message_id' and 'key'"
            )
        field = "message_id" if has_id else "key"
        return Cancel(field, _name(doc, field))
    if op == "counts":
        return Counts()
    if op == "list":
        topic = _name(doc, "topic")
        limit = doc.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ControlError(
                "invalid_request", f"'limit' must be an integer >= 1, got {_short(limit)}"
            )
        return ListPending(topic, min(limit, list_max), decode_cursor(doc.get("after")))
    raise ControlError("unknown_op", f"op {_short(op)} is not one of {', '.join(OPS)}")


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def encode_error(code: str, message: str) -> bytes:
    return dumps({"error": {"code": code, "message": message}})
