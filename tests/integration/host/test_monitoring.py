"""A real Prometheus (Debian's ``prometheus`` package) scraping the three workers as processes.

It loads the alert rules of k8s/components/monitoring, scrapes each worker under the job name
the PodMonitor gives it, and answers through its HTTP API: the query results, every rule and
dashboard expression (Prometheus rejects bad PromQL), the rules' health and an alert that a
real worker state makes pending. The metric names the rules and dashboards use are checked
against what a running worker of that kind exposes.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import bridge
from bench.harness.procs import WorkerProcess, free_port
from tests.integration.delay import helpers as delay_helpers
from tests.integration.directed import helpers as directed_helpers
from tests.integration.gateway import helpers as gateway_helpers
from tests.monitoring import sync
from tests.monitoring.tools import prometheus_tool
from workers.delay.client import DelayClient

pytestmark = pytest.mark.integration

WORKERS = sync.WORKERS
DEADLINE = 60.0  # generous: the machine is shared
SINK = "monitoring-sink"


class Prometheus:
    def __init__(self, binary: str, directory: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.directory = directory
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(sync.RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return json.loads(body)  # the API's own errors (bad query) are JSON
            except ValueError:
                raise exc from None  # "Service Unavailable" while it starts: not yet

    def query(self, expr: str) -> Any:
        return self.get("/api/v1/query", query=expr)

    def wait_for(self, what: str, check: Any) -> Any:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                found = check()
            except OSError:
                found = None
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def stack(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary = prometheus_tool("prometheus")
    tmp = tmp_path_factory.mktemp("monitoring")
    unique = "t" + uuid.uuid4().hex[:10]
    ds = directed_helpers.directed_settings(unique)
    ys = delay_helpers.delay_settings(unique)
    gs = gateway_helpers.gateway_settings(unique, port=free_port())
    envs = {
        "directed": directed_helpers.env_for(ds),
        "delay": delay_helpers.env_for(ys),
        "gateway": gateway_helpers.env_for(gs),
    }
    procs = {
        w: WorkerProcess(
            [w], broker_url=broker_url, state_dir=tmp / w, env=envs[w], log=tmp / f"{w}.log"
        )
        for w in WORKERS
    }
    prometheus = None
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready(DEADLINE)
        prometheus = Prometheus(binary, tmp, {f"bridge-{w}": p.port for w, p in procs.items()})
        yield prometheus, procs, ys, unique
    finally:
        if prometheus is not None:
            prometheus.stop()
        for proc in procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.terminate()

        async def cleanup() -> None:
            await directed_helpers.cleanup(broker_url, ds)
            sink = f"{unique}.{SINK}"
            await delay_helpers.cleanup(broker_url, ys, [sink], [f"{sink}.q"])
            await gateway_helpers.cleanup(broker_url, gs, [])

        asyncio.run(cleanup())


def test_prometheus_scrapes_every_worker_and_answers_queries(stack):
    prometheus, *_ = stack

    def ready_series() -> list[Any]:
        result = prometheus.query("bridge_worker_ready == 1")["data"]["result"]
        return result if len(result) == len(WORKERS) else []

    series = prometheus.wait_for("bridge_worker_ready of every worker", ready_series)
    assert {(s["metric"]["job"], s["metric"]["worker"]) for s in series} == {
        (f"bridge-{w}", w) for w in WORKERS
    }
    build = prometheus.query("bridge_build_info")["data"]["result"]
    assert {s["metric"]["version"] for s in build} == {bridge.__version__}
    connected = prometheus.query("sum(bridge_broker_connected)")["data"]["result"]
    assert float(connected[0]["value"][1]) == len(WORKERS)


def exposed(text: str) -> set[str]:
    """The sample names a /metrics page declares, whether or not a series exists yet."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, ("",))
    }


def names(expr: str) -> set[str]:
    return set(re.findall(r"\bbridge_[a-z0-9_]+\b", expr))


