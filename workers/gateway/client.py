"""A small client of the gateway's TCP framing, and the ``rabbitmq-bridge gateway ...`` commands.

:class:`GatewayClient` is what the tests, the benchmark and ``rabbitmq-bridge gateway connect`` use:
HELLO, WELCOME, DATA both ways, automatic PONG, BYE. The commands::

    rabbitmq-bridge gateway echo-server --id s1        a reference backend (registers, echoes)
    rabbitmq-bridge gateway connect --port 7000        stdin lines -> DATA, replies -> stdout
    rabbitmq-bridge gateway token --client-id ID --ttl 30d   a signed HELLO token for ID
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
from typing import Any

from workers.gateway.wire import (
    BYE_FRAME,
    PING_FRAME,
    PONG_FRAME,
    SEQ_BYTES,
    Frame,
    FrameDecoder,
    FrameType,
    encode_data,
    encode_hello,
)


class GatewayError(Exception):
    """The gateway answered ERROR (or closed) instead of what the client expected."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class GatewayClient:
    """One connection. ``recv()`` returns DATA payloads; PINGs are answered on the way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(64 * 1024 * 1024, 0, role="client")
        self.frames: list[Frame] = []
        self.welcome: dict[str, Any] = {}
        self.closed_by: Frame | None = None  # the ERROR or BYE that ended the session
        self.acks: list[int] = []  # protocol v2: the sequence numbers ACKed, in order

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 7000,
        *,
        client_id: str | None = None,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        version: int = 1,
    ) -> GatewayClient:
        """Connect, say HELLO, return once WELCOME arrived; GatewayError on ERROR.
        ``version=2``: send DATA with :meth:`send_seq`; the ACKs are in :attr:`acks`."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context), timeout
        )
        client = cls(reader, writer)
        writer.write(encode_hello(client_id, token, version=version))
        frame = await asyncio.wait_for(client.next_frame(), timeout)
        if frame is None or frame.type is not FrameType.WELCOME:
            client.close()
            raise client.error_of(frame)
        client.welcome = json.loads(frame.payload)
        return client

    @property
    def session(self) -> str:
        return str(self.welcome.get("session", ""))

    @property
    def server(self) -> str:
        return str(self.welcome.get("server", ""))

    @staticmethod
    def error_of(frame: Frame | None) -> GatewayError:
        if frame is None:
            return GatewayError("closed", "the gateway closed the connection")
        if frame.type is FrameType.ERROR:
            doc = json.loads(frame.payload)
            return GatewayError(doc.get("code", "?"), doc.get("message", ""))
        return GatewayError("unexpected", f"unexpected {frame.type.name} frame")

    async def next_frame(self) -> Frame | None:
        """The next frame of any type (PINGs answered and returned too); None at EOF."""
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        frame = self.frames.pop(0)
        if frame.type is FrameType.PING:
            self.writer.write(PONG_FRAME)
        elif frame.type is FrameType.ACK:
            self.acks.append(int.from_bytes(frame.payload, "big"))
        return frame

    async def recv(self, timeout: float | None = 10.0) -> bytes:
        """The next DATA payload; GatewayError if the session ends first."""
        while True:
            frame = await asyncio.wait_for(self.next_frame(), timeout)
            if frame is None or frame.type in (FrameType.ERROR, FrameType.BYE):
                self.closed_by = frame
                if frame is not None and frame.type is FrameType.BYE:
                    raise GatewayError("bye", "the gateway ended the session")
                raise self.error_of(frame)
            if frame.type is FrameType.DATA:
                return frame.payload

    async def send(self, payload: bytes) -> None:
        self.writer.write(encode_data(payload))
        await self.writer.drain()

    async def send_seq(self, seq: int, payload: bytes) -> None:
        """Protocol v2: DATA with its sequence number (the gateway ACKs it once safe)."""
        await self.send(seq.to_bytes(SEQ_BYTES, "big") + payload)

    async def request(self, payload: bytes, timeout: float = 10.0) -> bytes:
        await self.send(payload)
        return await self.recv(timeout)

    async def ping(self) -> None:
        self.writer.write(PING_FRAME)
        await self.writer.drain()

    async def bye(self, timeout: float = 5.0) -> None:
        """Say BYE and wait for the gateway's BYE (or the close)."""
        with contextlib.suppress(ConnectionError):
            self.writer.write(BYE_FRAME)
            await self.writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError, GatewayError):
            while True:
                frame = await asyncio.wait_for(self.next_frame(), timeout)
                if frame is None or frame.type is FrameType.BYE:
                    break
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def wait_closed(self, timeout: float = 10.0) -> Frame | None:
        """Read until EOF; return the last ERROR or BYE frame seen (None if none)."""
        last: Frame | None = None
        with contextlib.suppress(ConnectionError):
            while True:
                frame = await asyncio.wait_for(self.next_frame(), timeout)
                if frame is None:
                    break
                if frame.type in (FrameType.ERROR, FrameType.BYE):
                    last = frame
        self.close()
        return last


