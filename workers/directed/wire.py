"""What the directed worker reads, as pure functions: fan-out requests (headers or the JSON
envelope) and pulls (AMQP or HTTP). Control queries are parsed by
:mod:`~workers.directed.queries`, replies encoded by :mod:`~workers.directed.replies`.

No I/O here, so every malformed input can be tested without a broker. Parsers return a
value or raise :class:`~bridge.errors.WireError` carrying the code that goes into the error
reply or the ``x-dead-reason`` header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.errors import WireError
from bridge.errors import encode_error as encode_error  # the error reply, part of this contract
from workers.directed.config import (
    ENVELOPE_CONTENT_TYPE,
    H_TARGET_GROUPS,
    H_TARGETS,
    H_TTL,
    DirectedSettings,
)

# Header values nested this deep are refused: deeper tables and arrays cost recursion
# in every encoder and decoder that touches them (JSON, AMQP) and no real header needs them.
MAX_HEADER_DEPTH = 32
_ASCII_INT = re.compile(r"\s*-?[0-9]{1,18}\s*")


@dataclass(frozen=True, slots=True)
class Request:
    message_id: str
    targets: list[str]
    ttl_ms: int
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    groups: tuple[str, ...] = ()  # x-target-groups: resolved into targets when accepted


@dataclass(frozen=True, slots=True)
class Pull:
    topic: str
    record_id: str | None
    max: int
    wait_ms: int


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def strict_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def utf8_size(text: str) -> int | None:
    """Length in UTF-8, or None for text that has no UTF-8 form (a lone surrogate from a
    JSON escape such as ``"\\ud800"``)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return None


def check_header_depth(headers: Mapping[str, Any]) -> None:
    """Refuse header values nested deeper than :data:`MAX_HEADER_DEPTH` (iteratively, so a
    hostile depth cannot exhaust the recursion limit here)."""
    stack: list[tuple[Any, int]] = [(v, 1) for v in headers.values()]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth >= MAX_HEADER_DEPTH:
            raise WireError(
                "invalid_headers", f"header values nested {MAX_HEADER_DEPTH} levels deep or more"
            )
        stack.extend((child, depth + 1) for child in children)


def check_targets(raw: Any, settings: DirectedSettings) -> list[str]:
    if raw is None:
        raise WireError(
            "missing_targets", f"header {H_TARGETS} (array of target names) is required"
        )
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise WireError(
            "invalid_targets", f"{H_TARGETS} must be an array of strings, got {short(raw)}"
        )
    if not raw:
        raise WireError("empty_targets", f"{H_TARGETS} is an empty array")
    if len(raw) > settings.max_targets:
        raise WireError(
            "too_many_targets", f"{len(raw)} targets, more than the limit of {settings.max_targets}"
        )
    targets: list[str] = []
    for item in raw:
        name = _text(item)
        if name is None:
            raise WireError("invalid_targets", f"target {short(item)} is not a string")
        size = utf8_size(name)
        if size is None:
            raise WireError(
                "invalid_target_name", f"target {short(name)} is not valid Unicode text"
            )
        if not name or size > settings.max_target_length:
            raise WireError(
                "invalid_target_name",
                f"target names must be 1..{settings.max_target_length} bytes, got {short(name)}",
            )
        targets.append(name)
    return list(dict.fromkeys(targets))


def check_ttl(raw: Any, settings: DirectedSettings) -> int:
    if raw is None:
        return settings.default_ttl_ms
    value = strict_int(raw)
    if value is None:
        text = _text(raw)
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
        if text is not None and _ASCII_INT.fullmatch(text):
            value = int(text)
    if value is None or value <= 0:
        raise WireError("invalid_ttl", f"{H_TTL} must be a positive integer, got {short(raw)}")
    if value > settings.max_ttl_ms:
        raise WireError(
            "invalid_ttl", f"{H_TTL}={value} exceeds the limit of {settings.max_ttl_ms} ms"
        )
    return value