def dashboard_exprs(worker: str) -> list[str]:
    doc = json.loads((sync.COMPONENT / "dashboards" / f"bridge-{worker}.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def rule_exprs() -> dict[str, list[str]]:
    """Rule expressions by the worker whose metrics they read (bridge-workers: all of them)."""
    out: dict[str, list[str]] = {w: [] for w in WORKERS}
    for group in sync.load_rules()["groups"]:
        exprs = [r["expr"] for r in group["rules"]]
        for worker in WORKERS:
            if group["name"] in ("bridge-workers", f"bridge-{worker}"):
                out[worker] += exprs
    return out


def test_every_metric_in_the_rules_and_dashboards_is_exposed_by_its_worker(stack):
    _, procs, *_ = stack
    rules = rule_exprs()
    for worker, proc in procs.items():
        status, body = proc.http("/metrics")
        assert status == 200
        available = exposed(body.decode())
        used = set().union(*(names(e) for e in rules[worker] + dashboard_exprs(worker)))
        assert used, worker
        assert used <= available, f"{worker} does not expose {sorted(used - available)}"


def promql(expr: str) -> str:
    """A dashboard expression as Prometheus gets it from Grafana (variables substituted)."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_every_rule_and_dashboard_expression_is_valid_promql(stack):
    prometheus, *_ = stack
    exprs = [e for w in WORKERS for e in dashboard_exprs(w) if not e.startswith("label_values")]
    exprs += [e for w in WORKERS for e in rule_exprs()[w]]
    assert prometheus.query("sum(rate(nope[1m])")["status"] == "error", "must reject bad PromQL"
    for expr in exprs:
        answer = prometheus.query(promql(expr))
        assert answer["status"] == "success", (expr, answer)

    def evaluated() -> list[Any]:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = prometheus.wait_for("every rule evaluated", evaluated)
    assert len(rules) == sum(len(g["rules"]) for g in sync.load_rules()["groups"])
    assert [r["name"] for r in rules if r["health"] != "ok"] == []


def test_an_alert_follows_a_real_worker_state(stack):
    """No backend server registered with the gateway: BridgeGatewayNoServer goes pending."""
    prometheus, *_ = stack

    def pending() -> list[Any]:
        alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "BridgeGatewayNoServer"]

    (alert,) = prometheus.wait_for("BridgeGatewayNoServer pending", pending)
    assert alert["state"] in ("pending", "firing")
    assert alert["labels"]["job"] == "bridge-gateway"


async def test_lateness_percentiles_of_real_deliveries_come_back_from_prometheus(stack, amqp):
    """The dashboard's p99 lateness query, over what the real delay worker observed."""
    prometheus, _, settings, unique = stack
    sink = await delay_helpers.make_sink(amqp, unique, SINK)
    client = await DelayClient(amqp, settings).open()
    lateness = f'bridge_delay_lateness_seconds_count{{job="bridge-delay", topic="{sink.exchange}"}}'
    try:
        # The topic's lateness series exists once a scrape saw the topic (a labelled series
        # is exported from its first observation or stored message): rate() needs a sample
        # before the deliveries it is to count.
        await client.send(b"x", sink.exchange, delay_ms=0, message_id="first")
        await asyncio.to_thread(
            prometheus.wait_for,
            "the topic's lateness series",
            lambda: prometheus.query(lateness)["data"]["result"],
        )
        for i in range(20):
            await client.send(b"x", sink.exchange, delay_ms=0, message_id=f"m{i}")
        await sink.wait_for(21)
    finally:
        await client.close()
    (p99,) = [
        e
        for e in dashboard_exprs("delay")
        if e.startswith("histogram_quantile(0.99") and "lateness" in e
    ]

    def answer() -> float | None:
        result = prometheus.query(promql(p99))["data"]["result"]
        value = float(result[0]["value"][1]) if result else float("nan")
        return value if value == value else None  # NaN until a rate exists

    value = await asyncio.to_thread(prometheus.wait_for, "a p99 lateness", answer)
    assert 0 <= value <= 300  # within the histogram's buckets
    published = prometheus.query('bridge_delay_published_total{job="bridge-delay"}')
    assert float(published["data"]["result"][0]["value"][1]) >= 20
