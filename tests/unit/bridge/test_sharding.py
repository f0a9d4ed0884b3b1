"""The consistent-hash exchange's routing computed in Python (bridge.sharding).

Vectors below were printed by ``erlang:phash2/1`` and the plugin's jump hash in ``erl``
(OTP 25); when ``erl`` is installed the test also compares random keys live. The broker's
own routing is checked in tests/integration/host/test_sharding.py.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import ConfigError
from bridge.sharding import (
    Shard,
    chx_bucket,
    chx_header_bucket,
    header_hash_typed,
    jump_consistent_hash,
    phash2_binary,
    phash2_tagged,
    resolve_shard,
)

VECTORS = [
    # key, phash2, bucket of 2, of 3, of 7
    (b"cdn-00001", 102549511, 0, 0, 4),
    (b"node-1", 90625977, 1, 1, 1),
    ("été".encode(), 46069212, 0, 0, 4),
    (b"abcdefghijklmnopqrstuvwxyz0123456789", 115604188, 0, 0, 0),
]


@pytest.mark.parametrize(("key", "h", "b2", "b3", "b7"), VECTORS)
def test_known_vectors(key: bytes, h: int, b2: int, b3: int, b7: int) -> None:
    assert phash2_binary(key) == h
    assert [jump_consistent_hash(h, n) for n in (2, 3, 7)] == [b2, b3, b7]


def test_phash2_of_short_binaries() -> None:
    assert phash2_binary(b"abc") == 98228475
    assert phash2_binary(b"") == 13708901


@given(st.binary(max_size=80), st.integers(min_value=1, max_value=64))
def test_bucket_in_range_and_monotone(key: bytes, n: int) -> None:
    b = chx_bucket(key, n)
    assert 0 <= b < n
    # jump hash moves a key only to the new bucket when one is added
    nxt = chx_bucket(key, n + 1)
    assert nxt in (b, n)


def test_spread_is_even() -> None:
    rng = random.Random(7)
    counts = [0] * 4
    for _ in range(4000):
        counts[chx_bucket(f"cdn-{rng.randrange(10**9)}", 4)] += 1
    assert min(counts) > 850, counts


ERL_PROGRAM = r"""
-module(chxvec).
-export([main/1]).
jch(_K, 1) -> 0;
jch(K, N) -> S = rand:seed_s(exs1024, {K,K,K}), v(-1, 0, N, S).
v(B, J, N, _) when J >= N -> B;
v(_, J0, N, S0) -> B = J0, {R, S} = rand:uniform_s(S0), v(B, trunc((B + 1) / R), N, S).
main([File]) ->
  {ok, Bin} = file:read_file(File),
  Keys = binary:split(Bin, <<"\n">>, [global]),
  [io:format("~p ~p~n", [erlang:phash2(K), jch(erlang:phash2(K), 5)]) || K <- Keys],
  halt().
