"""Writes the gateway's bad-input corpus: one ``.bin`` file per case (the exact bytes a
client sends on a fresh connection) and ``index.json`` with the answer docs/gateway.md
promises for it, given the limits in ``index.json`` (max_hello_frame 4096, max_frame 65536,
token ``corpus-token``, an echo backend).

    python tests/corpus/gateway/make_corpus.py      # rewrite the files (they are checked in)

The expectations are written here by hand from the rejection table; the test replays each
file against a running gateway and also checks them against ``bench.chaos.gateway.wire.expected``.
"""

from __future__ import annotations

import json
import random
import ssl
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKEN = "corpus-token"


def frame(kind: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    return struct.pack(">IB", len(payload) + 1 if length is None else length, kind) + payload


def hello(doc: object | None = None, raw: bytes | None = None) -> bytes:
    if raw is None:
        raw = json.dumps(doc if doc is not None else {"v": 1, "token": TOKEN}).encode()
    return frame(1, raw)


OK = hello()
OK2 = hello({"v": 2, "token": TOKEN})
DATA, PING, PONG, BYE = 3, 4, 5, 7


def seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


def tls_client_hello() -> bytes:
    """The first bytes a real TLS client sends (made with this Python's ssl module)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="gateway.example")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def cases() -> list[tuple[str, bytes, str, str]]:
    rnd = random.Random(20240606)
    deep = b"[" * 2000 + b"]" * 2000
    out: list[tuple[str, bytes, str, str]] = [
        # ---------------------------------------------------------------- not our protocol
        ("http_get", b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n", "http_400", "browser or probe"),
        ("http_post", b"POST /api HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", "http_400", ""),
        ("http_connect", b"CONNECT rabbit:5672 HTTP/1.1\r\n\r\n", "http_400", "proxy probe"),
        ("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http_400", "HTTP/2 preface"),
        ("tls_client_hello", tls_client_hello(), "error:tls_not_supported", "real ClientHello"),
        ("ssh_banner", b"SSH-2.0-OpenSSH_9.6\r\n", "error:frame_too_large", "reads as huge LENGTH"),
        ("amqp_header", b"AMQP\x00\x00\x09\x01", "error:frame_too_large", "AMQP client"),
        ("redis_ping", b"*1\r\n$4\r\nPING\r\n", "error:frame_too_large", ""),
        ("random_64", bytes(rnd.randrange(256) for _ in range(64)), "error:frame_too_large", ""),
        ("http_lowercase", b"get / HTTP/1.1\r\n\r\n", "error:frame_too_large", "not a method"),
        # ---------------------------------------------------------------- framing
        ("zero_length", b"\x00\x00\x00\x00", "error:bad_frame", "LENGTH 0: no type byte"),
        ("length_max", b"\xff\xff\xff\xff\x01", "error:frame_too_large", "LENGTH 2^32-1"),
        ("hello_length_over_limit", frame(1, length=4098), "error:frame_too_large", "header only"),
        (
            "hello_over_limit",
            hello(raw=json.dumps({"v": 1, "token": TOKEN, "pad": "x" * 4100}).encode()),
            "error:frame_too_large",
            "payload 4097+ bytes",
        ),
        (
            "hello_at_limit",
            hello(raw=(json.dumps({"v": 1, "token": TOKEN}) + " " * 4096)[:4096].encode())
            + frame(BYE),
            "bye",
            "exactly max_hello_frame",
        ),
        ("type_0", frame(0, b"x"), "error:bad_type", ""),
        ("type_8", frame(8, b"x"), "error:not_hello", "ACK is gateway-only (v2)"),
        ("type_255", frame(255), "error:bad_type", ""),
        ("welcome_from_client", frame(2, b"{}"), "error:not_hello", "first frame not HELLO"),
        ("data_before_hello", frame(DATA, b"hi"), "error:not_hello", ""),
        ("ping_before_hello", frame(PING), "error:not_hello", ""),
        ("bye_before_hello", frame(BYE), "error:not_hello", ""),
        ("error_after_hello", OK + frame(6, b"{}"), "error:bad_type", "ERROR is gateway-only"),
        ("welcome_after_hello", OK + frame(2, b"{}"), "error:bad_type", ""),
        ("second_hello", OK + OK, "error:bad_type", "cannot re-pick the server"),
        ("ping_with_payload", OK + frame(PING, b"x"), "error:bad_frame", ""),
        ("pong_with_payload", OK + frame(PONG, b"x"), "error:bad_frame", ""),
        ("bye_with_payload", OK + frame(BYE, b"x"), "error:bad_frame", ""),
        ("zero_length_after_hello", OK + b"\x00\x00\x00\x00", "error:bad_frame", ""),
        ("data_over_limit", OK + frame(DATA, length=65538), "error:frame_too_large", ""),
        ("unknown_type_after_hello", OK + frame(9, b"x"), "error:bad_type", ""),
        ("ack_from_client", OK + frame(8, seq(1)), "error:bad_type", "ACK is gateway-only"),
        # ---------------------------------------------------------------- protocol v2
        ("v2_data_short", OK2 + frame(DATA, b"1234567"), "error:bad_frame", "7-byte DATA"),
        ("v2_data_empty", OK2 + frame(DATA, b""), "error:bad_frame", "no sequence number"),
        (
            "v2_seq_over",
            OK2 + frame(DATA, b"\x80" + bytes(7) + b"x"),
            "error:bad_frame",
            "sequence number over 2**63 - 1",
        ),
        (
            "v2_good_then_short",
            OK2 + frame(DATA, seq(5) + b"a") + frame(DATA, b"x"),
            "error:bad_frame",
            "the first is published (and ACKed, if in time), then ERROR",
        ),
        (
            "v2_session",
            OK2
            + frame(DATA, seq(1) + b"one")
            + frame(DATA, seq(2))
            + frame(PING)
            + frame(DATA, seq(2) + b"again")
            + frame(DATA, seq(0x7FFF_FFFF_FFFF_FFFF) + bytes(range(256))),
            "open",
            "ACKs in order; an empty message; a repeated number is the client's business",
        ),
        ("v1_data_short", OK + frame(DATA, b"1234567"), "open", "version 1: any DATA"),
        # ---------------------------------------------------------------- HELLO payload
        ("hello_empty", hello(raw=b""), "error:bad_hello", ""),
        ("hello_not_json", hello(raw=b"{v:1}"), "error:bad_hello", ""),
        ("hello_array", hello(raw=b"[1]"), "error:bad_hello", ""),
        ("hello_v2", hello({"v": 2, "token": TOKEN}), "open", "protocol version 2"),
        ("hello_v3", hello({"v": 3, "token": TOKEN}), "error:bad_hello", "no version 3"),
        ("hello_v0", hello({"v": 0, "token": TOKEN}), "error:bad_hello", ""),
        ("hello_v_true", hello({"v": True, "token": TOKEN}), "error:bad_hello", "True == 1"),
        ("hello_v_float", hello(raw=b'{"v":1.0,"token":"corpus-token"}'), "error:bad_hello", ""),
        ("hello_v_huge", hello(raw=b'{"v":1e400,"token":"corpus-token"}'), "error:bad_hello", ""),
        ("hello_nan", hello(raw=b'{"v":NaN}'), "error:bad_hello", "not JSON"),
        (
            "hello_dup_keys",
            hello(raw=b'{"v":1,"v":3,"token":"corpus-token"}'),
            "error:bad_hello",
            "the last one counts",
        ),
        (
            "hello_client_id_int",
            hello({"v": 1, "client_id": 7, "token": TOKEN}),
            "error:bad_hello",
            "",
        ),
        (
            "hello_client_id_empty",
            hello({"v": 1, "client_id": "", "token": TOKEN}),
            "error:bad_hello",
            "",
        ),
        (
            "hello_client_id_257",
            hello({"v": 1, "client_id": "c" * 257, "token": TOKEN}),
            "error:bad_hello",
            "",
        ),
        ("hello_token_list", hello({"v": 1, "token": [TOKEN]}), "error:bad_hello", ""),
        ("hello_deep_array", hello(raw=deep), "error:bad_hello", "2000 levels"),
        (
            "hello_deep_inside",
            hello(raw=b'{"v":1,"token":"corpus-token","x":' + deep[:3000] + b"}"),
            "error:bad_hello",
            "nesting under an unknown key (unbalanced at the limit)",
        ),
        (
            "hello_deep_valid",
            hello(raw=b'{"v":1,"token":"corpus-token","x":' + b"[" * 1500 + b"]" * 1500 + b"}"),
            "error:bad_hello",
            "1500 levels: deeper than the JSON parser recurses",
        ),
        (
            "hello_bom",
            hello(raw=b"\xef\xbb\xbf" + json.dumps({"v": 1}).encode()),
            "error:bad_hello",
            "",
        ),
        ("hello_invalid_utf8", hello(raw=b'{"v":1,"client_id":"\xff"}'), "error:bad_hello", ""),
        ("hello_overlong_nul", hello(raw=b'{"v":1,"client_id":"\xc0\x80"}'), "error:bad_hello", ""),
        (
            "hello_utf8_surrogate",
            hello(raw=b'{"v":1,"client_id":"\xed\xa0\x80"}'),
            "error:bad_hello",
            "",
        ),
        (
            "hello_lone_surrogate_client_id",
            hello(raw=b'{"v":1,"token":"corpus-token","client_id":"\\ud800"}'),
            "error:bad_hello",
            "valid JSON, not encodable",
        ),
        (
            "hello_lone_surrogate_token",
            hello(raw=b'{"v":1,"token":"\\udfff"}'),
            "error:bad_hello",
            "",
        ),
        # ---------------------------------------------------------------- tokens
        ("hello_no_token", hello({"v": 1}), "error:unauthorized", ""),
        ("hello_wrong_token", hello({"v": 1, "token": "corpus-token "}), "error:unauthorized", ""),
        ("hello_token_prefix", hello({"v": 1, "token": "corpus"}), "error:unauthorized", ""),
        ("hello_token_null", hello(raw=b'{"v":1,"token":null}'), "error:unauthorized", ""),
        # ---------------------------------------------------------------- accepted
        ("hello_bye", OK + frame(BYE), "bye", "the shortest session"),
        (
            "session_pipelined",
            OK
            + frame(DATA, b"one")
            + frame(PING)
            + frame(DATA, b"")
            + frame(PONG)
            + frame(DATA, bytes(range(256))),
            "open",
            "DATA, PING, empty DATA, PONG, binary DATA in one write",
        ),
        (
            "hello_nul_client_id",
            hello(raw=b'{"v":1,"token":"corpus-token","client_id":"a\\u0000b"}')
            + frame(DATA, b"n"),
            "open",
            "NUL is a valid character",
        ),
        (
            "hello_rtl_client_id",
            hello({"v": 1, "token": TOKEN, "client_id": "\u202egnp.exe\u200f\u0627"}),
            "open",
            "RTL override, RLM, Arabic",
        ),
        (
            "hello_astral_client_id",
            hello({"v": 1, "token": TOKEN, "client_id": "\U0001f600" * 256}),
            "open",
            "256 astral characters (1 KiB of UTF-8) is at the limit",
        ),
        (
            "hello_destination_fields",
            hello(
                {
                    "v": 1,
                    "token": TOKEN,
                    "server": "evil",
                    "queue": "gateway.server.evil",
                    "routing_key": "amq.rabbitmq.reply-to",
                    "exchange": "amq.topic",
                    "reply_to": "gateway.reply.other",
                }
            )
            + frame(DATA, b"gateway.server.evil"),
            "open",
            "unknown keys are ignored: no way to name a queue",
        ),
        (
            "data_looks_like_http",
            OK + frame(DATA, b"GET / HTTP/1.1\r\n\r\n") + frame(DATA, b"\x16\x03\x01"),
            "open",
            "inside a frame it is just data",
        ),
        ("data_at_limit", OK + frame(DATA, b"d" * 65536), "open", "exactly max_frame"),
    ]
    return out


def main() -> None:
    index = {
        "limits": {"max_hello_frame": 4096, "max_frame": 65536, "tokens": [TOKEN]},
        "cases": [],
    }
    for old in HERE.glob("*.bin"):
        old.unlink()
    for name, data, expect, note in cases():
        (HERE / f"{name}.bin").write_bytes(data)
        index["cases"].append({"file": f"{name}.bin", "expect": expect, "note": note})
    (HERE / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(index['cases'])} cases written to {HERE}")


if __name__ == "__main__":
    main()
