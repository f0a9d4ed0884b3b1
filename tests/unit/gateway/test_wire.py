"""Gateway framing: encoders, the incremental decoder and HELLO validation (no I/O)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.gateway.wire import (
    BYE_FRAME,
    HTTP_400_RESPONSE,
    MAX_CLIENT_ID_CHARS,
    PING_FRAME,
    PONG_FRAME,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    ProtocolError,
    encode,
    encode_ack,
    encode_data,
    encode_error,
    encode_hello,
    encode_welcome,
    parse_hello,
    sniff_http,
    sniff_tls,
    split_seq,
)

MAX_FRAME = 4096
MAX_HELLO = 512
HELLO = encode_hello(client_id="c-1")


def gateway_decoder() -> FrameDecoder:
    return FrameDecoder(MAX_FRAME, MAX_HELLO)


def greeted_decoder() -> FrameDecoder:
    dec = gateway_decoder()
    assert [f.type for f in dec.feed(HELLO)] == [FrameType.HELLO]
    return dec


def header(length: int, type_byte: int | None = None) -> bytes:
    raw = struct.pack(">I", length)
    return raw if type_byte is None else raw + bytes([type_byte])


def feed_chunks(dec: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    frames: list[Frame] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        frames += dec.feed(data[start:cut])
        start = cut
    return frames


def expect_error(code: str, dec: FrameDecoder, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
    assert info.value.code == code
    return info.value


# ----------------------------------------------------------------------------- encoding


def test_encode_layout() -> None:
    assert encode(FrameType.DATA, b"abc") == b"\x00\x00\x00\x04\x03abc"
    assert PING_FRAME == b"\x00\x00\x00\x01\x04"
    assert PONG_FRAME == b"\x00\x00\x00\x01\x05"
    assert BYE_FRAME == b"\x00\x00\x00\x01\x07"
    assert encode_data(bytearray(b"x")) == encode(FrameType.DATA, memoryview(b"x"))


@pytest.mark.parametrize("frame_type", [FrameType.PING, FrameType.PONG, FrameType.BYE])
def test_control_frames_refuse_payload(frame_type: FrameType) -> None:
    with pytest.raises(ValueError):
        encode(frame_type, b"x")


def test_encode_refuses_unknown_type() -> None:
    with pytest.raises(ValueError):
        encode(9, b"")  # type: ignore[arg-type]


@pytest.mark.parametrize("heartbeat", [0, -1, float("nan"), float("inf"), True, "5"])
def test_welcome_refuses_bad_heartbeat(heartbeat: object) -> None:
    with pytest.raises(ValueError):
        encode_welcome("s", "srv", heartbeat)  # type: ignore[arg-type]


def test_welcome_and_error_payloads() -> None:
    (welcome,) = FrameDecoder(MAX_FRAME, 0, role="client").feed(encode_welcome("s1", "a", 30))
    assert json.loads(welcome.payload) == {
        "v": 1,
        "session": "s1",
        "server": "a",
        "heartbeat_s": 30,
    }
    (error,) = FrameDecoder(MAX_FRAME, 0, role="client").feed(encode_error("bad_type", "nope"))
    assert error.type is FrameType.ERROR
    assert json.loads(error.payload) == {"code": "bad_type", "message": "nope"}


# ----------------------------------------------------------------------------- round trips

CLIENT_FRAMES = [
    (FrameType.DATA, b""),
    (FrameType.DATA, b"\x00\x01binary\xff"),
    (FrameType.PING, b""),
    (FrameType.PONG, b""),
    (FrameType.BYE, b""),
]
GATEWAY_FRAMES = [
    (FrameType.WELCOME, b'{"v":1}'),
    (FrameType.DATA, b"reply"),
    (FrameType.PING, b""),
    (FrameType.PONG, b""),
    (FrameType.ERROR, b'{"code":"x","message":"y"}'),
    (FrameType.BYE, b""),
]


def test_round_trip_hello() -> None:
    (frame,) = gateway_decoder().feed(HELLO)
    assert frame == Frame(FrameType.HELLO, frame.payload)
    assert parse_hello(frame.payload) == Hello(v=1, client_id="c-1", token=None)


@pytest.mark.parametrize(("frame_type", "payload"), CLIENT_FRAMES)
def test_round_trip_from_client(frame_type: FrameType, payload: bytes) -> None:
    dec = greeted_decoder()
    assert dec.feed(encode(frame_type, payload)) == [Frame(frame_type, payload)]
    assert dec.buffered == 0


@pytest.mark.parametrize(("frame_type", "payload"), GATEWAY_FRAMES)
def test_round_trip_from_gateway(frame_type: FrameType, payload: bytes) -> None:
    dec = FrameDecoder(MAX_FRAME, 0, role="client")
    assert dec.feed(encode(frame_type, payload)) == [Frame(frame_type, payload)]


STREAM_FRAMES = [
    Frame(FrameType.HELLO, encode_hello("id", "tok")[5:]),
    Frame(FrameType.DATA, b"first"),
    Frame(FrameType.PING, b""),
    Frame(FrameType.DATA, bytes(range(256)) * 3),
    Frame(FrameType.DATA, b""),
    Frame(FrameType.PONG, b""),
    Frame(FrameType.BYE, b""),
]
STREAM = b"".join(encode(f.type, f.payload) for f in STREAM_FRAMES)


def test_many_frames_in_one_read() -> None:
    dec = gateway_decoder()
    assert dec.feed(STREAM) == STREAM_FRAMES
    assert dec.buffered == 0


def test_every_split_point() -> None:
    for cut in range(len(STREAM) + 1):
        assert feed_chunks(gateway_decoder(), STREAM, [cut]) == STREAM_FRAMES, cut


def test_every_pair_of_split_points_in_the_head() -> None:
    head = len(STREAM) - 6 * 256  # everything up to the big frame, where the edge cases are
    for a in range(head):
        for b in range(a, head):
            assert feed_chunks(gateway_decoder(), STREAM, [a, b]) == STREAM_FRAMES, (a, b)


def test_byte_at_a_time_and_buffered() -> None:
    dec = gateway_decoder()
    frames: list[Frame] = []
    for i in range(len(STREAM)):
        frames += dec.feed(STREAM[i : i + 1])
        assert dec.buffered < 6 * 256  # never more than one partial frame
    assert frames == STREAM_FRAMES
    assert dec.buffered == 0


def test_megabyte_one_byte_at_a_time() -> None:
    # Quadratic buffering would take minutes here; linear takes about a second.
    size = 1 << 20
    dec = FrameDecoder(size, MAX_HELLO)
    dec.feed(HELLO)
    data = encode_data(b"z" * size)
    frames: list[Frame] = []
    view = memoryview(data)
    for i in range(len(data)):
        frames += dec.feed(view[i : i + 1])
    assert frames == [Frame(FrameType.DATA, b"z" * size)]
    assert dec.buffered == 0


def test_empty_feed() -> None:
    dec = gateway_decoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0
    assert not dec.greeted


# ----------------------------------------------------------------------------- limits


def test_hello_at_limit_is_accepted() -> None:
    dec = gateway_decoder()
    assert dec.max_payload == MAX_HELLO
    (frame,) = dec.feed(header(MAX_HELLO + 1, FrameType.HELLO) + b"x" * MAX_HELLO)
    assert len(frame.payload) == MAX_HELLO
    assert dec.greeted
    assert dec.max_payload == MAX_FRAME


def test_oversized_hello_detected_from_header_alone() -> None:
    dec = gateway_decoder()
    err = expect_error("frame_too_large", dec, header(MAX_HELLO + 2))
    assert str(MAX_HELLO) in err.message
    assert dec.buffered == 0


def test_hello_limit_applies_even_when_max_frame_is_larger() -> None:
    dec = FrameDecoder(1 << 20, 16)
    expect_error("frame_too_large", dec, header(100, FrameType.HELLO))


def test_oversized_after_hello() -> None:
    dec = greeted_decoder()
    assert dec.feed(header(MAX_FRAME + 1, FrameType.DATA)) == []  # exactly at the limit: wait
    dec = greeted_decoder()
    expect_error("frame_too_large", dec, header(MAX_FRAME + 2))


def test_max_length_header() -> None:
    expect_error("frame_too_large", greeted_decoder(), b"\xff\xff\xff\xff")


@pytest.mark.parametrize("greeted", [False, True])
def test_zero_length(greeted: bool) -> None:
    dec = greeted_decoder() if greeted else gateway_decoder()
    expect_error("bad_frame", dec, b"\x00\x00\x00\x00")


def test_negative_limits_rejected() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(-1, 10)


# ----------------------------------------------------------------------------- types and order


@pytest.mark.parametrize("type_byte", [0, 8, 42, 255])
def test_unknown_type(type_byte: int) -> None:
    expect_error("bad_type", greeted_decoder(), header(1, type_byte))


def test_unknown_type_as_first_frame() -> None:
    expect_error("bad_type", gateway_decoder(), header(1, 99))


@pytest.mark.parametrize("frame_type", [t for t in FrameType if t is not FrameType.HELLO])
def test_first_frame_must_be_hello(frame_type: FrameType) -> None:
    # Detected from the 5-byte header, before the payload arrives.
    expect_error("not_hello", gateway_decoder(), header(10, frame_type))


@pytest.mark.parametrize(
    "frame_type", [FrameType.HELLO, FrameType.WELCOME, FrameType.ERROR, FrameType.ACK]
)
def test_frames_a_client_may_not_send_after_hello(frame_type: FrameType) -> None:
    expect_error("bad_type", greeted_decoder(), header(3, frame_type))


def test_client_role_refuses_hello_and_skips_sniffing() -> None:
    dec = FrameDecoder(MAX_FRAME, 0, role="client")
    assert dec.greeted
    expect_error("bad_type", dec, HELLO)
    # No HTTP sniffing on the client side: "GET " is just a (too large) length there.
    expect_error("frame_too_large", FrameDecoder(MAX_FRAME, 0, role="client"), b"GET ")


@pytest.mark.parametrize("frame_type", [FrameType.PING, FrameType.PONG, FrameType.BYE])
def test_control_frame_with_payload(frame_type: FrameType) -> None:
    expect_error("bad_frame", greeted_decoder(), header(2, frame_type))


def test_error_is_sticky_and_frees_the_buffer() -> None:
    dec = greeted_decoder()
    dec.feed(b"\x00\x00")
    first = expect_error("bad_type", dec, header(1, 77)[2:])
    assert dec.buffered == 0
    with pytest.raises(ProtocolError) as again:
        dec.feed(PING_FRAME)
    assert again.value is first


# ----------------------------------------------------------------------------- sniffing

HTTP_METHODS = ["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT"]


@pytest.mark.parametrize("method", HTTP_METHODS)
def test_http_request_line(method: str) -> None:
    request = f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    assert sniff_http(request)
    expect_error("http_not_supported", gateway_decoder(), request)


@pytest.mark.parametrize("method", HTTP_METHODS)
def test_http_request_line_split(method: str) -> None:
    dec = gateway_decoder()
    request = f"{method} /index.html HTTP/1.1\r\n".encode()
    for i in range(len(method)):
        assert dec.feed(request[i : i + 1]) == [], i
    expect_error("http_not_supported", dec, request[len(method) :])


@pytest.mark.parametrize("data", [b"GETX", b"get / HTTP/1.1", b"\x00\x00\x00\x05\x01", b"", b"GE"])
def test_not_http(data: bytes) -> None:
    assert not sniff_http(data)


def test_tls_client_hello() -> None:
    record = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert sniff_tls(record)
    assert not sniff_tls(HELLO)
    expect_error("tls_not_supported", gateway_decoder(), record)
    dec = gateway_decoder()
    assert dec.feed(b"\x16") == []
    expect_error("tls_not_supported", dec, b"\x03\x03")


def test_http_inside_a_frame_is_just_data() -> None:
    payload = b"GET / HTTP/1.1\r\n\r\n"
    assert greeted_decoder().feed(encode_data(payload)) == [Frame(FrameType.DATA, payload)]


def test_http_400_response_is_complete() -> None:
    head, _, body = HTTP_400_RESPONSE.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    assert int(fields[b"Content-Length"]) == len(body)
    assert fields[b"Connection"] == b"close"
    assert b"not HTTP" in body


# ----------------------------------------------------------------------------- HELLO payload


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"v":1}', Hello(1, None, None)),
        (b'{"v":1,"client_id":"a","token":"t"}', Hello(1, "a", "t")),
        (b'{"v":1,"client_id":null,"token":null}', Hello(1, None, None)),
        (b'{"v":1,"future":[1,2,3]}', Hello(1, None, None)),
        ('{"v":1,"client_id":"ключ"}'.encode(), Hello(1, "ключ", None)),
        (json.dumps({"v": 1, "client_id": "x" * MAX_CLIENT_ID_CHARS}).encode(), None),
        # NUL, right-to-left override, astral and combining characters are valid Unicode
        (b'{"v":1,"client_id":"a\\u0000b"}', Hello(1, "a\x00b", None)),
        ('{"v":1,"client_id":"\u202egnp.exe"}'.encode(), Hello(1, "\u202egnp.exe", None)),
        ('{"v":1,"client_id":"\U0001f600e\u0301"}'.encode(), Hello(1, "\U0001f600e\u0301", None)),
        (b'{"v":1,"client_id":"\\ud83d\\ude00"}', Hello(1, "\U0001f600", None)),  # a pair
        (b'{"v":2,"client_id":"a"}', Hello(2, "a", None)),  # sequence numbers and ACKs
    ],
)
def test_parse_hello_ok(payload: bytes, expected: Hello | None) -> None:
    hello = parse_hello(payload)
    if expected is not None:
        assert hello == expected
    assert hello.v in (1, 2)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello", id="not-json"),
        pytest.param(b'{"v":1', id="truncated"),
        pytest.param(b"[1]", id="list"),
        pytest.param(b'"v"', id="string"),
        pytest.param(b"1", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="missing-v"),
        pytest.param(b'{"v":3}', id="v3"),
        pytest.param(b'{"v":0}', id="v0"),
        pytest.param(b'{"v":"1"}', id="v-string"),
        pytest.param(b'{"v":true}', id="v-bool"),
        pytest.param(b'{"v":1.0}', id="v-float"),
        pytest.param(b'{"v":NaN}', id="nan"),
        pytest.param(b'{"v":1,"client_id":5}', id="client-id-int"),
        pytest.param(b'{"v":1,"client_id":""}', id="client-id-empty"),
        pytest.param(b'{"v":1,"token":["t"]}', id="token-list"),
        pytest.param(b'{"v":1,"token":{}}', id="token-object"),
        pytest.param(
            json.dumps({"v": 1, "client_id": "x" * (MAX_CLIENT_ID_CHARS + 1)}).encode(),
            id="client-id-too-long",
        ),
        pytest.param(json.dumps({"v": 1, "token": "t" * 257}).encode(), id="token-too-long"),
        pytest.param(b"[" * 100_000, id="deep-array"),
        pytest.param(b'{"a":' * 100_000, id="deep-object"),
        pytest.param(b'{"v":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="deep-valid"),
        pytest.param(b'{"v":1,"client_id":"\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b"\xef\xbb\xbf" + b'{"v":1}', id="utf8-bom"),
        pytest.param(b'{"v":1,"client_id":"\xed\xa0\x80"}', id="surrogate-as-utf8"),
        pytest.param(b'{"v":1,"client_id":"\xc0\x80"}', id="overlong-nul"),
        # lone surrogates spelled as JSON escapes: valid JSON, not encodable as UTF-8
        pytest.param(b'{"v":1,"client_id":"\\ud800"}', id="client-id-lone-high-surrogate"),
        pytest.param(b'{"v":1,"client_id":"x\\udfff"}', id="client-id-lone-low-surrogate"),
        pytest.param(b'{"v":1,"token":"\\udc00"}', id="token-lone-surrogate"),
    ],
)
def test_parse_hello_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_hello(payload)
    assert info.value.code == "bad_hello"


# ----------------------------------------------------------------------------- properties

client_frames = st.one_of(
    st.builds(Frame, st.just(FrameType.DATA), st.binary(max_size=300)),
    st.sampled_from([FrameType.PING, FrameType.PONG, FrameType.BYE]).map(lambda t: Frame(t, b"")),
)
gateway_frames = st.one_of(
    st.builds(
        Frame,
        st.sampled_from([FrameType.WELCOME, FrameType.DATA, FrameType.ERROR]),
        st.binary(max_size=300),
    ),
    st.sampled_from([FrameType.PING, FrameType.PONG, FrameType.BYE]).map(lambda t: Frame(t, b"")),
)


@settings(max_examples=200, deadline=None)
@given(
    hello=st.binary(max_size=MAX_HELLO),
    frames=st.lists(client_frames, max_size=20),
    data=st.data(),
)
def test_any_chunking_decodes_the_same_frames(
    hello: bytes, frames: list[Frame], data: st.DataObject
) -> None:
    sent = [Frame(FrameType.HELLO, hello), *frames]
    wire = b"".join(encode(f.type, f.payload) for f in sent)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    dec = FrameDecoder(MAX_FRAME, MAX_HELLO)
    assert feed_chunks(dec, wire, cuts) == sent
    assert dec.buffered == 0


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(gateway_frames, max_size=20), data=st.data())
def test_any_chunking_decodes_the_same_frames_client_side(
    frames: list[Frame], data: st.DataObject
) -> None:
    wire = b"".join(encode(f.type, f.payload) for f in frames)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    assert feed_chunks(FrameDecoder(MAX_FRAME, 0, role="client"), wire, cuts) == frames


# Raw garbage, and garbage built from plausible headers so the fuzzing reaches past byte 5.
plausible_chunk = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda n, t, body: struct.pack(">IB", n, t) + body,
        st.integers(0, 80),
        st.integers(0, 9),
        st.binary(max_size=80),
    ),
    st.sampled_from([HELLO, PING_FRAME, b"GET ", b"\x16\x03", b"\x00\x00\x00\x00"]),
)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(plausible_chunk, max_size=12),
    role=st.sampled_from(["gateway", "client"]),
    greet=st.booleans(),
)
def test_garbage_only_raises_protocol_error(chunks: list[bytes], role: str, greet: bool) -> None:
    dec = FrameDecoder(100, 50, role=role)  # type: ignore[arg-type]
    if greet and role == "gateway":
        dec.feed(HELLO)
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert isinstance(frame.type, FrameType)
                assert len(frame.payload) <= 100
            assert dec.buffered <= 100 + 5
    except ProtocolError as exc:
        assert exc.code in {
            "bad_frame",
            "frame_too_large",
            "bad_type",
            "not_hello",
            "http_not_supported",
            "tls_not_supported",
        }


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_parse_hello_only_raises_protocol_error(payload: bytes) -> None:
    try:
        hello = parse_hello(payload)
    except ProtocolError as exc:
        assert exc.code == "bad_hello"
    else:
        assert hello.v == 1


@settings(max_examples=200, deadline=None)
@given(
    client_id=st.none() | st.text(min_size=1, max_size=MAX_CLIENT_ID_CHARS),
    token=st.none() | st.text(min_size=1, max_size=256),
)
def test_hello_round_trip(client_id: str | None, token: str | None) -> None:
    (frame,) = FrameDecoder(MAX_FRAME, 1 << 16).feed(encode_hello(client_id, token))
    assert parse_hello(frame.payload) == Hello(1, client_id, token)


# ----------------------------------------------------------------------------- feed_until_error


def test_frames_before_the_error_are_kept() -> None:
    dec = gateway_decoder()
    frames, error = dec.feed_until_error(HELLO + encode_data(b"a") + PING_FRAME + header(0))
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.DATA, FrameType.PING]
    assert error is not None and error.code == "bad_frame"
    assert dec.buffered == 0
    assert dec.feed_until_error(PING_FRAME) == ([], error)  # dead, the same error
    with pytest.raises(ProtocolError) as info:
        dec.feed(PING_FRAME)
    assert info.value is error


def feed_until_error_chunks(data: bytes, cuts: list[int]) -> tuple[list[Frame], str | None]:
    dec = FrameDecoder(100, 50)
    frames: list[Frame] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        got, error = dec.feed_until_error(data[start:cut])
        frames += got
        start = cut
        if error is not None:
            return frames, error.code
    return frames, None


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(plausible_chunk, max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_answer_does_not_depend_on_how_the_stream_was_split(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """The same bytes give the same frames and the same error, however TCP cut them."""
    data = HELLO + b"".join(chunks)
    whole = feed_until_error_chunks(data, [])
    assert feed_until_error_chunks(data, [c for c in cuts if c <= len(data)]) == whole


# ----------------------------------------------------------------------------- protocol v2


def test_v2_sequence_numbers_and_acks() -> None:
    assert split_seq(b"\x00" * 7 + b"\x05hello") == (5, b"hello")
    assert split_seq((2**63 - 1).to_bytes(8, "big")) == (2**63 - 1, b"")
    for short in (b"", b"1234567"):
        with pytest.raises(ProtocolError) as info:
            split_seq(short)
        assert info.value.code == "bad_frame"
    with pytest.raises(ProtocolError) as info:
        split_seq((2**63).to_bytes(8, "big") + b"x")
    assert info.value.code == "bad_frame"
    ack = encode_ack((7).to_bytes(8, "big"))
    assert ack == b"\x00\x00\x00\x09\x08" + (7).to_bytes(8, "big")
    # a client decodes ACK; WELCOME says the version the session speaks
    frames = FrameDecoder(MAX_FRAME, 0, role="client").feed(ack + encode_welcome("s", "a", 1, 2))
    assert [f.type for f in frames] == [FrameType.ACK, FrameType.WELCOME]
    assert json.loads(frames[1].payload)["v"] == 2
    assert json.loads(FrameDecoder(MAX_FRAME, 4096).feed(encode_hello(version=2))[0].payload) == {
        "v": 2
    }
