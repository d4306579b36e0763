"""Static checks of deploy/kubernetes/: the built-in kinds against Kubernetes' own schemas
(kubernetes-validate, offline, strict: no unknown field), the PodMonitor (a Prometheus
Operator CRD, whose schema that package lacks) against the fields the operator documents,
and the references between the manifests and to the daemon's configuration."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from detector.config import build_config

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSION = "1.30"  # the oldest we claim is 1.28 (the pod-index label); schemas of 1.30 hold it
# PodMonitorSpec and PodMetricsEndpoint fields of monitoring.coreos.com/v1, and a
# RelabelConfig's, as the Prometheus Operator's API reference lists them (the ones a plain
# scrape might use; authentication and TLS fields are left out on purpose).
PODMONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "jobLabel", "keepDroppedTargets", "labelLimit",
    "labelNameLengthLimit", "labelValueLengthLimit", "namespaceSelector", "podMetricsEndpoints",
    "podTargetLabels", "sampleLimit", "scrapeProtocols", "selector", "targetLimit",
}  # fmt: skip
POD_METRICS_ENDPOINT = {
    "enableHttp2", "filterRunning", "followRedirects", "honorLabels", "honorTimestamps",
    "interval", "metricRelabelings", "params", "path", "port", "portNumber", "relabelings",
    "scheme", "scrapeTimeout", "trackTimestampsStaleness",
}  # fmt: skip
RELABEL_CONFIG = {"action", "modulus", "regex", "replacement", "separator", "sourceLabels",
                  "targetLabel"}  # fmt: skip
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                   "lowercase", "uppercase", "keepequal", "dropequal"}  # fmt: skip
DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def manifests() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kubernetes by kind (one of each kind there)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"a second {doc['kind']} in {path.name}"
            found[doc["kind"]] = doc
    return found


def test_the_built_in_kinds_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    objects = manifests()
    assert {"StatefulSet", "Service", "ConfigMap", "PodMonitor"} <= objects.keys()
    for kind, doc in objects.items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: see the PodMonitor test
        try:
            kubernetes_validate.validate(doc, VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validator_refuses_a_field_kubernetes_does_not_have() -> None:
    import kubernetes_validate

    statefulset = manifests()["StatefulSet"]
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, VERSION, strict=True)


def pod_template(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = objects["StatefulSet"]["spec"]["template"]
    return template


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = pod_template(objects)["spec"]["containers"]
    return dict(only)


def test_the_podmonitor_uses_only_documented_fields_and_finds_the_pods() -> None:
    objects = manifests()
    monitor = objects["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= PODMONITOR_SPEC, set(spec) - PODMONITOR_SPEC
    labels = pod_template(objects)["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # The rules (deploy/prometheus/rnnsentry.rules.yml) look for job="rnnsentry".
    assert labels[spec["jobLabel"]] == "rnnsentry"
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert spec["podMetricsEndpoints"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= POD_METRICS_ENDPOINT, set(endpoint) - POD_METRICS_ENDPOINT
        assert endpoint["port"] in ports
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert DURATION.match(endpoint["interval"])
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= RELABEL_CONFIG, set(relabel) - RELABEL_CONFIG
            assert relabel.get("action", "replace").lower() in RELABEL_ACTIONS
            assert all(LABEL_NAME.match(name) for name in relabel.get("sourceLabels", []))


def test_the_statefulset_probes_serves_and_keeps_what_the_daemon_needs() -> None:
    objects = manifests()
    statefulset, main = objects["StatefulSet"], container(objects)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"

    service = objects["Service"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    labels = pod_template(objects)["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]

    # The configuration the daemon reads, where the pod mounts it, is valid and complete.
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_template(objects)["spec"]["volumes"]}
    configmap = objects["ConfigMap"]
    config_volume = next(
        n
        for n, v in volumes.items()
        if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]
    )
    args = main["args"]
    (key,) = configmap["data"]
    assert args[args.index("--config") + 1] == f"{mounts[config_volume]}/{key}"
    config, problems = build_config(tomllib.loads(configmap["data"][key]))
    assert problems == []
    assert config.metrics.host == "0.0.0.0" and config.metrics.port == ports["metrics"]
    assert config.daemon.workers >= 0  # not -1: it would count the node's cores

    # Snapshots on the pod's own volume; the model where the model ConfigMap is mounted.
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert Path(config.snapshot.path).parent == Path(mounts[claim["metadata"]["name"]])
    (model,) = config.models
    model_volume = next(n for n, m in mounts.items() if Path(model.path).parent == Path(m))
    assert "configMap" in volumes[model_volume]
    # Every $(VAR) of the arguments is set, so Kubernetes fills each in.
    defined = {e["name"] for e in main["env"]}
    used = {name for arg in args for name in re.findall(r"\$\((\w+)\)", arg)}
    assert used and used <= defined, used - defined
    # It runs as the image's user, never as root.
    context = pod_template(objects)["spec"]["securityContext"]
    assert context["runAsNonRoot"] and context["runAsUser"] != 0
