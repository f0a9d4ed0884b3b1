"""The data of the ``directed`` worker's pure core: what it records and what it answers.

- :class:`Detail` (one message's counters, never its content) and :class:`Buffer` (the batch a
  target has not acknowledged yet): the records the core keeps and the store persists;
- the journal: every state change of the core as an :data:`Op`, applied by the SQLite store
  in order in one transaction (:mod:`workers.directed.store`);
- the results of its events (:class:`SubmitResult`, :class:`PullResult`, :class:`MessageStatus`).

The core itself is :mod:`workers.directed.core`; its state and read-only queries are
:mod:`workers.directed.state`. No I/O and no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypedDict


class OverflowPolicy(enum.StrEnum):
    """What a submit does to a target whose queue already holds ``queue_limit`` live ids."""

    DROP_HEAD = "drop-head"
    REJECT = "reject"


@dataclass(slots=True)
class Detail:
    """Bookkeeping of one message; its content lives in the store under ``mid``.

    ``acked + expired + dropped + recalled + remaining == total`` at all times.
    """

    mid: int
    message_id: str
    total: int
    remaining: int
    acked: int = 0
    expired: int = 0
    dropped: int = 0
    created_ms: int = 0
    expires_at_ms: int | None = None
    # Set when the content may go (remaining reached 0, or the TTL passed); the Detail stays
    # as a tombstone for status queries and de-duplication until purged.
    done_ms: int | None = None
    # targets that had not acknowledged it when it was recalled
    recalled: int = 0

    @property
    def alive(self) -> bool:
        return self.done_ms is None


# At most this many message ids of a gap are kept (and reported in ``missed_ids``); the
# count ``missed`` goes on beyond.
MISSED_IDS_LIMIT = 100


@dataclass(slots=True, frozen=True)
class Buffer:
    """The batch last handed to a target, kept until the target echoes ``record_id``.

    ``missed``/``missed_ids``: the gap the batch reports (ids dropped or expired from the
    target's queue before it got them), acknowledged with the batch. A batch may carry a gap
    and no message."""

    record_id: str
    mids: tuple[int, ...]
    missed: int = 0
    missed_ids: tuple[str, ...] = ()


# -- journal ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class NewMessage:
    """A request was accepted; its counters start at ``remaining=total`` and 0 elsewhere."""

    mid: int
    message_id: str
    total: int
    created_ms: int
    expires_at_ms: int | None


@dataclass(slots=True, frozen=True)
class Enqueue:
    """``mid`` appended at the tail of ``target``'s queue under ``seq``.

    ``seq`` is the previous tail + 1, or 1 when the queue is empty.
    """

    target: str
    seq: int
    mid: int


@dataclass(slots=True, frozen=True)
class Dequeue:
    """Every entry of ``target`` with ``seq <= upto_seq`` is removed."""

    target: str
    upto_seq: int


@dataclass(slots=True, frozen=True)
class SetBuffer:
    """``target``'s batch is now this one, replacing the one it had. The replaced batch never
    reported a gap (a batch that did is ended by a :class:`ClearBuffer` first), so a batch
    without a gap has nothing to remove."""

    target: str
    record_id: str
    mids: tuple[int, ...]
    missed: int = 0
    missed_ids: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class SetGap:
    """The target's gap not yet handed out in a batch is now ``missed`` (absolute; 0 clears)."""

    target: str
    missed: int
    missed_ids: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class ClearBuffer:
    target: str


@dataclass(slots=True, frozen=True)
class Counts:
    """The new absolute counters of a detail (so replaying twice is harmless)."""

    mid: int
    remaining: int
    acked: int
    expired: int
    dropped: int
    recalled: int = 0


@dataclass(slots=True, frozen=True)
class DeleteContent:
    """No target needs the content any more; the detail stays as a tombstone."""

    mid: int
    done_ms: int


@dataclass(slots=True, frozen=True)
class Purge:
    """The tombstone is forgotten; its ``message_id`` may be submitted again."""

    mid: int


Op: TypeAlias = (
    NewMessage
    | Enqueue
    | Dequeue
    | SetBuffer
    | SetGap
    | ClearBuffer
    | Counts
    | DeleteContent
    | Purge
)


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SubmitResult:
    status: Literal["accepted", "duplicate", "rejected"]
    mid: int | None
    reason: str | None = None
    # (target, mid) pairs pushed out of full queues by this submit (drop-head policy).
    dropped: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True, frozen=True)
class PullResult:
    kind: Literal["fresh", "ack_fresh", "resend", "ack_only", "empty"]
    record_id: str | None  # None when nothing is buffered for the target after this pull
    mids: tuple[int, ...]  # alive messages to send; the adapter looks up their content
    redelivered: bool
    acked: tuple[int, ...]  # messages this pull acknowledged
    # the gap the batch reports: ids dropped or expired before the target got them
    missed: int = 0
    missed_ids: tuple[str, ...] = ()
    # ids of the batch's messages recalled after it was handed out (resend, acknowledgement)
    recalled_ids: tuple[str, ...] = ()


class MessageStatus(TypedDict):
    message_id: str
    total: int
    acked: int
    pending: int
    expired: int
    dropped: int
    recalled: int
    state: Literal["active", "done", "expired", "recalled"]