"""


@pytest.mark.skipif(shutil.which("erl") is None, reason="erl (Erlang/OTP) is not installed")
def test_matches_erlang(tmp_path: Path) -> None:
    rng = random.Random(11)
    alphabet = "abcXYZ-_.0123456789éü中"
    keys = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50))) for _ in range(500)]
    (tmp_path / "keys.txt").write_text("\n".join(keys), encoding="utf-8")
    (tmp_path / "chxvec.erl").write_text(ERL_PROGRAM)
    subprocess.run(["erlc", "chxvec.erl"], cwd=tmp_path, check=True, timeout=60)
    out = subprocess.run(
        ["erl", "-noshell", "-run", "chxvec", "main", str(tmp_path / "keys.txt")],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    pairs = list(zip(out[0::2], out[1::2], strict=True))
    assert len(pairs) == len(keys)
    for key, (h, b5) in zip(keys, pairs, strict=True):
        assert (phash2_binary(key.encode()), chx_bucket(key, 5)) == (int(h), int(b5)), key


def test_resolve_shard_from_ordinal() -> None:
    assert resolve_shard("directed", 3, None, hostname="directed-2") == Shard(2, 3)
    assert resolve_shard("directed", 1, None, hostname="whatever") == Shard(0, 1)
    assert resolve_shard("delay", 4, 1, hostname="x") == Shard(1, 4)


@pytest.mark.parametrize(
    ("count", "index", "host", "text"),
    [
        (3, None, "laptop", "no shard index"),
        (3, None, "directed-3", "outside 0..2"),
        (2, 5, "x", "outside 0..1"),
    ],
)
def test_resolve_shard_errors(count: int, index: int | None, host: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        resolve_shard("directed", count, index, hostname=host)


def test_shard_owns() -> None:
    shards = [Shard(i, 3) for i in range(3)]
    for key in ("a", "b", "cdn-1", "cdn-2", ""):
        assert sum(s.owns(key) for s in shards) == 1
    assert Shard(0, 1).owns("anything")


# erlang:phash2({longstr, K}) and erlang:phash2({binary, K}), printed by erl (OTP 25): what
# the consistent-hash exchange hashes for a hash-header value (a long string, a byte array).
TAGGED_VECTORS = [
    (b"k0", 125408639, 52965043),
    (b"", 116351706, 73633334),
    (b"abcdefghijklmnopqrstuvwxyz", 74957012, 120338670),
    ("é".encode(), 28428857, 62865493),
]


@pytest.mark.parametrize(("key", "longstr", "binary"), TAGGED_VECTORS)
def test_typed_header_values_hash_as_erlang_does(key: bytes, longstr: int, binary: int) -> None:
    assert phash2_tagged("longstr", key) == longstr
    assert phash2_tagged("binary", key) == binary


def test_header_bucket_follows_the_decoded_type() -> None:
    assert chx_header_bucket("k0", 5) == jump_consistent_hash(125408639, 5) == 3
    assert chx_header_bucket(b"k0", 5) == 3  # a long string that is not UTF-8 stays bytes
    assert chx_header_bucket(bytearray(b"k0"), 5) == jump_consistent_hash(52965043, 5)
    assert chx_header_bucket(7, 5) is None


ERL_TAGGED = r"""
-module(chxtag).
-export([main/1]).
main([File]) ->
  {ok, Bin} = file:read_file(File),
  Keys = binary:split(Bin, <<"\n">>, [global]),
  [io:format("~p ~p~n", [erlang:phash2({longstr, K}), erlang:phash2({binary, K})])
   || K <- Keys],
  halt().
"""


@pytest.mark.skipif(shutil.which("erl") is None, reason="erl (Erlang/OTP) is not installed")
def test_typed_values_match_erlang(tmp_path: Path) -> None:
    rng = random.Random(16)
    alphabet = "abcXYZ-_.0123456789éü中"
    keys = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    (tmp_path / "keys.txt").write_text("\n".join(keys), encoding="utf-8")
    (tmp_path / "chxtag.erl").write_text(ERL_TAGGED)
    subprocess.run(["erlc", "chxtag.erl"], cwd=tmp_path, check=True, timeout=60)
    out = subprocess.run(
        ["erl", "-noshell", "-run", "chxtag", "main", str(tmp_path / "keys.txt")],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    pairs = list(zip(out[0::2], out[1::2], strict=True))
    assert len(pairs) == len(keys)
    for key, (longstr, binary) in zip(keys, pairs, strict=True):
        data = key.encode()
        assert (phash2_tagged("longstr", data), phash2_tagged("binary", data)) == (
            int(longstr),
            int(binary),
        ), key


@pytest.mark.parametrize(
    ("version", "typed"),
    [
        ("3.10.8", True),
        ("3.12.14", True),
        ("3.13.0", False),
        ("4.3.6", False),
        ("4.0.0-beta.1", False),
        ("3.11.2+rc.1", True),
        (None, False),
        ("", False),
        ("unknown", False),
    ],
)
def test_which_brokers_hash_a_header_typed(version: str | None, typed: bool) -> None:
    assert header_hash_typed(version) is typed


def test_from_3_13_a_header_is_hashed_like_a_routing_key() -> None:
    # RabbitMQ 3.13+ hashes the header's value alone (seen on 4.3.6 against its routing)
    for value in ("k0", "order-905035", "é", ""):
        assert chx_header_bucket(value, 5, typed=False) == chx_bucket(value, 5)
    assert chx_header_bucket(bytearray(b"k0"), 5, typed=False) == chx_bucket(b"k0", 5)
    assert chx_header_bucket(b"\xff\xfe", 3, typed=False) == chx_bucket(b"\xff\xfe", 3)
    assert chx_header_bucket(7, 5, typed=False) is None
