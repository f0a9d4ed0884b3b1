"""Pure parsing of what the ``delay`` worker reads and answers: ingress headers and control
requests. No I/O.

* ``parse_ingress`` turns the headers of a message published to ``delay.in`` into a
  ``Schedule`` (when, and into which exchange, to publish it) or a ``Reject`` whose ``reason``
  becomes the ``x-dead-reason`` header on ``delay.dead``. Time comes in as integer epoch
  milliseconds.
* ``topic_of`` names the message's *topic* (the seed's business topic: the lane it is sent
  by, and the name ``counts``, ``list`` and the metrics use) as ``BRIDGE_DELAY__TOPIC_BY``
  says: its target exchange, its exchange and routing key, or the value of a header.
* The control RPC on ``delay.control``: requests are JSON objects with ``reply_to`` and
  ``correlation_id``:

  - ``{"op": "cancel", "message_id": "..."}`` or ``{"op": "cancel", "key": "..."}``
  - ``{"op": "counts"}``
  - ``{"op": "list", "topic": "...", "limit": N, "after": "<cursor>" | null}``

  Errors come back as ``{"error": {"code": "...", "message": "..."}}``
  (:class:`bridge.errors.WireError`, the same for every worker).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.errors import WireError

X_DELAY = "x-delay"
X_DELIVER_AT = "x-deliver-at"
X_TARGET_EXCHANGE = "x-target-exchange"
X_DELAY_KEY = "x-delay-key"
CONTROL_HEADERS = (X_DELAY, X_DELIVER_AT, X_TARGET_EXCHANGE, X_DELAY_KEY)
# Set by the broker on a redelivery from the worker's quorum queue (delay.in): it counts the
# worker's deliveries, not the target's, and carried onward it would make the target's first
# delivery look like a redelivery (a consumer with a delivery limit would give up early).
BROKER_HEADERS = ("x-delivery-count",)
_NOT_CARRIED = frozenset(CONTROL_HEADERS + BROKER_HEADERS)

INVALID_DELAY = "invalid_delay"
AMBIGUOUS_DELAY = "ambiguous_delay"
MISSING_DELAY = "missing_delay"
MISSING_TARGET = "missing_target"
BEYOND_HORIZON = "beyond_horizon"
INVALID_KEY = "invalid_key"
INVALID_HEADERS = "invalid_headers"  # the data path could not decode them (bridge.amqp.frames)
# Every value ``Reject.reason`` can take, so metrics can pre-create their label set.
REJECT_REASONS = (
    INVALID_DELAY,
    AMBIGUOUS_DELAY,
    MISSING_DELAY,
    MISSING_TARGET,
    BEYOND_HORIZON,
    INVALID_KEY,
)

# AMQP shortstr limit: exchange names, and keys we may echo back in one.
_MAX_NAME_BYTES = 255
_MAX_DETAIL_VALUE = 100
# ASCII digits only: str.isdigit() and int() also accept other scripts' digits, "5_000" and
# surrounding whitespace, none of which a producer means as a delay.
_INT_TEXT = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, slots=True)
class Schedule:
    """Accepted: publish into ``exchange`` at ``due_ms``; ``key`` is for replace/cancel."""

    due_ms: int
    exchange: str
    key: str | None


@dataclass(frozen=True, slots=True)
class Reject:
    """Refused: ``reason`` is the ``x-dead-reason`` header, ``detail`` a sentence for humans."""

    reason: str
    detail: str


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_DETAIL_VALUE:
        text = text[: _MAX_DETAIL_VALUE - 3] + "..."
    return text


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    # pamqp hands some header strings over as bytes, depending on the producer's client.
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _as_int(value: object) -> int | None:
    # bool is an int subclass; True as "1 ms" would be a silent misreading.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = _as_text(value)
    if text is None or not _INT_TEXT.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than int() agrees to parse
        return None


def _as_name(value: object) -> str | None:
    text = _as_text(value)
    if not text or len(text.encode("utf-8")) > _MAX_NAME_BYTES:
        return None
    return text


def parse_ingress(
    headers: Mapping[str, object] | None,
    now_ms: int,
    *,
    horizon_ms: int,
    default_target: str | None,
) -> Schedule | Reject:
    """Decide what to do with a message from ``delay.in``.

    Checks run in this order and the first failure is reported: the delay headers, the
    horizon, the target exchange, the key. An ``x-deliver-at`` in the past is due now: late is
    better than dead-lettered, and the producer cannot fix a clock race anyway. A negative
    ``x-delay`` is due now too, as the delayed-message plugin treats it: the plugin stamps
    ``x-delay: -<delay>`` on every message it has delayed, so that one passed on (or routed
    into the worker by the plugin after ``delay migrate``) is not delayed twice.
    """
    h: Mapping[str, object] = headers if headers is not None else {}
    has_delay = X_DELAY in h
    has_at = X_DELIVER_AT in h
    if has_delay and has_at:
        return Reject(AMBIGUOUS_DELAY, "both x-delay and x-deliver-at are set; send only one")
    if has_delay:
        raw = h[X_DELAY]
        delay = _as_int(raw)
        if delay is None:
            return Reject(
                INVALID_DELAY,
                f"x-delay must be a whole number of milliseconds, got {_show(raw)}",
            )
        due_ms = now_ms + max(delay, 0)
    elif has_at:
        raw = h[X_DELIVER_AT]
        at = _as_int(raw)
        if at is None:
            return Reject(
                INVALID_DELAY,
                f"x-deliver-at must be whole epoch milliseconds, got {_show(raw)}",
            )
        due_ms = max(at, now_ms)
    else:
        return Reject(MISSING_DELAY, "neither x-delay nor x-deliver-at is set")

    if due_ms - now_ms > horizon_ms:
        return Reject(
            BEYOND_HORIZON,
            f"due in {_show(due_ms - now_ms)} ms, beyond the horizon of {horizon_ms} ms",
        )

    if X_TARGET_EXCHANGE in h:
        # An explicit but unusable target is refused even with a default configured: the
        # producer asked for a specific exchange, and the default is not what it meant.
        raw = h[X_TARGET_EXCHANGE]
        exchange = _as_name(raw)
        if exchange is None:
            return Reject(
                MISSING_TARGET,
                "x-target-exchange must be a non-empty exchange name of at most "
                f"{_MAX_NAME_BYTES} bytes, got {_show(raw)}",
            )
    elif default_target:
        exchange = default_target
    else:
        return Reject(
            MISSING_TARGET, "x-target-exchange is not set and no default target is configured"
        )

    key: str | None = None
    if X_DELAY_KEY in h:
        raw = h[X_DELAY_KEY]
        key = _as_name(raw)
        if key is None:
            return Reject(
                INVALID_KEY,
                f"x-delay-key must be a non-empty string of at most {_MAX_NAME_BYTES} bytes, "
                f"got {_show(raw)}",
            )
    return Schedule(due_ms=due_ms, exchange=exchange, key=key)


# --------------------------------------------------------------------------- topics

TOPIC_BY_EXCHANGE = "exchange"
TOPIC_BY_ROUTING_KEY = "exchange+routing_key"
TOPIC_BY_HEADER = "header:"
# Between the exchange and the routing key in an ``exchange+routing_key`` topic. Two pairs
# that print alike only share a lane; where each message goes is stored apart.
TOPIC_SEPARATOR = "/"


@dataclass(frozen=True, slots=True)
class TopicBy:
    """What names a message's topic: ``kind`` is ``exchange``, ``exchange+routing_key`` or
    ``header``; ``header`` is the header's name for the last."""

    kind: str
    header: str | None = None

    @classmethod
    def parse(cls, text: str) -> TopicBy:
        """``exchange`` | ``exchange+routing_key`` | ``header:<name>``; ValueError otherwise."""
        if text in (TOPIC_BY_EXCHANGE, TOPIC_BY_ROUTING_KEY):
            return cls(text)
        if text.startswith(TOPIC_BY_HEADER):
            name = text[len(TOPIC_BY_HEADER) :]
            if not name or len(name.encode("utf-8")) > _MAX_NAME_BYTES:
                raise ValueError(f"header:<name> needs a header name of 1..255 bytes, got {text!r}")
            if name in CONTROL_HEADERS:
                raise ValueError(f"{name} is a control header the worker strips; name another")
            return cls("header", name)
        raise ValueError(
            f"must be {TOPIC_BY_EXCHANGE!r}, {TOPIC_BY_ROUTING_KEY!r} or 'header:<name>' "
            f"(for example header:x-tenant), got {text!r}"
        )

    def __str__(self) -> str:
        return f"{TOPIC_BY_HEADER}{self.header}" if self.kind == "header" else self.kind


