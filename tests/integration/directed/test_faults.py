"""Faults around the directed worker, fast enough for every run (the long version with kills
under load is ``python -m bench.chaos``).

- broker link: a stall longer than the heartbeat (the worker notices, goes not-ready and
  reconnects by itself) and a slow link (nothing changes but latency); the cut is in
  test_reconnect.py, kill -9 in test_crash.py;
- state disk: full (a real 2 MiB tmpfs, and SQLite's max_page_count where mounting is not
  allowed) and read-only (an ext4 loop volume that the kernel remounts read-only after an
  error): no acknowledgement while commits fail, not-ready with a log line, nothing lost;
- state file: corrupt or foreign SQLite is refused at start with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from bench.harness.procs import WorkerProcess
from bench.harness.proxy import TcpProxy
from tests.conftest import running_host
from tests.integration.directed.helpers import (
    cleanup,
    directed,
    directed_settings,
    env_for,
    wait_applied,
)
from tests.integration.host.helpers import BAD_STATE_FILES, refused_at_start
from workers.directed.client import DirectedClient
from workers.directed.config import DirectedSettings
from workers.directed.worker import DirectedWorker

pytestmark = pytest.mark.integration


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def committed(client: DirectedClient) -> None:
    """Wait until what the worker applied so far is committed (and so acknowledged): a pull
    is answered only after the group commit that follows it."""
    reply = await client.pull("nobody", None, max=0)
    assert "error" not in reply, reply


async def pull_all(client: DirectedClient, target: str) -> list[str]:
    """Every message id queued for ``target``, acknowledging as it goes."""
    got: list[str] = []
    record = None
    while True:
        reply = await client.pull(target, record, max=50)
        assert "error" not in reply, reply
        got += [m["id"] for m in reply["messages"]]
        record = reply["record_id"]
        if record is None:
            return got


# -- broker link ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def behind_proxy(broker_url, tmp_path, settings, **host):
    parts = urlsplit(broker_url)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    worker = DirectedWorker(settings)
    proxied = proxy.url(parts.username or "guest", parts.password or "guest")
    try:
        async with running_host(proxied, tmp_path, [worker], **host) as h:
            yield proxy, h
    finally:
        await proxy.stop()
        await cleanup(broker_url, settings)


async def test_stall_longer_than_heartbeat_reconnects_without_restart(
    broker_url, amqp, tmp_path, unique
):
    s = directed_settings(unique)
    async with behind_proxy(broker_url, tmp_path, s, heartbeat_s=1) as (proxy, host):
        client = await DirectedClient(amqp, s).open()
        await client.send(b"before", ["a"], message_id="before")
        await wait_applied(client, "before")
        await committed(client)
        proxy.stall()  # bytes stop flowing both ways; the sockets stay open
        await client.send(b"during", ["a"], message_id="during")  # the broker keeps it
        await wait_until(lambda: not host.readiness()[0], 30, "readiness to drop")
        proxy.resume()
        await wait_until(lambda: host.readiness()[0], 60, "readiness to return")
        assert host.workers[0].link.reconnects >= 1  # the worker's data path noticed
        await wait_applied(client, "during", timeout=30)
        assert await pull_all(client, "a") == ["before", "during"]
        await client.close()


async def test_slow_link_changes_nothing_but_latency(broker_url, amqp, tmp_path, unique):
    s = directed_settings(unique)
    async with behind_proxy(broker_url, tmp_path, s) as (proxy, host):
        client = await DirectedClient(amqp, s).open()
        proxy.latency = 0.08  # each way, on every chunk the worker sends or receives
        readiness: list[bool] = []
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                readiness.append(host.readiness()[0])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        ids = [f"s{i}" for i in range(30)]
        for i, mid in enumerate(ids):
            await client.send(b"slow %d" % i, ["a", "b"], message_id=mid)
        await wait_applied(client, ids[-1], timeout=30)
        got = await asyncio.gather(pull_all(client, "a"), pull_all(client, "b"))
        stop.set()
        await watcher
        assert got == [ids, ids]
        assert all(readiness) and host.broker.reconnects == 0
        assert host.workers[0].link.reconnects == 0
        await client.close()


# -- state disk -----------------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def tmpfs_2m(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs to fill up: a real ENOSPC, as on a full volume."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    if done.returncode != 0:
        pytest.skip(
            "mounting a small tmpfs needs root (CAP_SYS_ADMIN): "
            f"{done.stderr.strip() or done.returncode}; test_sqlite_full_in_process covers the "
            "SQLITE_FULL path without it"
        )
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


def metric(proc: WorkerProcess, name: str, labels: str) -> float:
    text = proc.http("/metrics")[1].decode()
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def worker_process(tmp_path: Path, state: Path, s: DirectedSettings, broker_url: str):
    return WorkerProcess(
        ["directed"],
        broker_url=broker_url,
        state_dir=state,
        env=env_for(s),
        log=tmp_path / "worker.log",
    )


async def not_ready_because_commits_fail(proc: WorkerProcess, timeout: float = 30) -> str:
    body = b""

    def failing() -> bool:
        nonlocal body
        status, body = proc.http("/readyz")
        return status == 503 and b"state commits failing" in body

    await wait_until(failing, timeout, "/readyz to report failing commits", interval=0.1)
    return body.decode()


BIG = b"x" * 40_000  # several pages each: the WAL must grow, so the commit needs free space


async def test_full_disk_holds_acks_then_recovers_without_restart(
    broker_url, amqp, tmp_path, unique, tmpfs_2m
):
    s = directed_settings(unique)
    proc = worker_process(tmp_path, tmpfs_2m, s, broker_url)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(amqp, s).open()
        await client.send(b"before", ["a"], message_id="before")
        await wait_applied(client, "before")
        await committed(client)
        filler = fill(tmpfs_2m)
        ids = [f"full{i}" for i in range(5)]
        for mid in ids:  # new targets too: their numbers must not outlive a failed commit
            await client.send(BIG, ["a", "n1", "n2"], message_id=mid)
        checks = await not_ready_because_commits_fail(proc)
        assert "full" in checks, checks
        assert "state commit failed" in proc.log.read_text()
        assert "database or disk is full" in proc.log.read_text()
        # acknowledged only after the commit: none of the five is
        labels = 'outcome="accepted"'
        assert metric(proc, "bridge_directed_requests_total", labels) == 1.0
        assert metric(proc, "bridge_worker_ready", 'worker="directed"') == 0.0
        failures = re.search(
            r"^bridge_directed_commit_failures_total (\S+)$",
            proc.http("/metrics")[1].decode(),
            re.M,
        )
        assert failures and float(failures.group(1)) >= 1, "the alert on commit failures needs it"
        reply = await client.pull("n1", None, max=10)
        assert reply["error"]["code"] == "unavailable", reply

        filler.unlink()  # space returns
        await wait_until(lambda: proc.http("/readyz")[0] == 200, 30, "readiness after space")
        for mid in ids:
            assert (await wait_applied(client, mid))["total"] == 3
        assert metric(proc, "bridge_directed_requests_total", labels) == 6.0
        assert await pull_all(client, "n1") == ids
        assert proc.terminate() == 0
        proc.start().wait_ready()  # what was committed after the failure loads again
        assert await pull_all(client, "n2") == ids
        assert await pull_all(client, "a") == ["before", *ids]
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await cleanup(broker_url, s)


async def test_sqlite_full_in_process(broker_url, amqp, tmp_path, unique, caplog):
    """The same SQLITE_FULL path without a mount: the file may not grow past max_page_count."""
    caplog.set_level(logging.INFO, logger="bridge.store")
    s = directed_settings(unique)
    async with directed(broker_url, tmp_path, s, amqp) as (worker, client):
        assert worker.store is not None
        db = worker.store.db
        await client.send(b"before", ["a"], message_id="before")
        await wait_applied(client, "before")
        await committed(client)
        pages = await db.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await db.run(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
        ids = [f"cap{i}" for i in range(4)]
        for mid in ids:
            await client.send(BIG, ["a", "m1"], message_id=mid)
        await wait_until(lambda: not worker.ready()[0], 30, "not ready")
        assert "full" in worker.ready()[1]
        assert worker.metrics.requests.labels("accepted")._value.get() == 1
        assert any(
            "state commit failed" in r.getMessage() and "full" in str(r.__dict__.get("error"))
            for r in caplog.records
        )
        await db.run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        await wait_until(lambda: worker.ready()[0], 30, "ready again")
        assert any("state commits succeed again" in r.getMessage() for r in caplog.records)
        assert await pull_all(client, "m1") == ids
        assert await pull_all(client, "a") == ["before", *ids]


@pytest.fixture
def ext4_volume(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(image, mount point, trigger_fs_error file) of a small ext4 loop volume mounted with
    errors=remount-ro, so a reported error makes the kernel remount it read-only even with
    files open for writing, which a plain ``mount -o remount,ro`` refuses."""
    needed = [t for t in ("mkfs.ext4", "e2fsck", "losetup", "findmnt") if not shutil.which(t)]
    if needed:
        pytest.skip(f"needs {', '.join(needed)} for a loop ext4 volume")
    image, mnt = tmp_path / "volume.img", tmp_path / "state"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mounted = _run("mount", "-o", "loop,errors=remount-ro", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(
            "mounting a loop ext4 volume needs root and loop devices: "
            f"{mounted.stderr.strip() or mounted.returncode}"
        )
    try:
        device = _run("findmnt", "-n", "-o", "SOURCE", str(mnt)).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"{trigger} is missing: this kernel cannot be asked to report an error")
        yield image, mnt, trigger
    finally:
        _run("umount", "-l", str(mnt))


