"""The alert rules, their thresholds, the PrometheusRule and the dashboards, checked offline.

promtool (Debian's ``prometheus`` package, installed by .ci/run) checks the rules and runs
unit tests that make every alert fire and then resolve; kustomize renders the component with
every threshold changed and promtool checks the result again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring import sync
from tests.monitoring.tools import prometheus_tool

RULE_FILE = sync.RULES


def promtool() -> str:
    return prometheus_tool("promtool")


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in sync.load_rules()["groups"] for r in g["rules"]}


def test_derived_files_are_generated_from_the_sources():
    """One source for each rule expression: the PrometheusRule is the rules file's groups."""
    assert sync.main(["--check"]) == 0, "run: python -m tests.monitoring.sync"
    generated = yaml.safe_load((sync.COMPONENT / "prometheusrule.yaml").read_text())
    assert generated["spec"]["groups"] == sync.load_rules()["groups"]


def test_thresholds_are_the_numbers_after_the_comparison():
    """Every threshold key names an alert, and the replacement can find its number."""
    defaults = sync.thresholds()
    rules = alerts()
    assert set(defaults) <= set(rules)
    for name, value in defaults.items():
        assert rules[name]["expr"].count(sync.DELIMITER) == 1, rules[name]["expr"]
        float(value)  # a number, not the rest of an expression
    assert defaults["BridgeDirectedBacklog"] == "40" and defaults["BridgeDelayLate"] == "1"


def test_promtool_check_rules():
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULE_FILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