def topic_of(
    by: TopicBy, exchange: str, routing_key: str, headers: Mapping[str, object] | None
) -> str:
    """The topic of an accepted message, computed once at ingress and stored with it.

    ``header:<name>``: the header's value as text (a string, or an integer written in
    decimal); a message without it, or with a value that is neither or longer than 255 bytes,
    is in its target exchange's topic, as with ``exchange``.
    """
    if by.kind == TOPIC_BY_ROUTING_KEY:
        return f"{exchange}{TOPIC_SEPARATOR}{routing_key}"
    if by.kind == "header" and headers:
        raw = headers.get(by.header or "")
        value = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else _as_name(raw)
        if value is not None and len(value.encode("utf-8")) <= _MAX_NAME_BYTES:
            return value
    return exchange


def strip_control_headers(headers: Mapping[str, object] | None) -> dict[str, object]:
    """The headers to publish onward: everything the producer sent except ours and the
    ingress queue's delivery count."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k not in _NOT_CARRIED}


# --------------------------------------------------------------------------- control requests

OPS = ("cancel", "counts", "list")


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
        raise WireError(
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
    raise WireError("invalid_request", f"'after' must be a cursor from a reply, got {_short(raw)}")


def parse_request(body: bytes, *, max_bytes: int, list_max: int) -> Request:
    if len(body) > max_bytes:
        raise WireError("too_large", f"body of {len(body)} bytes exceeds {max_bytes}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WireError("bad_json", f"body is not JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise WireError("bad_json", "body must be a JSON object")
    op = doc.get("op")
    if op == "cancel":
        has_id, has_key = "message_id" in doc, "key" in doc
        if has_id == has_key:
            raise WireError("invalid_request", "cancel needs exactly one of 'message_id' and 'key'")
        field = "message_id" if has_id else "key"
        return Cancel(field, _name(doc, field))
    if op == "counts":
        return Counts()
    if op == "list":
        topic = _name(doc, "topic")
        limit = doc.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise WireError(
                "invalid_request", f"'limit' must be an integer >= 1, got {_short(limit)}"
            )
        return ListPending(topic, min(limit, list_max), decode_cursor(doc.get("after")))
    raise WireError("unknown_op", f"op {_short(op)} is not one of {', '.join(OPS)}")


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode()