def content_digest(body: bytes, targets: Sequence[str], headers: Mapping[str, Any]) -> str:
    """Id of a request published without message_id (content-based de-duplication)."""
    h = hashlib.sha256()
    h.update(len(body).to_bytes(8, "big"))
    h.update(body)
    h.update(json.dumps(list(targets), ensure_ascii=False).encode())
    h.update(json.dumps(headers, sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()[:48]


def parse_request(
    *,
    body: bytes,
    headers: Mapping[str, Any] | None,
    content_type: str | None,
    message_id: str | None,
    settings: DirectedSettings,
) -> Request:
    headers = dict(headers or {})
    if len(body) > settings.max_body_bytes:
        raise WireError("oversized", f"body of {len(body)} bytes exceeds {settings.max_body_bytes}")
    if content_type == ENVELOPE_CONTENT_TYPE and H_TARGETS not in headers:
        body, content_type, raw_targets, extra = _parse_envelope(body)
        headers.update(extra)
    else:
        raw_targets = headers.get(H_TARGETS)
    check_header_depth(headers)
    raw_groups = headers.get(H_TARGET_GROUPS)
    groups = check_names(raw_groups, H_TARGET_GROUPS, settings) if raw_groups is not None else []
    # with groups, x-targets may be left out or empty
    no_targets = raw_targets is None or (isinstance(raw_targets, list | tuple) and not raw_targets)
    targets = [] if groups and no_targets else check_targets(raw_targets, settings)
    ttl = check_ttl(headers.get(H_TTL), settings)
    user_headers = {k: v for k, v in headers.items() if k not in (H_TARGETS, H_TTL)}
    if message_id is not None and not (0 < len(message_id) <= 255):
        raise WireError("invalid_message_id", "message_id must be 1..255 characters")
    mid = message_id or content_digest(body, targets, user_headers)
    return Request(mid, targets, ttl, body, content_type, user_headers, tuple(groups))


def check_names(raw: Any, field: str, settings: DirectedSettings) -> list[str]:
    """A non-empty array of group names (the rules of target names), duplicates removed."""
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes) or not raw:
        raise WireError("invalid_groups", f"{field} must be a non-empty array of group names")
    try:
        return check_targets(raw, settings)
    except WireError as exc:
        raise WireError("invalid_groups", f"{field}: {exc.message}") from None


def _parse_envelope(raw: bytes) -> tuple[bytes, str | None, Any, dict[str, Any]]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise WireError("invalid_envelope", f"envelope is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WireError("invalid_envelope", "envelope must be a JSON object")
    body_b64 = doc.get("body", "")
    if not isinstance(body_b64, str):
        raise WireError("invalid_envelope", "envelope 'body' must be a base64 string")
    try:
        body = base64.b64decode(body_b64, validate=True)
    except ValueError:
        raise WireError("invalid_envelope", "envelope 'body' is not valid base64") from None
    ctype = doc.get("content_type")
    if ctype is not None and not isinstance(ctype, str):
        raise WireError("invalid_envelope", "envelope 'content_type' must be a string")
    extra = doc.get("headers")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise WireError("invalid_envelope", "envelope 'headers' must be an object")
    if "target_groups" in doc:
        extra[H_TARGET_GROUPS] = doc["target_groups"]
    if "ttl_ms" in doc:
        extra[H_TTL] = doc["ttl_ms"]
    return body, ctype, doc.get("targets"), extra


def parse_json_object(body: bytes, settings: DirectedSettings) -> dict[str, Any]:
    if len(body) > settings.max_pull_bytes:
        raise WireError("too_large", f"body of {len(body)} bytes exceeds {settings.max_pull_bytes}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WireError("bad_json", f"body is not JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise WireError("invalid_pull", "body must be a JSON object")
    return doc


def parse_pull(body: bytes, routing_key: str | None, settings: DirectedSettings) -> Pull:
    """A pull from the pull exchange: ``topic`` is required and equals the routing key
    (unless the exchange is a fanout)."""
    doc = parse_json_object(body, settings)
    check = settings.pull_exchange_type != "fanout" and routing_key
    return _pull_fields(doc, routing_key if check else None, settings)


def parse_http_pull(body: bytes, target: str, settings: DirectedSettings) -> Pull:
    """A pull of ``POST /directed/v1/targets/{target}/pull``: the AMQP pull's body, with
    ``topic`` optional and, if given, equal to ``target``."""
    doc = parse_json_object(body, settings)
    doc.setdefault("topic", target)
    return _pull_fields(doc, target, settings)


def _pull_fields(doc: dict[str, Any], expected: str | None, settings: DirectedSettings) -> Pull:
    op = doc.get("op", "pull")
    if op != "pull":
        raise WireError(
            "unknown_op", f"op {short(op)} is not supported on the pull exchange (use 'pull')"
        )
    topic = doc.get("topic")
    if topic is None:
        raise WireError("invalid_pull", "field 'topic' (the target name) is required")
    size = utf8_size(topic) if isinstance(topic, str) else None
    if size is None or not topic or size > settings.max_target_length:
        raise WireError(
            "invalid_pull",
            f"'topic' must be a non-empty string of 1..{settings.max_target_length} UTF-8 bytes,"
            f" got {short(topic)}",
        )
    if expected and expected != topic:
        raise WireError(
            "topic_mismatch",
            f"addressed to {expected!r} (routing key or URL path) but 'topic' is {topic!r}; "
            "use the target name for both",
        )
    record_id = doc.get("record_id")
    if record_id is not None and (not isinstance(record_id, str) or len(record_id) > 128):
        raise WireError(
            "invalid_pull", f"'record_id' must be a string or null, got {short(record_id)}"
        )
    max_n = doc.get("max", settings.default_max)
    if strict_int(max_n) is None or max_n < 0:
        raise WireError("invalid_pull", f"'max' must be an integer >= 0, got {short(max_n)}")
    wait_ms = doc.get("wait_ms", 0)
    if strict_int(wait_ms) is None or wait_ms < 0:
        raise WireError("invalid_pull", f"'wait_ms' must be an integer >= 0, got {short(wait_ms)}")
    return Pull(
        topic, record_id, min(max_n, settings.max_batch), min(wait_ms, settings.max_wait_ms)
    )
