"""The framings of listeners without HELLO (length, lines, raw): decoders at every split
point, limits, malformed input, and the encoders of replies (no I/O)."""

from __future__ import annotations

import itertools
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.gateway.codecs import LengthCodec, LineCodec, RawCodec, StreamCodec, stream_codec
from workers.gateway.wire import ProtocolError


def feed_split(codec: StreamCodec, data: bytes, cuts: list[int]) -> tuple[list[bytes], str | None]:
    """Feed ``data`` cut at ``cuts``; the messages and the error code (if any)."""
    out: list[bytes] = []
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for a, b in itertools.pairwise(points):
        messages, error = codec.feed_until_error(data[a:b])
        out += messages
        if error is not None:
            return out, error.code
    return out, None


def every_split(make: type | object, data: bytes) -> list[tuple[list[bytes], str | None]]:
    """The result of each single split point and of byte-by-byte feeding."""
    results = []
    for cut in range(len(data) + 1):
        results.append(feed_split(make(), data, [cut]))  # type: ignore[operator]
    results.append(feed_split(make(), data, list(range(len(data)))))  # type: ignore[operator]
    return results


# -- length ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("order", ["big", "little"])
def test_length_round_trip_at_every_split(size: int, order: Literal["big", "little"]) -> None:
    codec = LengthCodec(100, size, order)
    messages = [b"", b"a", b"hello world", bytes(range(100))]
    data = b"".join(codec.encode(m) for m in messages)
    for result in every_split(lambda: LengthCodec(100, size, order), data):
        assert result == (messages, None)


def test_length_prefix_counts_the_payload_only_in_the_given_order() -> None:
    assert LengthCodec(10, 2, "big").encode(b"abc") == b"\x00\x03abc"
    assert LengthCodec(10, 2, "little").encode(b"abc") == b"\x03\x00abc"
    assert LengthCodec(10, 4, "big").encode(b"") == b"\x00\x00\x00\x00"
    assert LengthCodec(10, 1, "big").feed_until_error(b"\x02hi\x01") == ([b"hi"], None)


def test_length_over_the_limit_is_refused_from_the_prefix_alone() -> None:
    codec = LengthCodec(10, 4, "big")
    messages, error = codec.feed_until_error(b"\x00\x00\x00\x02ok\x00\x00\x00\x0b")
    assert messages == [b"ok"]
    assert error is not None and error.code == "frame_too_large"
    assert codec.buffered == 0
    # dead afterwards
    assert codec.feed_until_error(b"\x00\x00\x00\x01x") == ([], error)


def test_length_little_endian_garbage_reads_as_a_huge_length() -> None:
    _, error = LengthCodec(1 << 20, 4, "little").feed_until_error(b"GET / HTTP/1.1\r\n")
    assert error is not None and error.code == "frame_too_large"


def test_length_encoder_refuses_what_the_prefix_cannot_say() -> None:
    LengthCodec(1000, 1, "big").encode(b"x" * 255)
    with pytest.raises(ValueError, match="1-byte length prefix"):
        LengthCodec(1000, 1, "big").encode(b"x" * 256)
    with pytest.raises(ValueError):
        LengthCodec(1000, 3, "big")


def test_length_partial_frame_is_buffered() -> None:
    codec = LengthCodec(100, 2, "big")
    assert codec.feed_until_error(b"\x00\x05ab") == ([], None)
    assert codec.buffered == 4
    assert codec.feed_until_error(b"cde\x00") == ([b"abcde"], None)
    assert codec.buffered == 1


# -- lines ----------------------------------------------------------------------------


def test_lines_at_every_split_crlf_accepted_terminator_dropped() -> None:
    data = b"one\ntwo\r\n\r\n\nlast line\n"
    for result in every_split(lambda: LineCodec(20), data):
        assert result == ([b"one", b"two", b"", b"", b"last line"], None)


def test_lines_keep_a_lone_cr_inside_the_line() -> None:
    assert LineCodec(20).feed_until_error(b"a\rb\n") == ([b"a\rb"], None)


def test_line_of_exactly_max_frame_passes_with_either_terminator() -> None:
    for data in (b"x" * 8 + b"\n", b"x" * 8 + b"\r\n"):
        for result in every_split(lambda: LineCodec(8), data):
            assert result == ([b"x" * 8], None)


def test_line_over_max_frame_is_refused_before_its_end() -> None:
    codec = LineCodec(8)
    messages, error = codec.feed_until_error(b"ok\n" + b"y" * 10)
    assert messages == [b"ok"]
    assert error is not None and error.code == "frame_too_large"
    assert codec.buffered == 0
    for result in every_split(lambda: LineCodec(8), b"z" * 9 + b"\n"):
        assert result == ([], "frame_too_large")


def test_lines_encoder_appends_the_terminator() -> None:
    assert LineCodec(8).encode(b"reply") == b"reply\n"
    assert LineCodec(8).encode(b"") == b"\n"


# -- raw ------------------------------------------------------------------------------


def test_raw_each_chunk_is_one_message_cut_to_max_frame() -> None:
    codec = RawCodec(4)
    assert codec.feed_until_error(b"abc") == ([b"abc"], None)
    assert codec.feed_until_error(b"abcdefghij") == ([b"abcd", b"efgh", b"ij"], None)
    assert codec.feed_until_error(b"") == ([], None)
    assert codec.encode(b"as is\n") == b"as is\n"
    assert codec.buffered == 0


# -- invariants -----------------------------------------------------------------------


@given(
    messages=st.lists(st.binary(max_size=40), max_size=10),
    cuts=st.lists(st.integers(0, 500), max_size=20),
    size=st.sampled_from([1, 2, 4]),
    order=st.sampled_from(["big", "little"]),
)
def test_length_any_split_gives_the_messages(
    messages: list[bytes], cuts: list[int], size: int, order: Literal["big", "little"]
) -> None:
    codec = LengthCodec(40, size, order)
    data = b"".join(codec.encode(m) for m in messages)
    assert feed_split(LengthCodec(40, size, order), data, cuts) == (messages, None)


@given(
    lines=st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=10),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_lines_any_split_gives_the_lines(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    expected = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    assert feed_split(LineCodec(40), data, cuts) == (expected, None)


@pytest.mark.parametrize("framing", ["length", "lines", "raw"])
def test_stream_codec_builds_each_framing(framing: Literal["length", "lines", "raw"]) -> None:
    codec = stream_codec(framing, 10, 2, "little")
    assert type(codec).__name__.lower().startswith(framing[:4])
    with pytest.raises(ValueError):
        stream_codec("frames", 10)


def test_protocol_error_code_for_every_framing_limit() -> None:
    for codec in (LengthCodec(2, 1, "big"), LineCodec(2)):
        _, error = codec.feed_until_error(b"\x09abcdefghi\n")
        assert isinstance(error, ProtocolError) and error.code == "frame_too_large"