# -- CLI helpers --------------------------------------------------------------------------


def _cmd_echo_server(args: argparse.Namespace) -> int:
    from bridge.logs import setup_logging
    from bridge.settings import load_host_settings
    from workers.gateway.backend import run_echo_server

    settings = load_host_settings()
    setup_logging(settings.log_level, "text")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_echo_server(settings.amqp_url, args.id, args.heartbeat_s))
    return 0


async def _connect_loop(args: argparse.Namespace) -> int:
    context: ssl.SSLContext | None = None
    if args.tls:
        context = ssl.create_default_context(cafile=args.cafile)
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        client = await GatewayClient.connect(
            args.host, args.port, client_id=args.client_id, token=args.token, ssl_context=context
        )
    except (GatewayError, OSError) as exc:
        print(f"bridge: gateway refused: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(client.welcome), file=sys.stderr)
    loop = asyncio.get_running_loop()
    sent = received = 0
    all_in = asyncio.Event()

    async def printer() -> None:
        nonlocal received
        while True:
            frame = await client.next_frame()
            if frame is None:
                return
            if frame.type is FrameType.DATA:
                sys.stdout.write(frame.payload.decode("utf-8", "replace") + "\n")
                sys.stdout.flush()
                received += 1
                if received >= sent:
                    all_in.set()
            elif frame.type in (FrameType.ERROR, FrameType.BYE):
                print(f"{frame.type.name} {frame.payload.decode()}", file=sys.stderr)
                return

    reading = loop.create_task(printer())
    try:
        while not reading.done():
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            sent += 1
            all_in.clear()
            await client.send(line.rstrip("\n").encode())
        if not reading.done() and received < sent:
            # as many replies as lines is what an echo server gives; stop waiting then
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), args.linger)
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await client.bye()
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    """Print a signed token for ``--client-id``, with the gateway's own secret
    (``BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET``, from the environment or the secrets directory)."""
    import time

    from bridge.errors import ConfigError
    from bridge.settings import load_settings
    from workers.gateway.config import GatewaySettings
    from workers.gateway.identity import MAX_ID_CHARS, parse_ttl, sign_token

    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        print(f"bridge: --ttl: {exc}", file=sys.stderr)
        return 2
    if not args.client_id or len(args.client_id) > MAX_ID_CHARS:
        print(f"bridge: --client-id must have 1 to {MAX_ID_CHARS} characters", file=sys.stderr)
        return 2
    try:
        secret = load_settings(GatewaySettings).token_secret
    except ConfigError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print(
            "bridge: BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET is not set (environment or the file "
            "bridge_gateway__client_token_secret in BRIDGE_SECRETS_DIR)",
            file=sys.stderr,
        )
        return 2
    expiry = int(time.time()) + ttl
    print(sign_token(secret, args.client_id, expiry))
    print(
        f"valid until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expiry))}",
        file=sys.stderr,
    )
    return 0


def _cmd_connect(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_connect_loop(args))
    return 0


def add_commands(sub: Any) -> None:
    parser = sub.add_parser("gateway", help="client helpers for the gateway worker")
    cmds = parser.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)
    echo = cmds.add_parser(
        "echo-server", help="a reference backend: registers, heartbeats, echoes DATA"
    )
    echo.add_argument("--id", required=True, help="server id (its queue is gateway.server.<id>)")
    echo.add_argument("--heartbeat-s", type=float, default=5.0, help="heartbeat period")
    echo.set_defaults(func=_cmd_echo_server)
    connect = cmds.add_parser(
        "connect", help="connect to a gateway; stdin lines go out as DATA, replies are printed"
    )
    connect.add_argument("--host", default="127.0.0.1")
    connect.add_argument("--port", type=int, default=7000)
    connect.add_argument("--client-id", help="stable id: reconnects go back to the same server")
    connect.add_argument("--token", help="HELLO token, when the gateway checks tokens")
    connect.add_argument("--tls", action="store_true", help="connect to the TLS listener")
    connect.add_argument("--cafile", help="CA bundle that signed the gateway's certificate")
    connect.add_argument(
        "--insecure", action="store_true", help="with --tls: do not verify the certificate"
    )
    connect.add_argument(
        "--linger",
        type=float,
        default=2.0,
        help="after stdin ends, wait up to this long for as many replies as lines sent",
    )
    connect.set_defaults(func=_cmd_connect)
    token = cmds.add_parser(
        "token",
        help="print a signed HELLO token proving a client_id (needs "
        "BRIDGE_GATEWAY__CLIENT_TOKEN_SECRET)",
    )
    token.add_argument("--client-id", required=True, help="the client_id the token proves")
    token.add_argument(
        "--ttl", default="30d", help="how long it is valid: 30d, 12h, 15m, 90s (default 30d)"
    )
    token.set_defaults(func=_cmd_token)
