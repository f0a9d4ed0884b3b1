"""The pure parts of client identities (workers/gateway/identity.py): signed tokens, the
identity of a client certificate, the HELLO decision table, the failed-authentication limit."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.gateway import identity
from workers.gateway.identity import (
    Admitted,
    FailureLimiter,
    Refused,
    TokenCheck,
    authenticate,
    cert_identity,
    parse_ttl,
    sign_token,
    source_of,
    verify_token,
)

SECRET = b"0123456789abcdef-test-secret"
NOW = 1_800_000_000

ids = st.text(min_size=1, max_size=64)
secrets = st.binary(min_size=1, max_size=64)
expiries = st.integers(min_value=0, max_value=identity.MAX_EXPIRY)


# ----------------------------------------------------------------------- signed tokens


def test_token_format_matches_an_independent_computation() -> None:
    """v1.<expiry>.<base64url(HMAC-SHA256(secret, client_id + "." + expiry))>, unpadded."""
    mac = hmac.new(SECRET, b"device-7.1800000600", hashlib.sha256).digest()
    expected = "v1.1800000600." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert sign_token(SECRET, "device-7", 1_800_000_600) == expected
    assert verify_token(SECRET, "device-7", expected, NOW) is TokenCheck.OK


@given(secret=secrets, client_id=ids, expiry=expiries)
def test_a_signed_token_verifies_until_it_expires(
    secret: bytes, client_id: str, expiry: int
) -> None:
    token = sign_token(secret, client_id, expiry)
    assert verify_token(secret, client_id, token, expiry - 0.001) is TokenCheck.OK
    assert verify_token(secret, client_id, token, expiry) is TokenCheck.EXPIRED
    assert verify_token(secret, client_id, token, expiry + 86400) is TokenCheck.EXPIRED


@given(secret=secrets, client_id=ids, other=ids, expiry=expiries)
def test_a_token_proves_only_its_client_id_under_its_secret(
    secret: bytes, client_id: str, other: str, expiry: int
) -> None:
    token = sign_token(secret, client_id, expiry)
    if other != client_id:
        assert verify_token(secret, other, token, 0) is TokenCheck.WRONG
    assert verify_token(secret + b"x", client_id, token, 0) is TokenCheck.WRONG


@given(
    client_id=ids,
    expiry=st.integers(min_value=NOW + 1, max_value=identity.MAX_EXPIRY),
    data=st.data(),
)
def test_any_tampering_is_refused(client_id: str, expiry: int, data: st.DataObject) -> None:
    token = sign_token(SECRET, client_id, expiry)
    at = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    char = data.draw(st.sampled_from("0123456789abcdefABCXYZ_-.=v+/ "))
    tampered = token[:at] + char + token[at + 1 :]
    if tampered == token:
        return
    assert verify_token(SECRET, client_id, tampered, NOW) is not TokenCheck.OK


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1..",
        "v2.1800000600." + "A" * 43,
        "v1.01800000600." + "A" * 43,  # leading zero: not the canonical expiry
        "v1.-5." + "A" * 43,
        "v1.1800000600." + "A" * 42,
        "v1.1800000600." + "A" * 43 + "=",  # padded
        "v1.1800000600." + "A" * 44,
        "v1.1800000600." + "A" * 42 + "+",  # base64, not base64url
        " v1.1800000600." + "A" * 43,
        "v1.1800000600." + "A" * 43 + "\n",
        "v1.1234567890123." + "A" * 43,  # beyond 12 digits
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert verify_token(SECRET, "c", token, NOW) is TokenCheck.MALFORMED


def test_the_mac_is_compared_in_constant_time_even_when_expired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(identity.hmac, "compare_digest", counting)
    expired = sign_token(SECRET, "c", NOW - 10)
    wrong = "v1.1800000600." + "A" * 43
    assert verify_token(SECRET, "c", expired, NOW) is TokenCheck.EXPIRED
    assert verify_token(SECRET, "c", wrong, NOW) is TokenCheck.WRONG
    assert len(calls) == 2 and all(len(a) == len(b) == 43 for a, b in calls)


def test_sign_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError):
        sign_token(b"", "c", NOW)
    with pytest.raises(ValueError):
        sign_token(SECRET, "c", identity.MAX_EXPIRY + 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 43200),
        ("15m", 900),
        ("90s", 90),
        ("3600", 3600),
        ("2w", 1209600),
        (" 1D ", 86400),
    ],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0d", "-1d", "1y", "d", "1.5h", "1 d"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


# ----------------------------------------------------------------------- certificates

CERT: dict[str, Any] = {
    "subject": ((("organizationName", "Example"),), (("commonName", "device-7"),)),
    "subjectAltName": (
        ("DNS", "d7.devices.example"),
        ("DNS", "second.example"),
        ("email", "d7@example.org"),
        ("URI", "spiffe://example/device/7"),
    ),
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("cn", "device-7"),
        ("dns", "d7.devices.example"),
        ("email", "d7@example.org"),
        ("uri", "spiffe://example/device/7"),
    ],
)
def test_cert_identity(source: Any, expected: str) -> None:
    assert cert_identity(CERT, source) == expected


def test_cert_identity_without_a_usable_name() -> None:
    assert cert_identity(None, "cn") is None
    assert cert_identity({}, "cn") is None
    assert cert_identity({"subject": ((("organizationName", "x"),),)}, "cn") is None
    assert cert_identity({"subject": ((("commonName", ""),),)}, "cn") is None
    assert cert_identity({"subject": ((("commonName", "x" * 257),),)}, "cn") is None
    assert cert_identity({"subject": ((("commonName", "a"),),)}, "dns") is None
    # several CNs: the most specific (last) one
    two = {"subject": ((("commonName", "ca-ish"),), (("commonName", "leaf"),))}
    assert cert_identity(two, "cn") == "leaf"


# ----------------------------------------------------------------------- decision table


def decide(**overrides: Any) -> Admitted | Refused:
    values: dict[str, Any] = {
        "client_id": None,
        "token": None,
        "now": NOW,
        "secret": SECRET,
        "shared": None,
        "cert_required": False,
        "cert_id": None,
        "unproven": "refuse",
    }
    values.update(overrides)
    return authenticate(**values)


GOOD = sign_token(SECRET, "alice", NOW + 3600)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # signed tokens
        ({"client_id": "alice", "token": GOOD}, Admitted("token", client_id="alice")),
        ({"client_id": "bob", "token": GOOD}, "wrong_token"),
        ({"client_id": "alice", "token": GOOD, "now": NOW + 3600}, "expired_token"),
        ({"client_id": "alice", "token": "v1.x"}, "malformed_token"),
        (
            {"client_id": "alice", "token": GOOD[:-1] + ("B" if GOOD[-1] == "A" else "A")},
            "wrong_token",
        ),
        # a failed signed token is refused even where an unproven id would be a hint
        ({"client_id": "alice", "token": "v1.x", "unproven": "hint"}, "malformed_token"),
        # unproven client_id
        ({"client_id": "alice"}, "unproven_client_id"),
        ({"client_id": "alice", "token": "shared-1", "shared": True}, "unproven_client_id"),
        ({"client_id": "alice", "secret": None}, "unproven_client_id"),
        (
            {"client_id": "alice", "token": "shared-1", "shared": True, "unproven": "hint"},
            Admitted("shared", hint="alice"),
        ),
        ({"client_id": "alice", "shared": False, "unproven": "hint"}, "wrong_shared_token"),
        (
            {"client_id": "alice", "secret": None, "unproven": "hint"},
            Admitted("none", hint="alice"),
        ),
        # no client_id: the shared tokens, as before
        ({}, Admitted("none")),
        ({"shared": True, "token": "shared-1"}, Admitted("shared")),
        ({"shared": False}, "wrong_shared_token"),
        ({"token": GOOD}, Admitted("none")),  # a signed token proves nothing without its id
        # client certificates
        ({"cert_required": True, "cert_id": "alice"}, Admitted("cert", client_id="alice")),
        (
            {"cert_required": True, "cert_id": "alice", "client_id": "alice"},
            Admitted("cert", client_id="alice"),
        ),
        ({"cert_required": True, "cert_id": "alice", "client_id": "bob"}, "certificate_mismatch"),
        (
            {
                "cert_required": True,
                "cert_id": "alice",
                "client_id": "bob",
                "token": sign_token(SECRET, "bob", NOW + 60),
            },
            "certificate_mismatch",
        ),
        ({"cert_required": True, "cert_id": None}, "no_certificate"),
        (
            {"cert_required": True, "cert_id": None, "client_id": "alice", "token": GOOD},
            "no_certificate",
        ),
    ],
)
def test_decision_table(overrides: dict[str, Any], expected: Admitted | str) -> None:
    verdict = decide(**overrides)
    if isinstance(expected, str):
        assert isinstance(verdict, Refused) and verdict.reason == expected
        assert verdict.message
    else:
        assert verdict == expected


@given(
    client_id=st.one_of(st.none(), ids),
    token=st.one_of(st.none(), st.text(max_size=80)),
    shared=st.one_of(st.none(), st.booleans()),
    unproven=st.sampled_from(["refuse", "hint"]),
    secret=st.one_of(st.none(), secrets),
)
def test_an_identity_is_never_admitted_without_its_proof(
    client_id: str | None,
    token: str | None,
    shared: bool | None,
    unproven: Any,
    secret: bytes | None,
) -> None:
    """Whatever the HELLO says, ``client_id`` is set only by a valid signed token for it."""
    verdict = decide(
        client_id=client_id, token=token, shared=shared, unproven=unproven, secret=secret
    )
    if isinstance(verdict, Admitted) and verdict.client_id is not None:
        assert verdict.proof == "token" and secret is not None and token is not None
        assert verify_token(secret, verdict.client_id, token, NOW) is TokenCheck.OK
    if isinstance(verdict, Admitted) and verdict.hint is not None:
        assert unproven == "hint" and verdict.proof in ("shared", "none")


# ----------------------------------------------------------------------- rate limit


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("192.0.2.7:40000", "192.0.2.7"),
        ("[2001:db8:1:2:3:4:5:6]:40000", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:ffff::1]:1", "2001:db8:1:2::/64"),
        ("[::ffff:192.0.2.9]:5", "192.0.2.9"),
        ("?", "?"),
    ],
)
def test_source_of(peer: str, source: str) -> None:
    assert source_of(peer) == source


def test_a_source_is_blocked_after_its_burst_and_recovers() -> None:
    limiter = FailureLimiter(3, 60.0)
    for _ in range(3):
        assert limiter.admits("a", 0.0)
        limiter.failed("a", 0.0)
    assert not limiter.admits("a", 0.0)
    assert limiter.admits("b", 0.0), "other sources are not affected"
    assert not limiter.admits("a", 19.9)
    assert limiter.admits("a", 20.0), "one failure's share of the window (60 s / 3) later"
    limiter.failed("a", 20.0)
    assert not limiter.admits("a", 20.0)
    assert limiter.blocked_sources(20.0) == ["a"]
    assert limiter.admits("a", 200.0)


def test_refused_attempts_do_not_extend_the_block() -> None:
    limiter = FailureLimiter(1, 10.0)
    limiter.failed("a", 0.0)
    for t in range(10):
        assert not limiter.admits("a", float(t))
    assert limiter.admits("a", 10.0)


def test_the_report_counts_and_starts_again() -> None:
    limiter = FailureLimiter(2, 60.0)
    assert limiter.report(0.0) is None
    for source in ("a", "a", "b"):
        limiter.failed(source, 0.0)
    assert not limiter.admits("a", 0.0)
    assert not limiter.admits("a", 0.0)
    report = limiter.report(1.0)
    assert report is not None
    assert (report.failures, report.refused, report.sources) == (3, 2, 2)
    assert (report.blocked, report.blocked_count) == (("a",), 1)
    assert limiter.report(1.0) is None
    assert not limiter.admits("a", 1.0), "a report does not lift a block"


def test_sources_are_bounded_and_forgotten() -> None:
    limiter = FailureLimiter(1, 10.0, max_sources=100)
    for i in range(1000):
        limiter.failed(f"s{i}", 0.0)
    assert len(limiter) == 100
    assert not limiter.admits("s999", 0.0) and limiter.admits("s0", 0.0)
    limiter.report(100.0)  # prunes those whose allowance is whole again
    assert len(limiter) == 0


def test_limit_zero_is_no_limit() -> None:
    limiter = FailureLimiter(0, 60.0)
    for _ in range(1000):
        limiter.failed("a", 0.0)
    assert limiter.admits("a", 0.0) and len(limiter) == 0


@settings(max_examples=200)
@given(
    limit=st.integers(min_value=1, max_value=20),
    window=st.floats(min_value=0.5, max_value=600),
    gaps=st.lists(st.floats(min_value=0, max_value=30), min_size=1, max_size=300),
)
def test_failures_never_exceed_the_allowance(limit: int, window: float, gaps: list[float]) -> None:
    """An attacker trying whenever it may: over any run of T seconds from the start it
    fails at most ``limit + T * limit / window`` times."""
    limiter = FailureLimiter(limit, window)
    now = 0.0
    failures = 0
    for gap in gaps:
        now += gap
        if limiter.admits("x", now):
            limiter.failed("x", now)
            failures += 1
        assert failures <= limit + now * limit / window + 1e-6
