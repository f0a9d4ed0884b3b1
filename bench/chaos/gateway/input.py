"""The ``input`` scenario of :mod:`bench.chaos.gateway.suite`: bad input and secrets, against a
gateway process that valid clients use at the same time.

- the corpus of ``tests/corpus/gateway/`` and seeded mutations of it (bytes flipped,
  inserted, duplicated, LENGTH fields rewritten, cases spliced), each compared with the
  answer :func:`bench.chaos.gateway.wire.expected` derives from docs/gateway.md;
- slowloris: connections that trickle a HELLO one byte per second;
- a client that never reads the echoes of what it sends;
- a flood of connections beyond ``max_connections``;
- secrets: the gateway runs at DEBUG with HELLO tokens from a secrets file and a broker user
  with a password, through a proxy that drops it once; neither may appear in its log.

The gateway must answer every sequence as documented, never crash (its log has no
traceback), and serve the valid clients throughout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.chaos.gateway.deployment import alive_at, cleanup, env_for, finish, start_servers
from bench.chaos.gateway.ledger import ChaosClient, ServerLedger, analyse
from bench.chaos.gateway.wire import Expect, Limits, check, corpus, exchange, expected, trickle
from bench.harness.broker import rabbitmqctl
from bench.harness.cpu import rss_bytes
from bench.harness.procs import WorkerProcess, free_port
from bench.harness.report import broker_url, progress, unique
from bench.harness.stats import percentile, rnd
from workers.gateway.wire import encode_data, encode_hello

TOKEN = "corpus-token"
LIMITS = Limits(max_hello_frame=4096, max_frame=65536, tokens=(TOKEN,))
CRASH_MARKS = ("Traceback", "Fatal error", "Exception in callback", "exception was never retrieved")


def mutate(rng: random.Random, cases: list[bytes]) -> bytes:
    data = bytearray(rng.choice(cases))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:  # insert random bytes
            at = rng.randint(0, len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and data:  # duplicate a slice
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randint(1, 64))
            data[b:b] = data[a:b]
        elif op == 3 and len(data) >= 4:  # rewrite the first LENGTH
            value = rng.choice([0, 1, 2, 5, 4097, 65537, 0xFFFFFFFF, rng.randrange(2**32)])
            data[0:4] = value.to_bytes(4, "big")
        elif op == 4:  # append a frame of a random type
            payload = rng.randbytes(rng.randint(0, 16))
            data += (len(payload) + 1).to_bytes(4, "big") + bytes([rng.randrange(10)]) + payload
        elif op == 5:  # splice another case after this one
            data += rng.choice(cases)
        elif op == 6 and data:  # drop a byte
            del data[rng.randrange(len(data))]
    return bytes(data)


def fuzz_sequences(seed: int, count: int) -> list[tuple[bytes, Expect]]:
    """Mutations whose expected answer comes without waiting for a timeout (most of the
    ones that would wait for hello_timeout are left out: the slowloris part covers it)."""
    rng = random.Random(seed)
    cases = [c.data for c in corpus()]
    out: list[tuple[bytes, Expect]] = []
    while len(out) < count:
        data = mutate(rng, cases)
        want = expected(data, LIMITS)
        if want.terminal == "partial":
            continue
        if want.terminal == "error:hello_timeout" and rng.random() > 0.05:
            continue
        out.append((data, want))
    return out


async def slowloris(port: int, hello: bytes) -> tuple[int, str]:
    """Send a HELLO one byte per second; return the bytes sent and the gateway's answer."""
    sent, data = await trickle(port, hello, 1.0)
    marker = data.find(b'{"code":')
    return sent, str(json.loads(data[marker:]).get("code")) if marker >= 0 else "no answer"


async def never_reads(gateway: WorkerProcess, port: int) -> str:
    """Send 4 MiB of DATA with a tiny receive buffer and never read an echo; return why the
    gateway closed the session (from its metrics: the ERROR sits behind the unread echoes
    and is cut with them after ``close_flush_s``)."""

    def slow_consumers() -> float:
        samples = gateway.metrics().get("bridge_gateway_closed_total", {})
        return sum(v for k, v in samples.items() if ("reason", "slow_consumer") in k)

    before = slow_consumers()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock, limit=4096)
    outcome = "still open"
    try:
        writer.write(encode_hello("never-reads", TOKEN))
        chunk = encode_data(b"r" * 32 * 1024)
        for _ in range(128):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 15)
        for _ in range(100):
            if slow_consumers() > before:
                outcome = "slow_consumer"
                break
            await asyncio.sleep(0.1)
    except (ConnectionError, TimeoutError) as exc:
        outcome = "slow_consumer" if slow_consumers() > before else type(exc).__name__
    finally:
        writer.close()
    return outcome


