"""The delay worker's dispatcher: hands due topics to sender lanes and keeps the window filled.

The scheduling decisions are the pure :class:`~workers.delay.core.Scheduler`'s; this loop
wakes at the next due time (or when a lane reports, or ingress admits a message due soon),
submits each :class:`~workers.delay.core.Assignment` to its lane, and applies the lanes'
reports: what was confirmed or dead-lettered is deleted from the store, what failed goes back
into the window. A second loop moves due-soon rows from the store into the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from bridge.logs import Tally
from workers.delay.config import DelaySettings
from workers.delay.lanes import Lane, LaneReport
from workers.delay.ledger import Ledger, now_ms
from workers.delay.metrics import DelayMetrics

log = logging.getLogger("bridge.delay")


class Dispatcher:
    def __init__(
        self,
        ledger: Ledger,
        settings: DelaySettings,
        metrics: DelayMetrics,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.metrics = metrics
        self.lanes: list[Lane] = []  # set by the worker: the lanes report to this dispatcher
        self.running = False
        self._loop = asyncio.get_running_loop()
        self._wake: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        n = settings.lanes
        self._lane_used = [time.monotonic()] * n
        self._lane_batch = [0] * n
        self._lanes_wanted_at = time.monotonic()
        self._grown_at = 0.0
        # due messages the target refused (unroutable, no such exchange): at most one line
        # per reason and target per interval, however many messages
        self.dead_log = Tally(log, "due messages dead-lettered instead of delivered")

    def start(self) -> None:
        self.running = True
        self._tasks = [
            self._loop.create_task(self._dispatch_loop(), name="delay-dispatch"),
            self._loop.create_task(self._load_loop(), name="delay-loader"),
        ]

    async def stop(self, deadline: float) -> None:
        """Stop handing out batches; wait (until ``deadline``, monotonic) for the lanes to
        finish the batch in hand, whose reports journal the deletes."""
        self.running = False
        self.kick()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        scheduler = self.ledger.scheduler
        while scheduler.busy_lanes():
            if time.monotonic() > deadline:
                log.warning(
                    "stopping with batches unconfirmed; they are sent again after the restart",
                    extra={"lanes": sorted(scheduler.busy_lanes())},
                )
                break
            await asyncio.sleep(0.01)

    def kick(self) -> None:
        """Look again now (something became due, or a lane came free)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # -- handing out batches -----------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while self.running:
            try:
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop delivery for good
                log.exception("scheduling loop failed; restarting it")
                await asyncio.sleep(0.1)

    async def _dispatch(self) -> None:
        """Hand due topics to lanes; wake at the next due time or when a lane reports.

        Lanes are used on demand: a light load spread over many topics is sent by few lanes
        (each lane has a connection of its own, and spreading tiny batches over many costs
        more socket writes and confirm streams than it saves), and a topic that waited
        ``LANE_GROW_MS`` for a lane makes one more lane active, so a hot topic holding a lane
        cannot make the others wait longer than that.
        """
        scheduler = self.ledger.scheduler
        loop = self._loop
        n_lanes = len(self.lanes)
        grow_ms = self.settings.lane_grow_ms
        tick_ms = self.settings.dispatch_interval_ms
        while self.running:
            now = now_ms()
            turns: set[int] = set()
            for assignment in scheduler.assign(now):
                lane = assignment.lane
                if lane not in turns:  # a new turn (several topics' batches may share it)
                    turns.add(lane)
                    self._lane_used[lane] = time.monotonic()
                    self._lane_batch[lane] = 0
                self._lane_batch[lane] += len(assignment.entries)
                self.lanes[lane].submit(assignment)
            nxt = scheduler.next_due_ms()
            wake_at: float | None = None
            if nxt is not None:
                if scheduler.has_idle_lane() or nxt > now:
                    wake_at = nxt
                elif scheduler.active_lanes < n_lanes:
                    # Due topics wait for a lane. Add one once the oldest waited grow_ms while
                    # some lane has held its batch that long (a big batch of a hot topic).
                    # Lanes that are merely busy with short batches would not go faster
                    # with more lanes: they share one event loop.
                    if now - nxt >= grow_ms and self._lane_stuck(grow_ms):
                        self._lanes_wanted_at = mono = time.monotonic()
                        if mono - self._grown_at >= grow_ms / 1000:  # one lane per grow_ms
                            self._grown_at = mono
                            scheduler.set_active_lanes(scheduler.active_lanes + 1)
                            log.debug(
                                "one more sender lane in use",
                                extra={"active": scheduler.active_lanes, "waited_ms": now - nxt},
                            )
                            continue
                    # check again then (or when a lane reports)
                    wake_at = max(nxt, now) + grow_ms
                elif now - nxt >= grow_ms and self._lane_stuck(grow_ms):
                    self._lanes_wanted_at = time.monotonic()
                # else: every lane is busy; a lane's report wakes us
            if wake_at is not None:
                # Woken by the clock at most once per DISPATCH_INTERVAL_MS: what falls due
                # meanwhile goes out as one batch per topic, not a batch per due time (each
                # costs a lane turn, a store read, a socket write
                # and a confirm wait). A lane that reports (kick) is given work at once.
                wake_at = max(wake_at, now + tick_ms)
            wake: asyncio.Future[None] = loop.create_future()
            self._wake = wake
            handle = None
            if wake_at is not None:
                delay = wake_at / 1000 - time.time()
                if delay > 0:
                    handle = loop.call_later(delay, _set_done, wake)
                else:
                    wake.set_result(None)
            await wake
            if handle is not None:
                handle.cancel()

    def _lane_stuck(self, ms: float) -> bool:
        """Whether some lane holds a big batch (a topic with a backlog) for ``ms`` already,
        or any batch for ten times that (a slow target)."""
        now = time.monotonic()
        big = max(1, self.settings.batch // 2)
        for lane in self.ledger.scheduler.busy_lanes():
            held = now - self._lane_used[lane]
            if held >= 10 * ms / 1000 or (held >= ms / 1000 and self._lane_batch[lane] >= big):
                return True
        return False

    def _retire_idle_lanes(self) -> None:
        """Use one lane fewer once no topic needed an extra lane for ``LANE_IDLE_S``."""
        scheduler = self.ledger.scheduler
        if scheduler.active_lanes <= 1:
            return
        now = time.monotonic()
        if now - self._lanes_wanted_at >= self.settings.lane_idle_s:
            scheduler.set_active_lanes(scheduler.active_lanes - 1)
            self._lanes_wanted_at = now - self.settings.lane_idle_s / 2  # one step at a time
            log.debug("one sender lane fewer in use", extra={"active": scheduler.active_lanes})

    # -- what the lanes did ------------------------------------------------------------

    def report_from_lane(self, r: LaneReport) -> None:
        """A lane finished its batch (called by the lane's task)."""
        self._lane_used[r.lane] = time.monotonic()
        dead = [mid for mid, _ in r.dead]
        self.ledger.scheduler.complete(r.lane, done=[*r.sent, *dead, *r.gone], retry=r.retry)
        self.ledger.delete_done((mid, r.topic) for mid in (*r.sent, *dead))
        if r.sent:
            self.metrics.published.inc(len(r.sent))
        for _, reason in r.dead:
            self.metrics.dead_letters.labels(reason).inc()
            self.dead_log.add(
                reason=reason, target=r.topic, dead_exchange=self.settings.dead_exchange
            )
        if r.retry:
            self.metrics.retries.inc(len(r.retry))
        self.kick()

    # -- the window loader -------------------------------------------------------------

    async def load_step(self) -> int:
        loaded = await self.ledger.load_step()
        if loaded:
            self.kick()
        return loaded

    async def _load_loop(self) -> None:
        while self.running:
            self._retire_idle_lanes()
            try:
                loaded = await self.load_step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("window load failed; retrying")
                loaded = 0
            if loaded < self.settings.load_chunk:
                await asyncio.sleep(self.settings.load_interval_s)
            else:
                await asyncio.sleep(0)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
