"""Tokens of the directed HTTP pull API and their setting, without a socket."""

from __future__ import annotations

import hashlib

import pytest

from bridge.errors import ConfigError
from bridge.settings import load_settings
from workers.directed.config import DirectedSettings
from workers.directed.http_api import RateLimit, Tokens
from workers.directed.wire import WireError, parse_http_pull

TABLE = {"a": "tok-a", "b": "sha256:" + hashlib.sha256(b"tok-b").hexdigest()}


@pytest.mark.parametrize(
    ("target", "header", "expected"),
    [
        ("a", "Bearer tok-a", None),
        ("a", "bearer  tok-a ", None),
        ("b", "Bearer tok-b", None),
        ("a", "Bearer tok-b", 403),
        ("b", "Bearer tok-a", 403),
        ("a", "Bearer nope", 401),
        ("a", None, 401),
        ("a", "Basic dG9rLWE=", 401),
        ("a", "Bearer ", 401),
        ("c", "Bearer tok-a", 403),
    ],
)
def test_token_check(target, header, expected):
    refused = Tokens(TABLE).check(target, header)
    assert (refused[0] if refused else None) == expected


def test_shared_token_opens_every_target():
    tokens = Tokens({"*": "all", "a": "tok-a"})
    assert tokens.check("zzz", "Bearer all") is None
    assert tokens.check("a", "Bearer all") is None
    assert tokens.check("zzz", "Bearer tok-a")[0] == 403


def test_tokens_setting_from_json_and_refusals(monkeypatch):
    monkeypatch.setenv("BRIDGE_DIRECTED__HTTP_TOKENS", '{"a": "tok-a", "*": "all"}')
    assert load_settings(DirectedSettings).http_tokens == {"a": "tok-a", "*": "all"}
    for raw, says in (
        ("{}", "empty object"),
        ('{"a": ""}', "token of 'a' is empty"),
        ('{"a": "sha256:xyz"}', "64 lower-case hex"),
        ('["tok"]', "valid dictionary"),
    ):
        monkeypatch.setenv("BRIDGE_DIRECTED__HTTP_TOKENS", raw)
        with pytest.raises(ConfigError) as exc:
            load_settings(DirectedSettings)
        (line,) = exc.value.problems
        assert line.startswith("BRIDGE_DIRECTED__HTTP_TOKENS: ") and says in line, line
        assert "tok" not in line.split(":", 1)[1].replace("token", "")


def test_tokens_from_the_secrets_directory(monkeypatch, tmp_path):
    (tmp_path / "bridge_directed__http_tokens").write_text('{"*": "from-file"}')
    monkeypatch.setenv("BRIDGE_SECRETS_DIR", str(tmp_path))
    assert load_settings(DirectedSettings).http_tokens == {"*": "from-file"}


def test_http_pull_body():
    s = DirectedSettings()
    assert parse_http_pull(b"{}", "n1", s).topic == "n1"
    assert parse_http_pull(b'{"topic": "n1", "max": 3}', "n1", s).max == 3
    with pytest.raises(WireError) as exc:
        parse_http_pull(b'{"topic": "n2"}', "n1", s)
    assert exc.value.code == "topic_mismatch"


def test_rate_limit_per_key_with_burst_and_forgetting():
    now = [100.0]
    limit = RateLimit(rate=2, burst=3, clock=lambda: now[0])
    assert [limit.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.check("a") == pytest.approx(0.5)  # the burst spent: one more in 1/rate s
    assert limit.check("b") == 0.0  # another key has its own budget
    now[0] += 0.5
    assert limit.check("a") == 0.0
    assert limit.check("a") == pytest.approx(0.5)
    now[0] += 10  # budgets full again: forgotten at the next sweep, and full when asked
    assert limit.check("c") == 0.0
    assert [limit.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.check("a") > 0