async def flood(port: int, count: int) -> Counter[str]:
    async def one() -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            return type(exc).__name__
        try:
            data = await asyncio.wait_for(reader.read(), 30)
            return str(json.loads(data[5:]).get("code")) if len(data) > 5 else "eof"
        except (ConnectionError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    return Counter(await asyncio.gather(*(one() for _ in range(count))))


async def bad_input(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    prefix = unique("chaos-gw-input")
    port = free_port()
    max_connections = 300
    env = env_for(
        prefix,
        port,
        tokens=TOKEN,
        max_frame=LIMITS.max_frame,
        max_hello_frame=LIMITS.max_hello_frame,
        hello_timeout_s=3,
        max_connections=max_connections,
        outbound_buffer_bytes=256 * 1024,
        # each sequence is judged alone: a reply kept for a client_id would reach the next
        # connection that uses it, which the per-connection model does not follow
        offline_max_messages=0,
        # the mutations send hundreds of wrong tokens from one address: without this the
        # failure limit answers rate_limited, which wire.expected does not model
        auth_failure_limit=0,
    )
    gateway = WorkerProcess(["gateway"], state_dir=root / "input", env=env)
    ledger = ServerLedger()
    servers = []
    await asyncio.to_thread(lambda: gateway.start().wait_ready(60))
    rss_max = 0
    try:
        servers = await start_servers(prefix, ledger, ("s1",))
        await alive_at(gateway, ("s1",))
        talkers = [
            ChaosClient(f"v{i}", lambda: port, window=1, token=TOKEN, resend_after_s=30, seed=i)
            for i in range(4)
        ]
        tasks = [asyncio.get_running_loop().create_task(c.run()) for c in talkers]
        await asyncio.sleep(1.0)
        started = time.monotonic()

        # corpus and mutations, 8 connections at a time
        cases = [(c.data, expected(c.data, LIMITS), c.name, c.expect) for c in corpus()]
        fuzz = fuzz_sequences(args.seed, args.fuzz)
        failures: list[dict[str, Any]] = []
        answers: Counter[str] = Counter()

        def replay(data: bytes, want: Expect) -> list[str]:
            return check(want, exchange(port, data, want, timeout=20))

        with ThreadPoolExecutor(8) as pool:
            loop = asyncio.get_running_loop()
            jobs = [loop.run_in_executor(pool, replay, d, w) for d, w, _, _ in cases]
            jobs += [loop.run_in_executor(pool, replay, d, w) for d, w in fuzz]
            slow = [slowloris(port, encode_hello(f"slow{i}", TOKEN)) for i in range(20)]
            deaf = never_reads(gateway, port)
            progress(f"input: {len(cases)} corpus cases, {len(fuzz)} mutations, 20 slowloris")
            results, slow_results, deaf_result = await asyncio.gather(
                asyncio.gather(*jobs), asyncio.gather(*slow), deaf
            )
        for (_, want, name, promised), problems in zip(cases, results[: len(cases)], strict=True):
            if want.terminal != promised:
                problems = [*problems, f"index says {promised}, the contract model {want.terminal}"]
            if problems:
                failures.append({"case": name, "problems": problems})
        for (data, want), problems in zip(fuzz, results[len(cases) :], strict=True):
            answers[want.terminal] += 1
            if problems:
                failures.append({"bytes": data[:200].hex(), "problems": problems})
        # connections beyond max_connections, while the talkers go on
        progress("input: flood")
        flood_codes = await flood(port, 3 * max_connections)
        with contextlib.suppress(OSError):
            rss_max = rss_bytes(gateway.pid)
        await finish(talkers, tasks, timeout=60)
        elapsed = time.monotonic() - started
        rtts = [r for c in talkers for t, r in c.rtts if t >= started]
        talk = analyse(talkers, ledger)
        log = gateway.log.read_text(errors="replace")
        crashes = [line for line in log.splitlines() if any(m in line for m in CRASH_MARKS)]
        summary = json.loads(gateway.http("/admin/gateway/summary")[1])
        slow_codes = Counter(code for _, code in slow_results)
        failures += (
            [{"slowloris": dict(slow_codes)}] if set(slow_codes) != {"hello_timeout"} else []
        )
        failures += [{"never_reads": deaf_result}] if deaf_result != "slow_consumer" else []
        failures += [{"gateway_log": crashes[:5]}] if crashes else []
        failures += (
            [{"valid_clients": talk["sessions"]["closed_by"]}]
            if (set(talk["sessions"]["closed_by"]) - {"client_bye"} or talk["lost"])
            else []
        )
        busy = flood_codes.get("busy", 0)
        return {
            "failures": len(failures),
            "failure_examples": failures[:10],
            "max_rss_mib": rnd(rss_max / 2**20, 1),
            "corpus_cases": len(cases),
            "mutations": len(fuzz),
            "mutation_answers": dict(answers),
            "slowloris": {
                "connections": len(slow_results),
                "answers": dict(slow_codes),
                "bytes_sent_max": max(n for n, _ in slow_results),
            },
            "never_reading_client": deaf_result,
            "flood": {
                "connections": 3 * max_connections,
                "max_connections": max_connections,
                "answers": dict(flood_codes),
                "busy": busy,
            },
            "valid_clients": {
                "round_trips": len(rtts),
                "per_s": rnd(len(rtts) / elapsed, 1),
                "p50_ms": rnd(percentile(rtts, 50) * 1000, 2),
                "p99_ms": rnd(percentile(rtts, 99) * 1000, 2),
                "max_ms": rnd(max(rtts, default=0) * 1000, 2),
                "closed_by": talk["sessions"]["closed_by"],
                "lost": talk["lost"],
            },
            "gateway": {
                "alive": gateway.proc is not None and gateway.proc.poll() is None,
                "log_crash_lines": len(crashes),
                "connections_after": summary["connections"],
                "rss_mib": rnd(rss_max / 2**20, 1),
            },
        }
    finally:
        await asyncio.to_thread(gateway.stop)
        for server in servers:
            await server.stop()
        await cleanup(prefix)


async def secrets(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """DEBUG logs of a gateway with tokens and a broker password, through one reconnect."""
    from bench.harness.proxy import TcpProxy

    parts = urlsplit(broker_url())
    prefix = unique("chaos-gw-secrets")
    port = free_port()
    user, password = f"{prefix}-user", f"pw-{uuid.uuid4().hex}"
    tokens = [f"tok-{uuid.uuid4().hex}" for _ in range(2)]
    secret_dir = root / "secrets"
    secret_dir.mkdir(exist_ok=True)
    (secret_dir / "bridge_gateway__tokens").write_text(",".join(tokens))
    env = env_for(prefix, port)
    env.update(
        {
            "BRIDGE_LOG_LEVEL": "DEBUG",
            "BRIDGE_SECRETS_DIR": str(secret_dir),
            "BRIDGE_HEARTBEAT_S": "2",
        }
    )
    await asyncio.to_thread(rabbitmqctl, "add_user", user, password)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    gateway = WorkerProcess(["gateway"], state_dir=root / "secrets-state", env=env)
    gateway.env["BRIDGE_AMQP_URL"] = proxy.url(user, password)
    ledger = ServerLedger()
    servers = []
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
        await asyncio.to_thread(lambda: gateway.start().wait_ready(60))
        servers = await start_servers(prefix, ledger, ("s1",))
        await alive_at(gateway, ("s1",))
        client = ChaosClient("sec", lambda: port, window=2, token=tokens[0], seed=1)
        task = asyncio.get_running_loop().create_task(client.run())
        refused: Counter[str] = Counter()
        from workers.gateway.client import GatewayClient, GatewayError

        for wrong in (tokens[1][:-1], tokens[0].upper(), None):
            try:
                (await GatewayClient.connect(port=port, token=wrong)).close()
                refused["welcomed"] += 1
            except GatewayError as exc:
                refused[exc.code] += 1
        await asyncio.sleep(1.0)
        proxy.accepting = False
        proxy.cut()
        await asyncio.sleep(3.0)
        proxy.accepting = True
        await asyncio.to_thread(gateway.wait_ready, 60)
        await asyncio.sleep(1.0)
        await finish([client], [task], timeout=60)
    finally:
        await asyncio.to_thread(gateway.stop)
        for server in servers:
            await server.stop()
        await proxy.stop()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(rabbitmqctl, "delete_user", user)
        await cleanup(prefix)
    text = gateway.log.read_text(errors="replace")
    found = [s for s in (password, *tokens, tokens[1][:-1]) if s in text]
    return {
        "failures": len(found) + (refused.get("welcomed", 0)),
        "log_level": "DEBUG",
        "log_lines": len(text.splitlines()),
        "reconnect_logged": "broker connection lost" in text,
        "secrets_in_log": len(found),
        "wrong_tokens_answered": dict(refused),
        "client_round_trips": len(client.answered),
    }


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    out = await bad_input(args, root)
    try:
        out["secrets"] = await secrets(args, root)
        out["failures"] += out["secrets"]["failures"]
    except FileNotFoundError:
        out["secrets"] = "skipped: rabbitmqctl not found"
    except RuntimeError as exc:
        out["secrets"] = f"skipped: {exc}"
    return out