# Each alert: input series (promtool's expanding notation, one sample per minute), when it
# must be firing (and with which labels), and when it must have resolved. The series go
# bad at minute 0 and recover at minute 30 unless said otherwise; `for:` delays are inside.
D = 'job="bridge-directed", instance="d:9100"'
Y = 'job="bridge-delay", instance="y:9100"'
G = 'job="bridge-gateway", instance="g:9100"'
CASES: dict[str, dict[str, Any]] = {
    "BridgeWorkerDown": {
        "series": {f"up{{{D}}}": "0x30 1x30"},
        "labels": {"job": "bridge-directed", "instance": "d:9100"},
    },
    "BridgeWorkerNotReady": {
        "series": {f'bridge_worker_ready{{{Y}, worker="delay"}}': "0x30 1x30"},
        "labels": {"job": "bridge-delay", "instance": "y:9100", "worker": "delay"},
    },
    "BridgeBrokerDisconnected": {
        "series": {f"bridge_broker_connected{{{G}}}": "0x30 1x30"},
        "labels": {"job": "bridge-gateway", "instance": "g:9100"},
    },
    "BridgeDirectedCommitFailures": {
        "series": {f"bridge_directed_commit_failures_total{{{D}}}": "0+3x30 90x30"},
        "labels": {"job": "bridge-directed", "instance": "d:9100"},
    },
    "BridgeDirectedCommitSlow": {
        # every commit takes between 0.25 s and 0.5 s: p99 in that bucket
        "series": {
            f'bridge_directed_commit_seconds_bucket{{{D}, le="0.25"}}': "0x60",
            f'bridge_directed_commit_seconds_bucket{{{D}, le="0.5"}}': "0+60x30 1800x30",
            f'bridge_directed_commit_seconds_bucket{{{D}, le="+Inf"}}': "0+60x30 1800x30",
        },
        "labels": {"job": "bridge-directed", "instance": "d:9100"},
    },
    "BridgeDirectedBacklog": {
        "series": {
            f'bridge_directed_backlog_messages{{{D}, target="t1"}}': "45x30 3x30",
            f'bridge_directed_backlog_messages{{{D}, target="t2"}}': "2x60",
        },
        "labels": {"job": "bridge-directed", "instance": "d:9100"},
    },
    "BridgeDirectedOverflowDrops": {
        "series": {f"bridge_directed_overflow_drops_total{{{D}}}": "0+5x30 150x30"},
        "labels": {"job": "bridge-directed", "instance": "d:9100"},
    },
    "BridgeDirectedDeadLetters": {
        "series": {
            f'bridge_directed_dead_letters_total{{{D}, reason="missing_targets"}}': "0+1x30 30x30"
        },
        "labels": {"job": "bridge-directed", "instance": "d:9100", "reason": "missing_targets"},
    },
    "BridgeDirectedPullsForwarded": {
        "series": {f"bridge_directed_pulls_forwarded_total{{{D}}}": "0+2x30 60x30"},
        "labels": {"job": "bridge-directed", "instance": "d:9100"},
    },
    "BridgeDelayCommitFailures": {
        "series": {f"bridge_delay_commit_failures_total{{{Y}}}": "0+1x30 30x30"},
        "labels": {"job": "bridge-delay", "instance": "y:9100"},
    },
    "BridgeDelayLate": {
        "series": {
            f'bridge_delay_lateness_seconds_bucket{{{Y}, le="1"}}': "0x60",
            f'bridge_delay_lateness_seconds_bucket{{{Y}, le="2.5"}}': "0+100x30 3000x30",
            f'bridge_delay_lateness_seconds_bucket{{{Y}, le="+Inf"}}': "0+100x30 3000x30",
        },
        "labels": {"job": "bridge-delay", "instance": "y:9100"},
    },
    "BridgeDelayBacklog": {
        "series": {f"bridge_delay_window_messages{{{Y}}}": "190000x30 1000x30"},
        "labels": {"job": "bridge-delay", "instance": "y:9100"},
    },
    "BridgeDelayDeadLetters": {
        "series": {
            f'bridge_delay_dead_letters_total{{{Y}, reason="invalid_delay"}}': "0+1x30 30x30",
            # due-time reasons belong to BridgeDelayTargetUnroutable, not to this alert
            f'bridge_delay_dead_letters_total{{{Y}, reason="unroutable"}}': "0x60",
        },
        "labels": {"job": "bridge-delay", "instance": "y:9100", "reason": "invalid_delay"},
    },
    "BridgeDelayTargetUnroutable": {
        "series": {
            f'bridge_delay_dead_letters_total{{{Y}, reason="exchange_not_found"}}': "0+1x30 30x30",
            f'bridge_delay_dead_letters_total{{{Y}, reason="invalid_delay"}}': "0x60",
        },
        "labels": {"job": "bridge-delay", "instance": "y:9100", "reason": "exchange_not_found"},
    },
    "BridgeDelayPublishRetries": {
        "series": {f"bridge_delay_publish_retries_total{{{Y}}}": "0+4x30 120x30"},
        "labels": {"job": "bridge-delay", "instance": "y:9100"},
    },
    "BridgeGatewayLinkDown": {
        "series": {f"bridge_gateway_link_up{{{G}}}": "0x30 1x30"},
        "labels": {"job": "bridge-gateway", "instance": "g:9100"},
    },
    "BridgeGatewayNoServer": {
        "series": {f"bridge_gateway_servers_alive{{{G}}}": "0x30 2x30"},
        "labels": {"job": "bridge-gateway", "instance": "g:9100"},
    },
    "BridgeGatewayRefusals": {
        "series": {
            f'bridge_gateway_refused_total{{{G}, reason="unauthorized"}}': "0+5x30 150x30",
            # a few refusals stay below the threshold
            f'bridge_gateway_refused_total{{{G}, reason="hello_timeout"}}': "0+1x60",
        },
        "labels": {"job": "bridge-gateway", "instance": "g:9100", "reason": "unauthorized"},
    },
    "BridgeGatewaySlowConsumers": {
        "series": {
            f'bridge_gateway_closed_total{{{G}, reason="slow_consumer"}}': "0+1x30 30x30",
            f'bridge_gateway_closed_total{{{G}, reason="client_bye"}}': "0+50x60",
        },
        "labels": {"job": "bridge-gateway", "instance": "g:9100"},
    },
    "BridgeGatewayPublishFailures": {
        "series": {
            f'bridge_gateway_publish_failures_total{{{G}, reason="nacked"}}': "0+1x30 30x30"
        },
        "labels": {"job": "bridge-gateway", "instance": "g:9100", "reason": "nacked"},
    },
    "BridgeGatewayUndeliverable": {
        "series": {
            f'bridge_gateway_undeliverable_total{{{G}, reason="session_gone"}}': "0+5x30 150x30"
        },
        "labels": {"job": "bridge-gateway", "instance": "g:9100", "reason": "session_gone"},
    },
    "BridgeGatewayConnectionsNearLimit": {
        "series": {f"bridge_gateway_connections{{{G}}}": "90000x30 100x30"},
        "labels": {"job": "bridge-gateway", "instance": "g:9100"},
    },
}


