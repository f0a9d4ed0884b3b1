"""Container image and Kubernetes manifests, checked offline.

Every overlay is rendered with ``kubectl kustomize`` and each object validated in strict mode
against a pinned Kubernetes version; the Dockerfile is linted with hadolint; and every
``BRIDGE_*`` name the manifests set must be a setting the code really reads.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bridge.host import available_workers
from bridge.settings import HostSettings
from tests.monitoring.tools import prometheus_tool

ROOT = Path(__file__).resolve().parents[3]
K8S_VERSION = "1.31.0"
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(__file__).resolve().parents[3] / ".venv" / "bin" / name)
    if not Path(path).exists():
        pytest.skip(
            f"{name} is not installed (pip install '.[test]' brings hadolint; kubectl comes with the machine)"
        )
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def known_settings() -> set[str]:
    names = {f"BRIDGE_{n.upper()}" for n in HostSettings.model_fields} | {"BRIDGE_SECRETS_DIR"}
    from pydantic_settings import BaseSettings

    for worker in available_workers():
        module = importlib.import_module(f"workers.{worker}.config")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings:
                prefix = str(obj.model_config.get("env_prefix", "")).upper()
                if prefix.startswith("BRIDGE_"):
                    names |= {f"{prefix}{n.upper()}" for n in obj.model_fields}
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_strictly(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            # no offline schema for the Prometheus Operator's CRDs: checked below and in
            # tests/monitoring (promtool on the rendered rules)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _matches(selector: dict, labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return ok


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_objects_fit_the_workloads(overlay, tmp_path):
    """The PodMonitor scrapes every worker pod on a port it has, under the job names the
    rules and dashboards use; the PrometheusRule's rules load in promtool."""
    docs = render(overlay)
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    if not monitors and not rules:
        pytest.skip(f"{overlay} does not include k8s/components/monitoring")
    (monitor,) = monitors
    spec = monitor["spec"]
    ports = {e["port"] for e in spec["podMetricsEndpoints"]}
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert workloads
    for doc in workloads:
        assert doc["metadata"].get("namespace") == monitor["metadata"].get("namespace")
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert _matches(spec["selector"], labels), doc["metadata"]["name"]
        assert labels[spec["jobLabel"]] == doc["metadata"]["name"]
        assert doc["metadata"]["name"] in ("bridge-directed", "bridge-delay", "bridge-gateway")
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert ports <= {p.get("name") for p in container["ports"]}
    promtool = prometheus_tool("promtool")
    (rule,) = rules
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_only_set_settings_the_code_reads(overlay):
    known = known_settings()
    used: set[str] = set()
    for doc in render(overlay):
        if doc["kind"] == "ConfigMap":
            used |= {k for k in doc.get("data", {}) if k.startswith("BRIDGE_")}
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("BRIDGE_")}
    assert used, "expected BRIDGE_* settings in the manifests"
    assert used <= known, f"not settings of any worker: {sorted(used - known)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_drain_in_time(overlay):
    docs = render(overlay)
    drain = float(
        next(d for d in docs if d["metadata"]["name"].startswith("bridge-settings"))["data"][
            "BRIDGE_DRAIN_SECONDS"
        ]
    )
    for doc in docs:
        if doc["kind"] not in ("StatefulSet", "Deployment"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > drain + 5
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
            assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["resources"]["requests"] and c["resources"]["limits"]
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/run/secrets/bridge" in mounts
        if doc["kind"] == "StatefulSet":
            assert doc["spec"]["volumeClaimTemplates"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shard_count_matches_replicas(overlay):
    """A StatefulSet of a sharded worker runs exactly SHARD_COUNT replicas (ordinal = shard)."""
    sets = [d for d in render(overlay) if d["kind"] == "StatefulSet"]
    assert {d["metadata"]["name"] for d in sets} >= {"bridge-directed", "bridge-delay"}
    for doc in sets:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        counts = [v for k, v in env.items() if k.endswith("__SHARD_COUNT")]
        assert counts == [str(doc["spec"]["replicas"])], doc["metadata"]["name"]
    if overlay == "prod":
        assert all(d["spec"]["replicas"] == 3 for d in sets)


def test_prod_overlay_has_disruption_budgets_and_anti_affinity():
    docs = render("prod")
    assert sum(d["kind"] == "PodDisruptionBudget" for d in docs) == 3
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment"):
            anti = doc["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            # a selector that matches no pod (a label only on the workload object) spreads nothing
            for term in anti["preferredDuringSchedulingIgnoredDuringExecution"]:
                selector = term["podAffinityTerm"]["labelSelector"]
                assert _matches(selector, labels), doc["metadata"]["name"]


def test_dockerfile_lints_clean_and_runs_as_non_root_with_exec_entrypoint():
    dockerfile = (ROOT / "Dockerfile").read_text()
    out = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    final_stage = dockerfile.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001", final_stage, re.M)
    assert re.search(r'^ENTRYPOINT \["rabbitmq-bridge"\]', final_stage, re.M), (
        "exec form so SIGTERM reaches the worker"
    )
    assert (ROOT / ".dockerignore").exists()
