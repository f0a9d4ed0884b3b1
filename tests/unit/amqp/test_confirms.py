"""bridge.amqp.confirms: every publish gets exactly one outcome, with the right reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from bridge.amqp import confirms
from bridge.amqp.confirms import (
    ACCESS_REFUSED,
    CONNECTION_LOST,
    EXCHANGE_NOT_FOUND,
    NACKED,
    TIMEOUT,
    UNROUTABLE,
    ConfirmTracker,
)
from bridge.errors import PublishFailed

EXCHANGES = ["", "a", "ab", "orders", "a b", "ünï", "x.y"]
ROUTING_KEYS = ["", "k", "k2", "q.1"]
MESSAGE_IDS = [None, "", "m1", "m2"]
PUBLISH_KEYS = st.tuples(
    st.sampled_from(EXCHANGES), st.sampled_from(ROUTING_KEYS), st.sampled_from(MESSAGE_IDS)
)


def reasons(outcomes: list[confirms.Outcome]) -> dict[Any, str | None]:
    """token -> reason (None for a confirmed publish)."""
    out: dict[Any, str | None] = {}
    for token, failure in outcomes:
        assert token not in out
        assert failure is None or isinstance(failure, PublishFailed)
        out[token] = None if failure is None else failure.reason
    return out


def not_found(exchange: str) -> str:
    return f"NOT_FOUND - no exchange '{exchange}' in vhost '/'"


def refused(exchange: str) -> str:
    return f"ACCESS_REFUSED - write access to exchange '{exchange}' in vhost '/' refused for user 'guest'"


# -- the state machine ---------------------------------------------------------------------


@dataclass
class Publish:
    token: int
    tag: int
    exchange: str
    routing_key: str
    message_id: str | None
    sent_at: float
    returned: bool = False


class TrackerMachine(RuleBasedStateMachine):
    """The tracker against a model of what the broker's answers mean."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = ConfirmTracker()
        self.now = 0.0
        self.next_token = 0
        self.next_tag = 1
        self.unsettled: dict[int, Publish] = {}  # by tag
        self.last_returned = 0  # tag of the publish the last return matched
        self.sent_tokens: list[int] = []
        self.settled: dict[int, str | None] = {}  # token -> reason

    # -- helpers

    def settle(self, outcomes: list[confirms.Outcome], expected: dict[int, str | None]) -> None:
        got = reasons(outcomes)
        for token in got:
            assert token not in self.settled, f"publish {token} settled twice"
        assert got == expected
        self.settled.update(got)
        for tag in [t for t, p in self.unsettled.items() if p.token in got]:
            del self.unsettled[tag]

    def answered(self, publish: Publish, nack: bool) -> str | None:
        if publish.returned:
            return UNROUTABLE
        return NACKED if nack else None

    def drained(self) -> None:
        assert len(self.tracker) == 0
        assert self.tracker.oldest() is None
        self.unsettled = {}
        self.next_tag = 1
        self.last_returned = 0

    # -- rules

    @rule(publishes=st.lists(PUBLISH_KEYS, min_size=1, max_size=4))
    def sent(self, publishes: list[tuple[str, str, str | None]]) -> None:
        for exchange, routing_key, message_id in publishes:
            self.send(exchange, routing_key, message_id)

    def send(self, exchange: str, routing_key: str, message_id: str | None) -> None:
        token = self.next_token
        self.next_token += 1
        tag = self.tracker.sent(token, exchange, routing_key, message_id, now=self.now)
        assert tag == self.next_tag
        self.next_tag += 1
        self.sent_tokens.append(token)
        self.unsettled[tag] = Publish(token, tag, exchange, routing_key, message_id, self.now)

    def publish_again(self, publish: Publish) -> None:
        """A publish the broker never read, written again by the publisher: same token."""
        tag = self.tracker.sent(
            publish.token, publish.exchange, publish.routing_key, publish.message_id, self.now
        )
        assert tag == self.next_tag
        self.next_tag += 1
        self.unsettled[tag] = Publish(
            publish.token, tag, publish.exchange, publish.routing_key, publish.message_id, self.now
        )

    @rule(pick=st.integers(0, 2**16), multiple=st.booleans(), nack=st.booleans())
    def answer(self, pick: int, multiple: bool, nack: bool) -> None:
        tag = pick % (self.next_tag + 3)  # tags sent, settled, never sent, and 0
        if multiple:
            hit = [p for t, p in self.unsettled.items() if t <= tag]
        else:
            hit = [self.unsettled[tag]] if tag in self.unsettled else []
        expected = {p.token: self.answered(p, nack) for p in hit}
        if nack:
            outcomes = self.tracker.on_nack(tag, multiple)
        else:
            outcomes = self.tracker.on_ack(tag, multiple)
        self.settle(outcomes, expected)

    @precondition(lambda self: self.unsettled)
    @rule(
        pick=st.integers(0, 2**16),
        reply_text=st.sampled_from(["NO_ROUTE", "NO_CONSUMERS"]),
        no_message_id=st.sampled_from([None, ""]),
    )
    def returned(self, pick: int, reply_text: str, no_message_id: str | None) -> None:
        tags = sorted(self.unsettled)
        publish = self.unsettled[tags[pick % len(tags)]]
        keys = (publish.exchange, publish.routing_key, publish.message_id or None)
        # the first unconfirmed publish after the last one returned with the same keys
        match = next(
            (
                p
                for t, p in sorted(self.unsettled.items())
                if t > self.last_returned
                and not p.returned
                and (p.exchange, p.routing_key, p.message_id or None) == keys
            ),
            None,
        )
        # the broker's return carries no message id property when the publish had none
        message_id = publish.message_id or no_message_id
        found = self.tracker.on_return(
            312, reply_text, publish.exchange, publish.routing_key, message_id
        )
        assert found == (match is not None)
        if match is not None:
            match.returned = True
            self.last_returned = match.tag

    @rule(
        exchange=st.sampled_from(EXCHANGES),
        code=st.sampled_from([404, 403, 406]),
        other_text=st.sampled_from(["PRECONDITION_FAILED - unknown delivery tag 9", ""]),
    )
    def channel_closed(self, exchange: str, code: int, other_text: str) -> None:
        text = {404: not_found(exchange), 403: refused(exchange), 406: other_text}[code]
        failed = {404: EXCHANGE_NOT_FOUND, 403: ACCESS_REFUSED}.get(code)
        in_order = sorted(self.unsettled.values(), key=lambda p: p.tag)
        culprit = next((p.tag for p in in_order if failed and p.exchange == exchange), None)
        expected: dict[Any, str] = {}
        expected_resend = []
        for p in in_order:
            if culprit is not None and p.exchange == exchange:
                expected[p.token] = failed  # type: ignore[assignment]
            elif culprit is not None and p.tag > culprit:
                expected_resend.append(p)  # never read by the broker: written again
            else:
                expected[p.token] = CONNECTION_LOST  # may have been routed
        outcomes, resend = self.tracker.on_channel_closed(code, text)
        assert resend == [p.token for p in expected_resend]
        self.settle(outcomes, expected)
        self.drained()
        for p in expected_resend:  # the publisher writes them again, in order
            self.publish_again(p)

    @rule()
    def connection_lost(self) -> None:
        expected = {p.token: CONNECTION_LOST for p in self.unsettled.values()}
        self.settle(self.tracker.on_connection_lost(), expected)
        self.drained()

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.sampled_from([0.0, 1.0, 3.0]), timeout=st.sampled_from([0.0, 1.0, 2.5, 10.0]))
    def expire(self, dt: float, timeout: float) -> None:
        self.now += dt
        expected = {
            p.token: TIMEOUT for p in self.unsettled.values() if self.now - p.sent_at > timeout
        }
        self.settle(self.tracker.expire(self.now, timeout), expected)

    # -- invariants

    @invariant()
    def counts(self) -> None:
        assert len(self.tracker) == len(self.sent_tokens) - len(self.settled)
        assert len(self.tracker) == len(self.unsettled)

    @invariant()
    def oldest(self) -> None:
        oldest = min((p.sent_at for p in self.unsettled.values()), default=None)
        assert self.tracker.oldest() == oldest

    def teardown(self) -> None:
        self.connection_lost()
        # every publish got exactly one outcome
        assert sorted(self.settled) == self.sent_tokens


TrackerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_every_publish_gets_exactly_one_outcome = TrackerMachine.TestCase


# -- each reason ---------------------------------------------------------------------------


def test_confirmed() -> None:
    tracker = ConfirmTracker()
    assert tracker.sent("a", "ex", "k") == 1
    assert tracker.sent("b", "ex", "k") == 2
    assert tracker.on_ack(1, False) == [("a", None)]
    assert len(tracker) == 1
    assert tracker.on_ack(1, False) == []  # a second ack of the same tag
    assert tracker.on_ack(2, False) == [("b", None)]
    assert len(tracker) == 0


def test_unroutable_is_a_return_then_its_ack() -> None:
    tracker = ConfirmTracker()
    tracker.sent("a", "ex", "nowhere", "m1")
    assert tracker.on_return(312, "NO_ROUTE", "ex", "nowhere", "m1") is True
    assert len(tracker) == 1  # settled at its ack, not at the return
    ((token, failure),) = tracker.on_ack(1, False)
    assert token == "a"
    assert isinstance(failure, PublishFailed)
    assert failure.reason == UNROUTABLE
    assert "312 NO_ROUTE" in failure.detail and "'nowhere'" in failure.detail
    # a return nothing matches (its publish already given up)
    assert tracker.on_return(312, "NO_ROUTE", "ex", "nowhere", "m1") is False


