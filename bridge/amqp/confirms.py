"""Publisher confirms without I/O: which publish each broker answer settles, and how.

One :class:`ConfirmTracker` per confirm-mode channel. The publisher tells it what it wrote
(:meth:`~ConfirmTracker.sent`, in write order: the broker numbers its confirms by the
publishes it receives), and feeds it what the broker said; each call returns the publishes
it settled as ``(token, None)`` for a confirmed publish or ``(token, PublishFailed)``.
Every publish gets exactly one outcome (tests/unit/amqp/test_confirms.py checks it as a
state machine).

This is the one place that maps broker outcomes to :class:`~bridge.errors.PublishFailed`
reasons:

- ``unroutable``: returned under ``mandatory`` (``basic.return``, then its ack);
- ``exchange_not_found``: the broker closed the channel with 404 naming its exchange;
- ``access_refused``: the broker closed the channel with 403 naming its exchange;
- ``nacked``: ``basic.nack`` (the broker could not take responsibility for it);
- ``timeout``: no answer within the timeout (:meth:`~ConfirmTracker.expire`);
- ``connection_lost``: the channel or connection went before an answer (the publish may or
  may not have been routed: the caller retries, and consumers may see it twice).

Returns carry no delivery tag. RabbitMQ sends a publish's ``basic.return`` before its
``basic.ack`` and handles a channel's publishes in order, so the n-th return belongs to a
publish after the one the previous return matched, and to one not yet confirmed: the
tracker takes the first such publish with the same exchange, routing key and message id.
Two unconfirmed publishes with the same exchange, routing key and message id of which only
the later was unroutable (a binding removed between the two) would be told apart wrongly;
nothing else is ambiguous.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from bridge.errors import PublishFailed

UNROUTABLE = "unroutable"
EXCHANGE_NOT_FOUND = "exchange_not_found"
ACCESS_REFUSED = "access_refused"
NACKED = "nacked"
TIMEOUT = "timeout"
CONNECTION_LOST = "connection_lost"
REASONS = (UNROUTABLE, EXCHANGE_NOT_FOUND, ACCESS_REFUSED, NACKED, TIMEOUT, CONNECTION_LOST)

Outcome = tuple[Any, PublishFailed | None]


class _Pending:
    __slots__ = ("exchange", "message_id", "returned", "routing_key", "sent_at", "tag", "token")

    def __init__(
        self,
        tag: int,
        token: Any,
        exchange: str,
        routing_key: str,
        message_id: str | None,
        sent_at: float,
    ) -> None:
        self.tag = tag
        self.token = token
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.sent_at = sent_at
        self.returned: str | None = None  # the return's reply text, once matched


class ConfirmTracker:
    """Delivery tags of one confirm-mode channel (see the module)."""

    __slots__ = ("_by_tag", "_last_returned", "_next_tag", "_pending")

    def __init__(self) -> None:
        self._next_tag = 1
        self._pending: deque[_Pending] = deque()  # in tag order; settled ones are skipped
        self._by_tag: dict[int, _Pending] = {}
        self._last_returned = 0

    def __len__(self) -> int:
        """Publishes written and not settled yet."""
        return len(self._by_tag)

    def sent(
        self,
        token: Any,
        exchange: str,
        routing_key: str,
        message_id: str | None = None,
        now: float = 0.0,
    ) -> int:
        """Record a publish just written; returns its delivery tag."""
        tag = self._next_tag
        self._next_tag = tag + 1
        # "" as None: a publish's empty message id is not sent, its return has none
        entry = _Pending(tag, token, exchange, routing_key, message_id or None, now)
        self._pending.append(entry)
        self._by_tag[tag] = entry
        return tag

    def oldest(self) -> float | None:
        """When the oldest unsettled publish was written."""
        self._trim()
        return self._pending[0].sent_at if self._pending else None

    def on_ack(self, tag: int, multiple: bool) -> list[Outcome]:
        return self._settle(tag, multiple, nack=False)

    def on_nack(self, tag: int, multiple: bool) -> list[Outcome]:
        return self._settle(tag, multiple, nack=True)

    def on_return(
        self, reply_code: int, reply_text: str, exchange: str, routing_key: str, message_id: Any
    ) -> bool:
        """A ``basic.return``; its publish fails as ``unroutable`` at its ack. False if no
        unconfirmed publish matches (a return for a publish already given up)."""
        mid = message_id if message_id else None
        for entry in self._pending:
            if entry.tag <= self._last_returned or entry.tag not in self._by_tag:
                continue
            if (
                entry.returned is None
                and entry.exchange == exchange
                and entry.routing_key == routing_key
                and entry.message_id == mid
            ):
                entry.returned = f"{reply_code} {reply_text}"
                self._last_returned = entry.tag
                return True
        return False

    def on_channel_closed(
        self, reply_code: int, reply_text: str
    ) -> tuple[list[Outcome], list[Any]]:
        """The broker closed the channel: returns the failed publishes and the tokens of
        those to write again (in write order) on the reopened channel.

        When a 404/403 names an exchange, the first unsettled publish to it is what the
        broker refused: it and every later one to that exchange fail with
        ``exchange_not_found``/``access_refused``; the publishes before it were processed
        and may have been routed, their confirm lost (``connection_lost``); the others after
        it were discarded unread by the broker (it ignores a closing channel's frames), so
        they are to be written again. Any other close fails every unsettled publish with
        ``connection_lost``. Tags start again at 1 on the reopened channel."""
        text = reply_text or ""
        entries = self._drain()
        refused = None
        if reply_code in (403, 404):
            refused = next(
                (e.exchange for e in entries if f"exchange '{e.exchange}'" in text), None
            )
        failed: list[Outcome] = []
        resend: list[Any] = []
        seen = False
        for entry in entries:
            if refused is not None and entry.exchange == refused:
                seen = True
                reason = EXCHANGE_NOT_FOUND if reply_code == 404 else ACCESS_REFUSED
                failed.append((entry.token, PublishFailed(reason, f"channel closed: {text}")))
            elif seen:
                resend.append(entry.token)
            else:
                failed.append(
                    (entry.token, PublishFailed(CONNECTION_LOST, f"channel closed: {text}"))
                )
        return failed, resend

    def on_connection_lost(self, why: str = "connection lost") -> list[Outcome]:
        """The connection went: every unsettled publish fails with ``connection_lost``."""
        return [
            (entry.token, PublishFailed(CONNECTION_LOST, f"{why} before the broker confirmed"))
            for entry in self._drain()
        ]

    def expire(self, now: float, timeout: float) -> list[Outcome]:
        """Fail the publishes written more than ``timeout`` ago with ``timeout``; a late
        confirm of one of them is ignored."""
        outcomes: list[Outcome] = []
        pending = self._pending
        while pending:
            entry = pending[0]
            if entry.tag not in self._by_tag:
                pending.popleft()
                continue
            if now - entry.sent_at <= timeout:
                break
            pending.popleft()
            del self._by_tag[entry.tag]
            outcomes.append(
                (entry.token, PublishFailed(TIMEOUT, f"no confirm within {timeout:g}s"))
            )
        return outcomes

    # -- internals ---------------------------------------------------------------------

    def _settle(self, tag: int, multiple: bool, *, nack: bool) -> list[Outcome]:
        outcomes: list[Outcome] = []
        by_tag = self._by_tag
        if multiple:
            pending = self._pending
            while pending and pending[0].tag <= tag:
                entry = pending.popleft()
                if by_tag.pop(entry.tag, None) is not None:
                    outcomes.append((entry.token, _result(entry, nack)))
        else:
            single = by_tag.pop(tag, None)
            if single is not None:
                outcomes.append((single.token, _result(single, nack)))
                self._trim()
        return outcomes

    def _trim(self) -> None:
        pending = self._pending
        while pending and pending[0].tag not in self._by_tag:
            pending.popleft()

    def _drain(self) -> list[_Pending]:
        entries = [e for e in self._pending if e.tag in self._by_tag]
        self._pending = deque()
        self._by_tag = {}
        self._next_tag = 1
        self._last_returned = 0
        return entries


def _result(entry: _Pending, nack: bool) -> PublishFailed | None:
    if entry.returned is not None:
        return PublishFailed(
            UNROUTABLE,
            f"{entry.returned}: exchange {entry.exchange!r}, routing key {entry.routing_key!r}",
        )
    if nack:
        return PublishFailed(NACKED, "the broker nacked the publish")
    return None
