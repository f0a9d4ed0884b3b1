"""The control queries of the directed worker (``directed.control``), as pure functions:
their parsing, and how the answers of several shards make one.

- ``{"op": "status", "message_id": ...}`` / ``{"op": "status", "target": ...}``
- ``{"op": "recall", "message_id": ...}``
- ``{"op": "pending_targets", "message_id": ..., "cursor": ..., "limit": ...}``
- ``{"op": "stats"}``
- ``{"op": "group_set" | "group_add" | "group_remove" | "group_get", "group": ..., ...}``

A sharded worker answers a query on the shared control queue with its own answer merged with
the other shards' (asked with ``"local": true``): :func:`total_status`, :func:`total_stats`,
:func:`pending_page`. No I/O; refusals are :class:`~bridge.errors.WireError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.errors import WireError
from workers.directed.config import DirectedSettings
from workers.directed.wire import check_targets, short, strict_int, utf8_size


@dataclass(frozen=True, slots=True)
class GroupChange:
    op: str
    group: str
    targets: list[str]


GROUP_OPS = ("group_set", "group_add", "group_remove", "group_get")


def parse_group_change(doc: Mapping[str, Any], settings: DirectedSettings) -> GroupChange:
    """``{"op": "group_set" | "group_add" | "group_remove", "group": ..., "targets": [...]}``
    or ``{"op": "group_get", "group": ...}``."""
    op = doc.get("op")
    group = doc.get("group")
    size = utf8_size(group) if isinstance(group, str) else None
    if size is None or not group or size > settings.max_target_length:
        raise WireError(
            "invalid_query",
            f"'group' must be a string of 1..{settings.max_target_length} bytes, got {short(group)}",
        )
    if op == "group_get":
        return GroupChange("group_get", group, [])
    raw = doc.get("targets")
    if op == "group_set" and isinstance(raw, list) and not raw:
        return GroupChange("group_set", group, [])  # an empty set deletes the group
    try:
        targets = check_targets(raw, settings)
    except WireError as exc:
        raise WireError("invalid_query", f"'targets': {exc.message}") from None
    return GroupChange(str(op), group, targets)


@dataclass(frozen=True, slots=True)
class PendingTargets:
    message_id: str
    cursor: str | None
    limit: int


PENDING_TARGETS_MAX_LIMIT = 1000


def parse_pending_targets(doc: Mapping[str, Any]) -> PendingTargets:
    """``{"op": "pending_targets", "message_id": ..., "cursor": ..., "limit": ...}``: the
    cursor is the last target name of the previous page (null for the first page)."""
    message_id = doc.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise WireError("invalid_query", "'message_id' (string) is required")
    cursor = doc.get("cursor")
    if cursor is not None and (not isinstance(cursor, str) or utf8_size(cursor) is None):
        raise WireError("invalid_query", f"'cursor' must be a string or null, got {short(cursor)}")
    limit = doc.get("limit", 100)
    if strict_int(limit) is None or not 1 <= limit <= PENDING_TARGETS_MAX_LIMIT:
        raise WireError(
            "invalid_query",
            f"'limit' must be an integer 1..{PENDING_TARGETS_MAX_LIMIT}, got {short(limit)}",
        )
    return PendingTargets(message_id, cursor, limit)


def message_id_of(doc: Mapping[str, Any], *, max_length: int | None = None) -> str:
    """The ``message_id`` a status or recall names (at most ``max_length`` characters)."""
    message_id = doc.get("message_id")
    if not isinstance(message_id, str) or (
        max_length is not None and not 0 < len(message_id) <= max_length
    ):
        raise WireError("invalid_query", "'message_id' (string) is required")
    return message_id


def not_found(message_id: str) -> WireError:
    return WireError("not_found", f"no message {message_id!r} (never seen, or purged)")


def total_status(parts: list[dict[str, Any]], missing: list[int]) -> dict[str, Any] | None:
    """One message's status summed over the shards that hold it (``parts``); None when no
    shard does and every shard answered."""
    if not parts:
        if missing:
            raise WireError(
                "shards_unavailable",
                f"not found on the shards that answered; shards {missing} did not answer "
                "in time: retry later",
            )
        return None
    total: dict[str, Any] = {"message_id": parts[0].get("message_id")}
    for key in ("total", "acked", "pending", "expired", "dropped", "recalled"):
        total[key] = sum(int(p.get(key, 0)) for p in parts)
    states = {p.get("state") for p in parts}
    total["state"] = (
        "active"
        if "active" in states
        else "recalled"
        if "recalled" in states
        else "expired"
        if states == {"expired"}
        else "done"
    )
    total["shards"] = {"holding": len(parts), "unanswered": missing}
    return total


def total_stats(parts: list[dict[str, Any]], missing: list[int]) -> dict[str, Any]:
    """The summary counts of the shards that answered, added up."""
    total: dict[str, Any] = {
        key: sum(int(p.get(key, 0) or 0) for p in parts)
        for key in ("messages", "targets", "commits")
    }
    total["shards"] = {"answered": len(parts), "unanswered": missing}
    return total


def pending_page(
    query: PendingTargets,
    own: tuple[list[str], bool] | None,
    others: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The page of pending targets: this shard's (``own``, None for an unknown message) and
    the other shards' replies merged in name order, cut at the query's limit."""
    names, more = own if own is not None else ([], False)
    known = own is not None
    for reply in others:
        part = reply.get("pending_targets")
        if isinstance(part, dict):
            known = True
            names += part.get("targets", [])
            more = more or part.get("cursor") is not None
    names.sort()
    if len(names) > query.limit:
        names, more = names[: query.limit], True
    if not known:
        raise not_found(query.message_id)
    return {
        "message_id": query.message_id,
        "targets": names,
        "cursor": names[-1] if more and names else None,
    }
