"""The PROXY protocol header (HAProxy's v1 text and v2 binary forms), read with no I/O.

A load balancer in front of the gateway (HAProxy, a Kubernetes LoadBalancer with
``proxy-protocol`` on, AWS NLB) opens each connection with one header that names the client
it proxies. On a listener with ``proxy_protocol: true`` the session feeds its first bytes to
:class:`ProxyHeaderDecoder` until it has the header; the source address becomes
``x-client-addr`` and the bytes after it go to the listener's framing. A connection that
does not start with a valid header is refused: anyone could otherwise claim any address.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from workers.gateway.wire import ProtocolError

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the whole v1 line, CRLF included (spec 2.1)
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEADER = struct.Struct(">12sBBH")  # signature, version+command, family+protocol, length
_V2_MAX_BODY: Final = 4096  # addresses plus TLVs; the spec allows 65535, nobody sends that

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_AF_INET: Final = 0x1
_AF_INET6: Final = 0x2
_AF_UNIX: Final = 0x3


@dataclass(frozen=True, slots=True)
class ProxiedAddress:
    """What the header said. ``source`` is None for a LOCAL (health check) or UNKNOWN
    header: the connection is the proxy's own, and its real peer address stands."""

    source: str | None
    version: int


def format_addr(host: str, port: int) -> str:
    """``ip:port``, IPv6 in brackets, as ``x-client-addr`` shows a direct client."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_proxy_header", message)


class ProxyHeaderDecoder:
    """Feed the connection's first bytes until :meth:`feed` returns the header; it then
    also returns the bytes that followed it. Raises ProtocolError ``bad_proxy_header``."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> tuple[ProxiedAddress, bytes] | None:
        buf = self._buf = self._buf + data
        head = buf[: len(V2_SIGNATURE)]
        if V2_SIGNATURE.startswith(head) and buf[:1] == b"\r":
            return self._v2(buf)
        if V1_PREFIX.startswith(buf[: len(V1_PREFIX)]):
            return self._v1(buf)
        raise _bad("the connection must start with a PROXY protocol v1 or v2 header")

    def _v1(self, buf: bytes) -> tuple[ProxiedAddress, bytes] | None:
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise _bad(f"PROXY v1 line longer than {V1_MAX} bytes or not ended by CRLF")
            return None
        line, rest = buf[:end], buf[end + 2 :]
        try:
            parts = line.decode("ascii").split(" ")
        except UnicodeDecodeError:
            raise _bad("PROXY v1 line is not ASCII") from None
        if len(parts) >= 2 and parts[0] == "PROXY" and parts[1] == "UNKNOWN":
            return ProxiedAddress(None, 1), rest
        if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
            raise _bad("PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
        _, family, src, dst, sport, dport = parts
        version = 4 if family == "TCP4" else 6
        for text in (src, dst):
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise _bad(f"PROXY v1 address {text!r} is not an IP address") from None
            if address.version != version:
                raise _bad(f"PROXY v1 address {text!r} is not {family}")
        for text in (sport, dport):
            # digits only, no sign, no leading zero (spec 2.1)
            if not text.isdigit() or not text.isascii() or (text != "0" and text[0] == "0"):
                raise _bad(f"PROXY v1 port {text!r} is not a number")
            if int(text) > 65535:
                raise _bad(f"PROXY v1 port {text} is out of range")
        return ProxiedAddress(format_addr(src, int(sport)), 1), rest

    def _v2(self, buf: bytes) -> tuple[ProxiedAddress, bytes] | None:
        if len(buf) < _V2_HEADER.size:
            if not V2_SIGNATURE.startswith(buf[: len(V2_SIGNATURE)]):
                raise _bad("the connection must start with a PROXY protocol v1 or v2 header")
            return None
        signature, ver_cmd, fam, length = _V2_HEADER.unpack_from(buf)
        if signature != V2_SIGNATURE:
            raise _bad("the connection must start with a PROXY protocol v1 or v2 header")
        if ver_cmd >> 4 != 2:
            raise _bad(f"PROXY v2 header of version {ver_cmd >> 4}")
        command = ver_cmd & 0xF
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise _bad(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
        if length > _V2_MAX_BODY:
            raise _bad(f"PROXY v2 header of {length} bytes is larger than {_V2_MAX_BODY}")
        end = _V2_HEADER.size + length
        if len(buf) < end:
            return None
        body, rest = buf[_V2_HEADER.size : end], buf[end:]
        if command == _CMD_LOCAL:
            return ProxiedAddress(None, 2), rest
        family = fam >> 4
        if family == _AF_INET:
            if length < 12:
                raise _bad("PROXY v2 IPv4 addresses need 12 bytes")
            src = str(ipaddress.IPv4Address(body[0:4]))
            (port,) = struct.unpack_from(">H", body, 8)
        elif family == _AF_INET6:
            if length < 36:
                raise _bad("PROXY v2 IPv6 addresses need 36 bytes")
            src = str(ipaddress.IPv6Address(body[0:16]))
            (port,) = struct.unpack_from(">H", body, 32)
        elif family in (0, _AF_UNIX):
            return ProxiedAddress(None, 2), rest  # UNSPEC or a unix socket: no IP to give
        else:
            raise _bad(f"PROXY v2 address family {family} is unknown")
        return ProxiedAddress(format_addr(src, port), 2), rest
