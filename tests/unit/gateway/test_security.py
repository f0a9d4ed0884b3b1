"""Security properties of the gateway that are checked without a broker: HELLO tokens are
compared in constant time against every accepted token, and a HELLO cannot name a queue,
an exchange or a server."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from workers.gateway import session as session_module
from workers.gateway.auth import Authenticator
from workers.gateway.config import GatewaySettings, Listener
from workers.gateway.session import JOINING, Session
from workers.gateway.wire import FrameDecoder, FrameType, encode, encode_hello

GATEWAY = Path(session_module.__file__).resolve().parent


# ----------------------------------------------------------------------------- by inspection


def _token_names(node: ast.AST) -> set[str]:
    return {
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Name | ast.Attribute)
        and "token" in (n.id if isinstance(n, ast.Name) else n.attr).lower()
    }


@pytest.mark.parametrize("path", sorted(GATEWAY.glob("*.py")), ids=lambda p: p.name)
def test_no_token_is_compared_with_an_operator(path: Path) -> None:
    """`==`, `!=`, `in` on a token return as soon as a byte differs; only compare_digest may
    look at one. Covers every module of the gateway, not only the one that checks today."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            named = set().union(*(_token_names(o) for o in operands))
            # `token is None` / `is not None` looks at no byte of the secret
            if named and not all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
                pytest.fail(f"{path.name}:{node.lineno}: token compared with an operator")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            # set/dict/tuple look-ups hash and compare: same problem as `in`
            if node.func.attr in ("index", "count", "get", "__contains__") and any(
                _token_names(a) for a in node.args
            ):
                pytest.fail(f"{path.name}:{node.lineno}: token looked up in a container")


def test_hello_check_uses_compare_digest_on_every_token() -> None:
    source = textwrap.dedent(inspect.getsource(Session._hello))
    tree = ast.parse(source)
    loops = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.For) and isinstance(n.iter, ast.Name) and n.iter.id == "tokens"
    ]
    assert len(loops) == 1, "one loop over the accepted tokens"
    loop = loops[0]
    calls = [
        n
        for n in ast.walk(loop)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "compare_digest"
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "hmac"
    ]
    assert calls, "tokens are compared with hmac.compare_digest"
    # no early exit: every token is compared whatever the answer of the earlier ones
    exits = [n for n in ast.walk(loop) if isinstance(n, ast.Break | ast.Return | ast.Raise)]
    assert not exits, f"the token loop may stop early at line {exits[0].lineno}"
    # the decision is taken after the loop, from an accumulated flag
    assert any(isinstance(n, ast.AugAssign) and isinstance(n.op, ast.BitOr) for n in loop.body)
    # digests of fixed length: the comparison's time does not depend on the lengths
    assert "sha256" in ast.unparse(tree)


# ----------------------------------------------------------------------------- by running it


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class _Hub:
    def __init__(self, tokens: list[str]) -> None:
        self.settings = GatewaySettings(tokens=tokens)
        counter = SimpleNamespace(inc=lambda *a: None)
        self.metrics = SimpleNamespace(
            wire=SimpleNamespace(accepted=0, bytes_in=0, frames_in=0, frames_out=0, bytes_out=0),
            refused=SimpleNamespace(labels=lambda *a: counter),
        )
        self.sessions: dict[str, Session] = {}
        self.tokens = tuple(hashlib.sha256(t.encode()).digest() for t in tokens)
        self.auth = Authenticator(self.settings, CollectorRegistry())
        self.joined: list[str | None] = []  # the client ids of the sessions that joined

    def join(self, session: Session) -> None:
        self.joined.append(session.sticky_id)

    def pump(self, session: Session) -> None:
        pass

    def lost(self, session: Session, previous_state: int) -> None:
        pass


def _hello(hub: _Hub, frame: bytes) -> tuple[Session, list[Any]]:
    transport = _Transport()
    session = Session(hub, Listener(port=0))
    session.connection_made(transport)  # type: ignore[arg-type]
    session.data_received(frame)
    return session, FrameDecoder(1 << 20, 0, role="client").feed(bytes(transport.out))


@pytest.fixture
def digest_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = session_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(session_module.hmac, "compare_digest", counting)
    return calls


TOKENS = ["first-token", "second", "a-much-longer-third-token-" + "x" * 100]


@pytest.mark.parametrize("given", [*TOKENS, "wrong", None, "first-token ", "\u0000"])
def test_every_token_is_compared(given: str | None, digest_calls: list[Any]) -> None:
    hub = _Hub(TOKENS)
    session, frames = _hello(hub, encode_hello("c1", given))
    assert len(digest_calls) == len(TOKENS), "one comparison per accepted token, always"
    assert {len(a) for a, _ in digest_calls} | {len(b) for _, b in digest_calls} == {32}
    if given in TOKENS:
        assert session.state == JOINING and hub.joined and not frames
    else:
        assert not hub.joined
        [frame] = frames
        assert frame.type is FrameType.ERROR
        assert json.loads(frame.payload)["code"] == "unauthorized"


def test_no_tokens_configured_means_no_check(digest_calls: list[Any]) -> None:
    hub = _Hub([])
    session, frames = _hello(hub, encode_hello("c1", "anything"))
    assert session.state == JOINING and not frames and not digest_calls


@pytest.mark.parametrize(
    "extra",
    [
        {"server": "s2"},
        {"server_id": "s2"},
        {"queue": "gateway.server.s2"},
        {"routing_key": "gateway.server.s2"},
        {"exchange": "amq.topic"},
        {"reply_to": "gateway.reply.other"},
        {"headers": {"x-session": "other", "x-gateway": "other"}},
    ],
)
def test_hello_cannot_carry_a_destination(extra: dict[str, Any]) -> None:
    """What the worker learns from a HELLO is its version, client id and token: there is no
    field through which a client could name where its messages go."""
    hub = _Hub([])
    body = json.dumps({"v": 1, "client_id": "c1", **extra}).encode()
    session, frames = _hello(hub, encode(FrameType.HELLO, body))
    assert not frames and hub.joined == ["c1"]
    assert session.server is None  # chosen later, by the balancer only
    headers = session.headers("data", "gw")
    assert set(headers) == {
        "x-event",
        "x-session",
        "x-client-id",
        "x-client-auth",
        "x-client-addr",
        "x-gateway",
    }
    assert headers["x-session"] == session.sid != "other"