async def test_read_only_volume_leaves_requests_in_the_broker(
    broker_url, amqp, tmp_path, unique, ext4_volume
):
    image, mnt, trigger = ext4_volume
    s = directed_settings(unique)
    proc = worker_process(tmp_path, mnt, s, broker_url)
    conn = await aio_pika.connect(broker_url)
    try:
        proc.start().wait_ready()
        client = await DirectedClient(amqp, s).open()
        await client.send(b"before", ["a"], message_id="before")
        await wait_applied(client, "before")
        await committed(client)
        trigger.write_text("bridge test: make the volume read-only\n")
        ids = [f"ro{i}" for i in range(5)]
        for mid in ids:
            await client.send(b"while read-only", ["a", "r1"], message_id=mid)
        checks = await not_ready_because_commits_fail(proc)
        assert "I/O error" in checks or "readonly" in checks, checks
        assert "state commit failed" in proc.log.read_text()

        proc.kill9()  # nothing was acknowledged, so the broker has all five again
        channel = await conn.channel()
        queue = await channel.declare_queue(s.requests_queue, passive=True)
        for _ in range(100):
            queue = await channel.declare_queue(s.requests_queue, passive=True)
            if queue.declaration_result.message_count == len(ids):
                break
            await asyncio.sleep(0.1)
        assert queue.declaration_result.message_count == len(ids)

        # the operator repairs the volume; the worker starts on it and catches up
        assert _run("umount", str(mnt)).returncode == 0
        assert _run("e2fsck", "-fy", str(image)).returncode in (0, 1)
        assert _run("mount", "-o", "loop", str(image), str(mnt)).returncode == 0
        proc.start().wait_ready()
        assert await pull_all(client, "r1") == ids
        assert await pull_all(client, "a") == ["before", *ids]
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await conn.close()
        await cleanup(broker_url, s)


# -- state file -----------------------------------------------------------------------------


@BAD_STATE_FILES
def test_bad_state_file_is_refused_at_start(broker_url, tmp_path, unique, make, message):
    s = directed_settings(unique)
    refused_at_start(
        "directed", env_for(s), broker_url, tmp_path, make, message, lambda: cleanup(broker_url, s)
    )
