"""The gateway's periodic work: server expiry, HELLO and idle timeouts, PINGs, and saving
the sticky records and the sessions' client_ids for a restart.

One sweep over all sessions per tick instead of a timer per connection: a timer handle per
idle connection costs memory, a sweep of 10,000 sessions costs about a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from workers.gateway.config import E_HELLO_TIMEOUT, E_IDLE_TIMEOUT
from workers.gateway.hub import GatewayHub
from workers.gateway.session import HANDSHAKE, JOINING, OPEN
from workers.gateway.store import GatewayStore

log = logging.getLogger("bridge.gateway")


class Housekeeper:
    def __init__(
        self, hub: GatewayHub, store: GatewayStore, link_ready: Callable[[], bool]
    ) -> None:
        self.hub = hub
        self.store = store
        # While the gateway's own broker link is down it hears no heartbeat: that silence
        # is ours, not the servers'. Expiry (which moves or closes clients) waits until
        # server_ttl_s after the link is back, time for every live server to be heard.
        self.link_ready = link_ready
        self._expire_after = 0.0
        s = hub.settings
        # Often enough that every timeout fires within half its length of being due.
        self.tick = max(
            0.02, min(s.tick_s, s.hello_timeout_s / 2, s.heartbeat_s / 2, s.server_ttl_s / 3)
        )
        self._task: asyncio.Task[None] | None = None
        self._last_save = self._last_refresh = self._last_seen = time.monotonic()
        self._servers_saved: dict[str, float] = {}

    async def restore(self) -> list[str]:
        """Load what the previous run saved; return the servers believed alive."""
        hub = self.hub
        s = hub.settings
        wall, mono = time.time(), time.monotonic()
        saved = await self.store.load(
            since_sticky=wall - s.sticky_retention_s,
            since_server=wall - s.server_ttl_s,
            since_session=wall - s.offline_ttl_s,
        )
        for server_id, last in saved.servers.items():
            hub.balancer.register(server_id, mono - (wall - last))
        for client_id, server_id, released in saved.sticky:
            hub.balancer.restore_sticky(client_id, server_id, mono - (wall - released))
        if hub.offline is not None and hub.offline.enabled:
            # sessions of the previous run: replies for them may wait in the reply queue
            for sid, client_id in saved.sessions:
                hub.offline.remember(sid, client_id)
        if saved.servers or saved.sticky or saved.sessions:
            log.info(
                "gateway state restored",
                extra={
                    "servers": sorted(saved.servers),
                    "sticky": len(saved.sticky),
                    "sessions": len(saved.sessions),
                },
            )
        return sorted(saved.servers)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-tick")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.save()
        except Exception as exc:
            log.warning("gateway state not saved", extra={"error": str(exc)})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.sweep(time.monotonic())
                if time.monotonic() - self._last_save >= self.hub.settings.state_flush_s:
                    self._last_save = time.monotonic()
                    await self.save()
            except Exception:
                log.exception("gateway housekeeping failed")

    def sweep(self, now: float) -> None:
        hub = self.hub
        s = hub.settings
        hub.publisher.expire(now)
        if not self.link_ready():
            self._expire_after = now + s.server_ttl_s
        for server_id in hub.balancer.expire(now) if now >= self._expire_after else ():
            log.warning(
                "server missed its heartbeats; no new clients go to it",
                extra={"server": server_id, "ttl_s": s.server_ttl_s},
            )
            hub.server_lost(server_id, "missed heartbeats")
        hello_timeout, heartbeat, idle_timeout = s.hello_timeout_s, s.heartbeat_s, s.idle_timeout_s
        for session in list(hub.sessions.values()):
            state = session.state
            if state == HANDSHAKE:
                if now - session.accepted_at > hello_timeout:
                    if session.head is not None and session.proxy is None:
                        session.hand_over()  # silent: maybe a protocol whose server speaks first
                        continue
                    what = "PROXY header" if session.proxy is not None else "HELLO"
                    session.fail(E_HELLO_TIMEOUT, f"no {what} within {hello_timeout}s")
            elif state == OPEN and not session.paused:
                # A paused session is not read, so its silence is ours, not the client's.
                idle = now - session.last_rx
                if idle > idle_timeout:
                    session.fail(E_IDLE_TIMEOUT, f"nothing received for {idle_timeout}s")
                elif idle > heartbeat and now - session.last_ping > heartbeat:
                    session.last_ping = now
                    session.keepalive()
            elif state == JOINING:
                pass  # bounded by no_server_wait_s

    async def save(self) -> None:
        hub = self.hub
        s = hub.settings
        wall, mono = time.time(), time.monotonic()
        if mono - self._last_refresh > max(s.sticky_retention_s / 2, s.state_flush_s):
            # Rows of long-lived connections would age out of the retention window.
            self._last_refresh = mono
            hub.sticky_dirty.update(
                x.sticky_id for x in hub.sessions.values() if x.sticky_id is not None
            )
        dirty, hub.sticky_dirty = hub.sticky_dirty, set()
        offline = hub.offline
        seen: dict[str, str] = {}
        if offline is not None and offline.enabled:
            if mono - self._last_seen > max(s.offline_ttl_s / 2, s.state_flush_s):
                # rows of open sessions would age out of the offline_ttl_s window
                self._last_seen = mono
                offline.seen.update(
                    (x.sid, c) for x in hub.sessions.values() if (c := offline.owner(x))
                )
            seen, offline.seen = offline.seen, {}
        sessions = [(sid, client_id, wall) for sid, client_id in seen.items()]
        upserts: list[tuple[str, str, float]] = []
        deletes: list[str] = []
        for client_id in dirty:
            record = hub.balancer.sticky_record(client_id)
            if record is None:
                deletes.append(client_id)
                continue
            server, live, released = record
            # A live client counts as released now: if this process dies, that is the last
            # moment it was known to be connected.
            upserts.append((client_id, server, wall if live else wall - (mono - released)))
        snapshot = hub.balancer.snapshot(mono)["servers"]
        servers = {
            sid: wall - info["last_heartbeat_age_s"]
            for sid, info in snapshot.items()
            if info["alive"]
        }
        if (
            not upserts
            and not deletes
            and not sessions
            and servers.keys() == self._servers_saved.keys()
        ):
            if all(abs(servers[k] - self._servers_saved[k]) < s.server_ttl_s / 3 for k in servers):
                return
        try:
            await self.store.save(
                upserts,
                deletes,
                servers,
                sessions,
                forget_before=wall - s.sticky_retention_s,
                forget_sessions_before=wall - s.offline_ttl_s,
            )
        except Exception:
            hub.sticky_dirty |= dirty  # try again next time
            if offline is not None:
                offline.seen = {**seen, **offline.seen}
            raise
        self._servers_saved = servers