@pytest.mark.parametrize("message_id", ["", None])
def test_return_of_a_publish_without_message_id(message_id: str | None) -> None:
    # a publish with an empty message id goes out without the property: its return has
    # none, whichever way the publisher spelled "no message id"
    for returned_id in ("", None):
        tracker = ConfirmTracker()
        tracker.sent("a", "ex", "k", message_id)
        assert tracker.on_return(312, "NO_ROUTE", "ex", "k", returned_id) is True
        assert reasons(tracker.on_ack(1, False)) == {"a": UNROUTABLE}


def test_nacked() -> None:
    tracker = ConfirmTracker()
    tracker.sent("a", "ex", "k")
    tracker.sent("b", "ex", "k")
    ((token, failure),) = tracker.on_nack(2, False)
    assert token == "b" and failure is not None and failure.reason == NACKED
    assert reasons(tracker.on_nack(2, True)) == {"a": NACKED}
    assert len(tracker) == 0


def test_exchange_not_found_only_for_the_named_exchange() -> None:
    tracker = ConfirmTracker()
    tracker.sent("to-missing-1", "missing", "k")
    tracker.sent("to-other", "other", "k")
    tracker.sent("to-missing-2", "missing", "k2")
    tracker.sent("to-prefix", "miss", "k")  # a name the text contains only as a prefix
    tracker.on_ack(2, False)
    tracker.sent("to-default", "", "missing")
    outcomes, resend = tracker.on_channel_closed(404, not_found("missing"))
    assert reasons(outcomes) == {
        "to-missing-1": EXCHANGE_NOT_FOUND,
        "to-missing-2": EXCHANGE_NOT_FOUND,
    }
    # written after the refused publish: the broker discarded them unread
    assert resend == ["to-prefix", "to-default"]
    assert all("NOT_FOUND" in str(failure) for _, failure in outcomes)
    assert len(tracker) == 0
    assert tracker.sent("next", "other", "k") == 1  # the reopened channel counts from 1


def test_access_refused() -> None:
    tracker = ConfirmTracker()
    tracker.sent("before", "public", "k")
    tracker.sent("a", "secret", "k")
    tracker.sent("b", "public", "k")
    outcomes, resend = tracker.on_channel_closed(403, refused("secret"))
    # "before" was processed and may have been routed: its confirm is lost
    assert reasons(outcomes) == {"before": CONNECTION_LOST, "a": ACCESS_REFUSED}
    assert resend == ["b"]


def test_other_channel_closes_and_connection_loss_are_connection_lost() -> None:
    tracker = ConfirmTracker()
    tracker.sent("a", "x", "k")
    assert tracker.on_channel_closed(406, "PRECONDITION_FAILED - x")[1] == []
    tracker.sent("a2", "x", "k")
    outcomes, resend = tracker.on_channel_closed(406, "PRECONDITION_FAILED - x")
    assert reasons(outcomes) == {"a2": CONNECTION_LOST} and resend == []
    tracker.sent("b", "x", "k")
    # a 404 about a queue, not an exchange
    outcomes, resend = tracker.on_channel_closed(404, "NOT_FOUND - no queue 'x' in vhost '/'")
    assert reasons(outcomes) == {"b": CONNECTION_LOST} and resend == []
    tracker.sent("c", "x", "k")
    tracker.sent("d", "y", "k")
    assert reasons(tracker.on_connection_lost("socket closed")) == {
        "c": CONNECTION_LOST,
        "d": CONNECTION_LOST,
    }
    assert tracker.on_connection_lost() == []
    assert tracker.sent("e", "x", "k") == 1