def promtool_tests() -> dict[str, Any]:
    rules = alerts()
    tests = []
    for name, case in CASES.items():
        rule = rules[name]
        expected = {
            "exp_labels": {"alertname": name, **rule["labels"], **case["labels"]},
            "exp_annotations": rule["annotations"],
        }
        tests.append(
            {
                "interval": "1m",
                "input_series": [
                    {"series": series, "values": values}
                    for series, values in case["series"].items()
                ],
                "alert_rule_test": [
                    {"eval_time": "25m", "alertname": name, "exp_alerts": [expected]},
                    {"eval_time": "55m", "alertname": name, "exp_alerts": []},
                ],
            }
        )
    return {"rule_files": [str(RULE_FILE)], "evaluation_interval": "1m", "tests": tests}


def test_every_alert_has_a_firing_and_resolving_case():
    assert set(CASES) == set(alerts())


def test_promtool_unit_tests_fire_and_resolve_every_alert(tmp_path: Path):
    tests = tmp_path / "bridge-rules.test.yml"
    tests.write_text(yaml.safe_dump(promtool_tests(), sort_keys=False))
    out = subprocess.run(
        [promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path):
    """The harness above would notice an alert that does not fire (here: the threshold)."""
    broken = yaml.safe_load(RULE_FILE.read_text())
    for group in broken["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "BridgeDirectedBacklog":
                rule["expr"] = rule["expr"].replace("> 40", "> 50")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(broken, sort_keys=False))
    spec = promtool_tests()
    spec["rule_files"] = [str(rules)]
    tests = tmp_path / "t.yml"
    tests.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run(
        [promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "BridgeDirectedBacklog" in out.stdout + out.stderr


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_thresholds_set_in_an_overlay_reach_every_alert(tmp_path: Path):
    """An overlay that changes every threshold gets each new number, and rules that still load."""
    new = {name: str(float(v) + 7.5) for name, v in sync.thresholds().items()}
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [
                    os.path.relpath(sync.ROOT / "k8s" / "base", overlay),
                    os.path.relpath(sync.COMPONENT / "thresholds", overlay),
                ],
                "components": [os.path.relpath(sync.COMPONENT, overlay)],
                "configMapGenerator": [
                    {
                        "name": "bridge-alert-thresholds",
                        "behavior": "merge",
                        "literals": [f"{k}={v}" for k, v in new.items()],
                    }
                ],
            }
        )
    )
    docs = render(overlay)
    assert not [d for d in docs if d["metadata"]["name"] == "bridge-alert-thresholds"], (
        "the thresholds are build-time settings (local-config), not an object to apply"
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    rendered = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    for name, value in new.items():
        assert rendered[name].endswith(f" > {value}"), rendered[name]
    originals = alerts()
    for name, expr in rendered.items():
        if name not in new:
            assert expr == originals[name]["expr"]
    rules = tmp_path / "rendered.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def dashboard_exprs() -> dict[str, list[str]]:
    out = {}
    for worker in sync.WORKERS:
        doc = json.loads((sync.COMPONENT / "dashboards" / f"bridge-{worker}.json").read_text())
        out[worker] = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    return out


def test_dashboards_are_provisioning_ready_and_have_the_panels_an_operator_needs_first():
    provider = yaml.safe_load((sync.COMPONENT / "dashboards" / "provider.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    for worker, exprs in dashboard_exprs().items():
        doc = json.loads((sync.COMPONENT / "dashboards" / f"bridge-{worker}.json").read_text())
        assert doc["uid"] == f"bridge-{worker}"
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        text = "\n".join(exprs)
        assert "bridge_worker_ready" in text and "bridge_broker_connected" in text
        assert re.search(r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(\w+_bucket", text)
        assert "dead_letters_total" in text or "undeliverable_total" in text
        assert f'job="bridge-{worker}"' in text


def test_the_operations_doc_lists_every_alert_with_its_delay_and_default_threshold():
    doc = (sync.ROOT / "docs" / "operations.md").read_text()
    listed: dict[str, str] = {}
    for line in doc.splitlines():
        if line.startswith("| `Bridge"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`(Bridge\w+)`", cells[0]):
                listed[name] = cells[-1]
                assert cells[-2] == alerts()[name].get("for", "—"), line
    defaults = sync.thresholds()
    assert set(listed) == set(alerts())
    assert {n: v for n, v in listed.items() if v != "—"} == defaults
