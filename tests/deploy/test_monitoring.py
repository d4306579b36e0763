"""Static checks of the monitoring stack in deploy/: the Grafana dashboard and its
provisioning, Alertmanager, and how compose.yaml wires them to Prometheus (no container
engine runs here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rnnsentry.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
METRIC = re.compile(r"\b(?:rnnsentry|process|python)_[a-z_]+\b")
# What the dashboard must draw: rates by outcome and reason, latency, alerts, streams, the
# connection, the last message's age, and the process's memory and CPU.
MUST_DRAW = {
    "rnnsentry_messages_total", "rnnsentry_rejections_total", "rnnsentry_inference_seconds_bucket",
    "rnnsentry_alerts_active", "rnnsentry_streams_active", "rnnsentry_mqtt_connected",
    "rnnsentry_last_message_timestamp_seconds", "process_resident_memory_bytes",
    "process_cpu_seconds_total", "rnnsentry_scoring_resident_memory_bytes",
    "rnnsentry_scoring_cpu_seconds_total",
}  # fmt: skip


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def exported_names() -> set[str]:
    """Every sample name the daemon's registry can serve."""
    from detector.metrics import Metrics

    names = {family.name for family in Metrics().registry.collect()}
    suffixes = ("_total", "_bucket", "_count", "_sum")
    return names | {name + suffix for name in names for suffix in suffixes}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]  # fmt: skip


def test_the_dashboard_draws_what_an_operator_watches_from_metrics_the_daemon_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    queries = panel_queries(dashboard)
    assert all(p["targets"] for p in panels)
    exported = exported_names()
    used: set[str] = set()
    for title, expr in queries:
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr} reads no rnnsentry metric"
        assert names <= exported, f"{title}: the daemon serves no {names - exported}"
        used |= names
    assert used >= MUST_DRAW, MUST_DRAW - used


def test_every_panel_reads_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus"
    refs = [p["datasource"] for p in dashboard["panels"]]
    refs += [t["datasource"] for p in dashboard["panels"] for t in p["targets"]]
    refs += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert refs and all(r == {"type": "prometheus", "uid": source["uid"]} for r in refs), refs


def test_the_dashboard_queries_are_promql_that_promtool_reads(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed here (make setup installs it as root)")
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana's variables, filled in as Grafana would, make each query a recording rule.
    fill = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(panel_queries(dashboard)):
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts: container path -> path under deploy/."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source[2:]
    return mounts


def test_compose_wires_grafana_and_alertmanager_to_prometheus() -> None:
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    assert {"mosquitto", "rnnsentry", "prometheus", "alertmanager", "grafana"} <= services.keys()
    for service in services.values():
        for source in bind_mounts(service).values():
            assert (DEPLOY / source).exists() or source == "model.onnx", source  # model: yours

    grafana = bind_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "grafana/provisioning"
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "rnnsentry.yaml")["providers"]
    assert grafana[provider["options"]["path"]] == "grafana/dashboards"
    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    where = urlsplit(source["url"])
    assert where.hostname in services and f"{where.port}:{where.port}" in services[
        where.hostname]["ports"]  # fmt: skip

    prometheus = bind_mounts(services["prometheus"])
    config = load_yaml(DEPLOY / prometheus["/etc/prometheus/prometheus.yml"])
    (target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "alertmanager" and f"{port}:{port}" in services[host]["ports"]
    assert set(config["rule_files"]) <= set(prometheus), "a rule file that is not mounted"
    alertmanager = services["alertmanager"]
    flag = next(a for a in alertmanager["command"] if a.startswith("--config.file="))
    mounted = bind_mounts(alertmanager)[flag.split("=", 1)[1]]
    assert mounted == "alertmanager/alertmanager.yml"


def test_the_alertmanager_config_routes_to_a_receiver_it_defines() -> None:
    path = DEPLOY / "alertmanager" / "alertmanager.yml"
    config = load_yaml(path)
    names = {r["name"] for r in config["receivers"]}
    routes = [config["route"], *config["route"].get("routes", [])]
    assert all(route["receiver"] in names for route in routes)
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool is not installed here (make setup installs prometheus-alertmanager)")
    done = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_names_every_metric_the_daemon_serves() -> None:
    from detector.metrics import Metrics

    readme = (ROOT / "README.md").read_text()
    for family in Metrics().registry.collect():
        if family.name.startswith("rnnsentry_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}" in readme, name