def test_timeout_and_a_late_ack_ignored() -> None:
    tracker = ConfirmTracker()
    tracker.sent("old", "x", "k", now=0.0)
    tracker.sent("old2", "x", "k", now=0.5)
    tracker.sent("new", "x", "k", now=4.0)
    assert tracker.oldest() == 0.0
    assert tracker.expire(5.0, 5.0) == []  # not more than the timeout yet
    outcomes = tracker.expire(5.6, 5.0)
    assert reasons(outcomes) == {"old": TIMEOUT, "old2": TIMEOUT}
    assert "no confirm within 5s" in str(outcomes[0][1])
    assert tracker.oldest() == 4.0
    assert len(tracker) == 1
    assert tracker.on_ack(1, False) == []  # the late acks
    assert tracker.on_nack(2, False) == []
    assert tracker.on_ack(3, True) == [("new", None)]
    assert tracker.oldest() is None


def test_multiple_ack_settles_every_tag_up_to_it() -> None:
    tracker = ConfirmTracker()
    for token in "abcde":
        tracker.sent(token, "x", "k")
    tracker.on_nack(2, False)
    assert reasons(tracker.on_ack(4, True)) == {"a": None, "c": None, "d": None}
    assert reasons(tracker.on_ack(9, True)) == {"e": None}
    assert len(tracker) == 0


def test_a_return_matches_its_publish_among_several_unconfirmed() -> None:
    tracker = ConfirmTracker()
    tracker.sent("to-a", "ex", "a", "m")
    tracker.sent("to-b", "ex", "b", "m")
    tracker.sent("to-c", "ex", "c", "m")
    tracker.sent("to-b-other-exchange", "ex2", "b", "m")
    assert tracker.on_return(312, "NO_ROUTE", "ex", "b", "m") is True
    assert reasons(tracker.on_ack(4, True)) == {
        "to-a": None,
        "to-b": UNROUTABLE,
        "to-c": None,
        "to-b-other-exchange": None,
    }


def test_returns_for_the_same_keys_match_in_order() -> None:
    tracker = ConfirmTracker()
    for token in ("first", "second", "third"):
        tracker.sent(token, "ex", "k")
    assert tracker.on_return(312, "NO_ROUTE", "ex", "k", None) is True
    assert tracker.on_return(312, "NO_ROUTE", "ex", "k", None) is True
    assert reasons(tracker.on_ack(3, True)) == {
        "first": UNROUTABLE,
        "second": UNROUTABLE,
        "third": None,
    }


def test_a_return_belongs_to_a_publish_after_the_previous_return() -> None:
    # the broker handles a channel's publishes in order: after the return of "b", a return
    # for "k1" is that of "c", not of "a" (whose return would have come before b's)
    tracker = ConfirmTracker()
    tracker.sent("a", "ex", "k1")
    tracker.sent("b", "ex", "k2")
    tracker.sent("c", "ex", "k1")
    assert tracker.on_return(312, "NO_ROUTE", "ex", "k2", None) is True
    assert tracker.on_return(312, "NO_ROUTE", "ex", "k1", None) is True
    assert reasons(tracker.on_ack(3, True)) == {"a": None, "b": UNROUTABLE, "c": UNROUTABLE}


def test_a_return_after_its_predecessor_was_confirmed() -> None:
    tracker = ConfirmTracker()
    tracker.sent("first", "ex", "k")
    tracker.sent("second", "ex", "k")
    assert tracker.on_ack(1, False) == [("first", None)]
    assert tracker.on_return(312, "NO_ROUTE", "ex", "k", None) is True
    assert reasons(tracker.on_ack(2, False)) == {"second": UNROUTABLE}


def test_a_returned_publish_that_times_out_or_is_nacked() -> None:
    tracker = ConfirmTracker()
    tracker.sent("a", "ex", "k", now=0.0)
    tracker.sent("b", "ex", "k2", now=0.0)
    tracker.on_return(312, "NO_ROUTE", "ex", "k", None)
    tracker.on_return(312, "NO_ROUTE", "ex", "k2", None)
    assert reasons(tracker.expire(10.0, 1.0)) == {"a": TIMEOUT, "b": TIMEOUT}
    tracker.sent("c", "ex", "k")
    tracker.on_return(312, "NO_ROUTE", "ex", "k", None)
    assert reasons(tracker.on_nack(3, False)) == {"c": UNROUTABLE}


def test_reasons_are_the_documented_ones() -> None:
    assert set(confirms.REASONS) == {
        UNROUTABLE,
        EXCHANGE_NOT_FOUND,
        ACCESS_REFUSED,
        NACKED,
        TIMEOUT,
        CONNECTION_LOST,
    }
