"""Fault suite: kill -9, broker link faults, broker restart and overload against real worker
processes, checked against ledgers kept by the suite's producers and consumers.

    python -m bench.chaos [--seed N] [--workers directed,delay,gateway] [--kills 20] [--quick]
                          [--skip broker_restart,...] [--overload-seconds 180]

Prints ONE JSON object on stdout (progress on stderr) and exits 1 if anything was lost or a
duplicate broke a worker's contract:

    {"seed": 123, "mode": "full", "ok": true, "elapsed_s": ...,
     "total":   {<counters summed over workers>},
     "workers": {"directed": {<counters>, "scenarios": {...}, "failures": [...]},
                 "delay": {"skipped": "no scenario module registered"}}}

Counters (every worker reports the same ones): ``sent`` (publishes attempted),
``acknowledged`` (publishes the broker confirmed), ``expected`` (deliveries the contract owes
for the acknowledged ones: a message times its destinations), ``delivered`` (distinct
deliveries seen), ``lost`` (expected but never seen; must be 0), ``duplicated`` ({"count",
"allowed", "violations", "reasons": {reason: n}}), ``kills`` (kill -9 sent), ``reconnects``
(times a worker watched with ``h.watch`` went not-ready and came back by itself, without a
restart), ``max_rss_bytes`` (largest RSS of any worker process).

Timings (when to kill, how long a stall lasts, which targets a message goes to) come from
``random.Random(f"{seed}:{worker}")``: the printed seed replays a run, and adding a worker
does not change another worker's draws.

Plugging in a worker (the interface other workers' engineers use)
------------------------------------------------------------------
1. Write ``bench/chaos/<worker>/scenarios.py`` with::

       async def run(h: bench.chaos.harness.Harness) -> None

   It drives its scenarios through ``h`` and records into ``h.ledger`` / ``h.scenario()``;
   an exception is reported as a failure of that worker, not a crash of the suite.
2. Add one line to :data:`bench.chaos.suite.SCENARIOS`.

A worker whose suite already is its own command (``python -m bench.chaos.<worker> --seed N
[--quick] [--kills K] [--no-broker-restart]`` printing one JSON object with the counters
above, ``max_rss_mib`` accepted for ``max_rss_bytes``, and ``ok``) needs only the registry
line: a module whose ``run`` is not a coroutine function is run as a subprocess with the
same seed (and ``--overload-s``) and its summary is merged in.

What ``h`` (:class:`Harness`) offers:

- ``h.name``, ``h.seed``, ``h.rng``, ``h.quick``, ``h.kills`` (kills asked for),
  ``h.overload_seconds`` (how long an overload scenario floods: 180 s full, 10 s quick),
  ``h.broker_url``, ``h.workdir`` (a fresh directory), ``h.skip`` (scenario names to skip),
  ``h.progress(...)``, ``h.unique(prefix)`` (a name for exchanges and queues);
- ``h.process(workers, env=..., proxy=None, name=...)`` -> :class:`ChaosProcess`: ``python -m
  bridge.cli run <workers>`` with its own state directory, HTTP port and log file, through
  ``proxy`` if given; ``await p.start()``, ``p.kill9()``, ``await p.stop()``, ``p.pid``,
  ``await p.ready()``, ``p.log_count(text)``; RSS is sampled while it runs;
- ``await h.proxy()`` -> ``bench.harness.proxy.TcpProxy`` to the broker (``cut()``, ``stall()`` /
  ``resume()``, ``latency``, ``accepting``), stopped at the end;
- ``await h.kill_loop(p, n, gap=(lo, hi))``: n kill -9 at drawn moments, each followed by a
  restart (some land during start-up), counted in ``kills``; returns per-kill figures;
  ``h.kill_times`` holds the wall-clock time (``time.time()``) of every kill;
- ``h.watch(p)`` -> :class:`Readiness`: /readyz polled every 100 ms (``went_down``,
  ``came_back``, ``not_ready_s``, ``transitions``); its recoveries are the ``reconnects``;
- ``await h.broker_restart(down_s)``: ``rabbitmqctl stop_app`` / ``start_app`` (the only place
  the suite restarts the broker; tests never do, since they share it);
- ``h.ledger`` (:class:`Ledger`): ``sent(key)``, ``acknowledged(key, destinations)``,
  ``delivered(key, destination, allowed_reason=None)``; duplicates are counted as allowed
  only when the caller names the contract clause that allows them;
- ``h.scenario(name)`` -> dict for that scenario's figures; ``h.fail(text)`` records a failure;
- ``h.on_cleanup(async_fn)``: run at the end even after an error (delete queues...).
"""
