"""compose.yaml, the local trial stack, checked offline (no Docker engine needed).

Validated against the Compose specification's JSON schema (vendored in tests/compose/);
every file it mounts exists; it runs each worker, scraped by a Prometheus whose
configuration promtool accepts, under the job names the alert rules use.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import yaml

from tests.monitoring import sync
from tests.monitoring.tools import prometheus_tool

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = json.loads((ROOT / "tests" / "compose" / "compose-spec.json").read_text())


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft201909Validator(SCHEMA)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_specification():
    assert errors(compose()) == []


def test_the_schema_rejects_what_compose_would_reject():
    doc = compose()
    for breakage in (
        lambda d: d["services"]["directed"].update(comand=["run", "directed"]),
        lambda d: d["services"]["gateway"].update(ports="7000"),
        lambda d: d.update(servics={}),
        lambda d: d["services"]["rabbitmq"]["healthcheck"].update(retries="many"),
    ):
        broken = copy.deepcopy(doc)
        breakage(broken)
        assert errors(broken), breakage


def test_the_stack_runs_each_worker_with_rabbitmq_prometheus_and_grafana():
    services = compose()["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:4.")
    plugins = (ROOT / "deploy" / "compose" / "rabbitmq-enabled-plugins").read_text()
    assert "rabbitmq_consistent_hash_exchange" in plugins
    for worker in sync.WORKERS:
        service = services[worker]
        assert service["build"] == "." and service["command"] == ["run", worker]
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert service["environment"]["BRIDGE_AMQP_URL"].startswith("amqp://bridge:bridge@rabbitmq")
    assert {"prometheus", "grafana"} <= set(services)


def test_every_mounted_file_exists():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_loads_the_rules_and_scrapes_the_jobs_the_rules_name(tmp_path):
    services = compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    config_path = ROOT / next(s for s, t in mounts.items() if t == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(config_path.read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    for worker in sync.WORKERS:
        assert jobs[f"bridge-{worker}"] == [f"{worker}:9100"]
    (rule_file,) = config["rule_files"]
    assert any(t == rule_file and (ROOT / s) == sync.RULES for s, t in mounts.items())
    # the same configuration with the rules file where it lies in this repository
    config["rule_files"] = [str(sync.RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [prometheus_tool("promtool"), "check", "config", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_is_provisioned_with_the_dashboards():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load(
        (ROOT / next(s for s, t in mounts.items() if "provisioning/dashboards" in t)).read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    source = next(s for s, t in mounts.items() if t == path)
    assert (ROOT / source).resolve() == (sync.COMPONENT / "dashboards").resolve()
    assert sorted(p.name for p in (ROOT / source).glob("*.json")) == [
        f"bridge-{w}.json" for w in sorted(sync.WORKERS)
    ]
    datasource = yaml.safe_load(
        (ROOT / next(s for s, t in mounts.items() if "provisioning/datasources" in t)).read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
