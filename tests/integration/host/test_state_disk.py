"""State-disk faults against real worker processes and real SQLite files (issue 6).

- ``delay`` on a full disk (a real 2 MiB tmpfs, filled up): commits fail, nothing is
  acknowledged or delivered meanwhile, /readyz says why, the log says so once; when space
  returns it commits, delivers and is ready again in the same process.
- ``delay`` and ``directed`` on a read-only state file (ext4 loop volume, the database and
  its WAL marked immutable with ``chattr +i``: writes through the descriptors SQLite already
  holds fail with EPERM, also for root, which ``chmod`` would not do): the same, and when the
  flag is removed they recover without a restart.

A volume the kernel itself remounted read-only after an I/O error (``errors=remount-ro``)
cannot be made writable again in place (the kernel refuses ``remount,rw`` until it is
unmounted and checked), so there the worker has to be restarted on the repaired volume:
``tests/integration/directed/test_faults.py::test_read_only_volume_leaves_requests_in_the_broker``.

These need root and mount (tmpfs, loop devices); they skip with the reason otherwise. A
corrupt or foreign state file is refused at start (no mount needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.procs import WorkerProcess
from tests.integration.delay.helpers import cleanup, delay_settings, env_for, make_sink
from tests.integration.directed.helpers import cleanup as directed_cleanup
from tests.integration.directed.helpers import directed_settings, wait_applied
from tests.integration.directed.helpers import env_for as directed_env
from tests.integration.host.helpers import BAD_STATE_FILES, refused_at_start
from workers.delay.client import DelayClient
from workers.directed.client import DirectedClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIG = b"x" * 40_000  # several pages each: the WAL must grow, so the commit needs space


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def tmpfs_2m(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "state"
    mnt.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 loop volume (tmpfs ignores the immutable flag on open descriptors)."""
    needed = [t for t in ("mkfs.ext4", "chattr") if not shutil.which(t)]
    if needed:
        pytest.skip(f"needs {', '.join(needed)}")
    image, mnt = tmp_path / "volume.img", tmp_path / "state"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mounted = _run("mount", "-o", "loop", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"mounting a loop volume needs root: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        for f in mnt.rglob("*"):
            _run("chattr", "-i", str(f))
        _run("umount", "-l", str(mnt))


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    return filler


def immutable(files: list[Path], on: bool) -> None:
    for f in files:
        done = _run("chattr", "+i" if on else "-i", str(f))
        assert done.returncode == 0, done.stderr


def metric(proc: WorkerProcess, name: str, labels: str = "") -> float:
    text = proc.http("/metrics")[1].decode()
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def commits_failing(proc: WorkerProcess) -> bool:
    status, body = proc.http("/readyz")
    return status == 503 and b"state commits failing" in body


def process(tmp_path: Path, state: Path, workers: list[str], env: dict[str, str], url: str):
    return WorkerProcess(
        workers, broker_url=url, state_dir=state, env=env, log=tmp_path / "worker.log"
    )


@pytest.mark.parametrize("fault", ["full", "read_only"])
async def test_delay_state_disk_fault_holds_acks_then_recovers_without_restart(
    broker_url, amqp, tmp_path, unique, request, fault
):
    state = request.getfixturevalue("tmpfs_2m" if fault == "full" else "ext4")
    s = delay_settings(unique, lanes=2)
    proc = process(tmp_path, state, ["delay"], env_for(s), broker_url)
    sink = await make_sink(amqp, unique, "disk")
    try:
        proc.start().wait_ready()
        pid = proc.proc.pid if proc.proc else None
        client = await DelayClient(amqp, s).open()
        await client.send(b"before", sink.exchange, delay_ms=0, message_id="before")
        await sink.wait_for(1)
        await wait_until(lambda: metric(proc, "bridge_delay_stored_messages") == 0, 10, "delete")
        db = state / "delay" / "delay.sqlite3"
        if fault == "full":
            filler = fill(state)
        else:
            immutable([db, Path(f"{db}-wal")], True)
        ids = [f"{fault}-{i}" for i in range(5)]
        for mid in ids:
            await client.send(BIG, sink.exchange, delay_ms=0, message_id=mid)
        await wait_until(lambda: commits_failing(proc), 30, "/readyz to report failing commits")
        body = proc.http("/readyz")[1].decode()
        assert ("full" if fault == "full" else "I/O error") in body, body
        log = proc.log.read_text()
        assert "state commit failed; not acknowledging until it succeeds" in log
        assert log.count("state commit failed") == 1, "one line per distinct failure"
        # nothing acknowledged, nothing delivered: the broker still holds the five
        assert metric(proc, "bridge_delay_received_total", 'outcome="accepted"') == 1.0
        assert metric(proc, "bridge_delay_commit_failures_total") >= 1, "what the alert watches"
        assert metric(proc, "bridge_worker_ready", 'worker="delay"') == 0
        await asyncio.sleep(1.0)
        assert sink.ids() == ["before"]

        if fault == "full":
            filler.unlink()  # space returns
        else:
            immutable([db, Path(f"{db}-wal")], False)
        await wait_until(lambda: proc.http("/readyz")[0] == 200, 30, "readiness again")
        await sink.wait_for(6)
        assert sorted(sink.ids()[1:]) == sorted(ids)
        assert proc.proc is not None and proc.proc.pid == pid and proc.proc.poll() is None
        assert "state commits succeed again" in proc.log.read_text()
        assert metric(proc, "bridge_delay_received_total", 'outcome="accepted"') == 6.0
        await wait_until(lambda: metric(proc, "bridge_delay_stored_messages") == 0, 10, "deletes")
        assert proc.terminate() == 0
        proc.start().wait_ready()  # what was committed after the fault is on disk
        assert (await client.counts())["total"] == 0
        await asyncio.sleep(0.5)
        assert len(sink.got) == 6, "nothing delivered again after the restart"
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await cleanup(broker_url, s, [sink.exchange], [sink.queue])


async def test_directed_read_only_state_file_recovers_without_restart(
    broker_url, amqp, tmp_path, unique, ext4
):
    s = directed_settings(unique)
    proc = process(tmp_path, ext4, ["directed"], directed_env(s), broker_url)
    try:
        proc.start().wait_ready()
        pid = proc.proc.pid if proc.proc else None
        client = await DirectedClient(amqp, s).open()
        await client.send(b"before", ["a"], message_id="before")
        await wait_applied(client, "before")
        assert "error" not in await client.pull("nobody", None, max=0)  # committed
        db = ext4 / "directed" / "directed.sqlite3"
        immutable([db, Path(f"{db}-wal")], True)
        ids = [f"ro{i}" for i in range(5)]
        for mid in ids:
            await client.send(BIG, ["a", "r1"], message_id=mid)
        await wait_until(lambda: commits_failing(proc), 30, "/readyz to report failing commits")
        assert "state commit failed" in proc.log.read_text()
        labels = 'outcome="accepted"'
        assert metric(proc, "bridge_directed_requests_total", labels) == 1.0
        reply = await client.pull("r1", None, max=10)
        assert reply["error"]["code"] == "unavailable", reply

        immutable([db, Path(f"{db}-wal")], False)
        await wait_until(lambda: proc.http("/readyz")[0] == 200, 30, "readiness again")
        assert proc.proc is not None and proc.proc.pid == pid and proc.proc.poll() is None
        for mid in ids:
            assert (await wait_applied(client, mid))["total"] == 2
        got, record = [], None
        while True:
            reply = await client.pull("r1", record, max=50)
            got += [m["id"] for m in reply["messages"]]
            record = reply["record_id"]
            if record is None:
                break
        assert got == ids
        await client.close()
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.terminate()
        await directed_cleanup(broker_url, s)


@BAD_STATE_FILES
def test_delay_refuses_a_corrupt_or_foreign_state_file(broker_url, tmp_path, unique, make, message):
    """Not a mount: runs anywhere. The file is left byte for byte as it was."""
    s = delay_settings(unique)
    refused_at_start(
        "delay",
        env_for(s),
        broker_url,
        tmp_path,
        make,
        message,
        lambda: cleanup(broker_url, s, [], []),
    )
