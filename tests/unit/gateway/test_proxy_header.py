"""The PROXY protocol header decoder (v1 text, v2 binary): every split point, the
addresses it gives, and every malformed header refused (no I/O)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from workers.gateway.proxy_header import V2_SIGNATURE, ProxiedAddress, ProxyHeaderDecoder
from workers.gateway.wire import ProtocolError


def v2(
    src: str,
    sport: int,
    *,
    command: int = 1,
    version: int = 2,
    family: int | None = None,
    tlv: bytes = b"",
) -> bytes:
    ip = ipaddress.ip_address(src)
    if ip.version == 4:
        fam = 0x11 if family is None else family
        body = (
            ip.packed + ipaddress.IPv4Address("10.0.0.1").packed + struct.pack(">HH", sport, 7000)
        )
    else:
        fam = 0x21 if family is None else family
        body = ip.packed + ipaddress.IPv6Address("::1").packed + struct.pack(">HH", sport, 7000)
    body += tlv
    return (
        V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack(">H", len(body)) + body
    )


def decode_split(data: bytes, cut: int) -> tuple[ProxiedAddress, bytes]:
    decoder = ProxyHeaderDecoder()
    first = decoder.feed(data[:cut])
    if first is not None:
        address, rest = first
        return address, rest + data[cut:]
    second = decoder.feed(data[cut:])
    assert second is not None
    return second


GOOD = [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 7000\r\n", ProxiedAddress("203.0.113.7:51000", 1)),
    (b"PROXY TCP6 2001:db8::7 ::1 51000 7000\r\n", ProxiedAddress("[2001:db8::7]:51000", 1)),
    (b"PROXY UNKNOWN\r\n", ProxiedAddress(None, 1)),
    (b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", ProxiedAddress(None, 1)),
    (v2("198.51.100.9", 40000), ProxiedAddress("198.51.100.9:40000", 2)),
    (v2("2001:db8::9", 40001), ProxiedAddress("[2001:db8::9]:40001", 2)),
    (v2("198.51.100.9", 1, tlv=b"\x04\x00\x01x"), ProxiedAddress("198.51.100.9:1", 2)),
    (v2("198.51.100.9", 1, command=0), ProxiedAddress(None, 2)),  # LOCAL: a health check
    (v2("198.51.100.9", 1, family=0x31), ProxiedAddress(None, 2)),  # AF_UNIX
]


@pytest.mark.parametrize(("header", "expected"), GOOD)
def test_header_at_every_split_point_leaves_the_rest(
    header: bytes, expected: ProxiedAddress
) -> None:
    data = header + b"\x00\x00\x00\x03first bytes"
    for cut in range(len(data) + 1):
        assert decode_split(data, cut) == (expected, b"\x00\x00\x00\x03first bytes")


def test_header_fed_byte_by_byte() -> None:
    header = v2("192.0.2.1", 9)
    decoder = ProxyHeaderDecoder()
    for i in range(len(header) - 1):
        assert decoder.feed(header[i : i + 1]) is None
    assert decoder.feed(header[-1:] + b"x") == (ProxiedAddress("192.0.2.1:9", 2), b"x")


BAD = [
    (b'\x00\x00\x00\x0b\x01{"v":1}', "must start with a PROXY"),  # a HELLO, no header
    (b"GET / HTTP/1.1\r\n", "must start with a PROXY"),
    (b"PROXX TCP4", "must start with a PROXY"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),  # 107 bytes never come
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "not 'PROXY TCP4"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not 'PROXY TCP4"),
    (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "not an IP address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not TCP4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "out of range"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "not a number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xff 2\r\n", "not ASCII"),
    (b"PROXY " + b"A" * 120, "longer than 107"),
    (v2("1.2.3.4", 1, version=1), "version 1"),
    (v2("1.2.3.4", 1, command=2), "neither LOCAL nor PROXY"),
    (v2("1.2.3.4", 1, family=0x51), "family 5"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04abcd", "need 12 bytes"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0cabcdabcdabcd", "need 36 bytes"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "larger than 4096"),
    (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00", "must start with a PROXY"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_malformed_header_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        decoder = ProxyHeaderDecoder()
        for i in range(len(data)):  # byte by byte: refused as soon as it is certain
            decoder.feed(data[i : i + 1])
        if "not ended by CRLF" in message:
            decoder.feed(b"x" * 120)
    assert info.value.code == "bad_proxy_header"
