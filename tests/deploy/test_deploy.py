"""Static checks of the deployment files (no container engine or systemd runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_prometheus_rules_pass_their_promtool_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed here (make setup installs it as root)")
    for args in (["check", "rules", "rnnsentry.rules.yml"],
                 ["test", "rules", "rnnsentry.rules.test.yml"]):  # fmt: skip
        done = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus",
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_rule_has_a_promtool_case_that_fires_and_one_that_does_not() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rnnsentry.rules.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    cases = yaml.safe_load((DEPLOY / "prometheus" / "rnnsentry.rules.test.yml").read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in cases["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert len(alerts) >= 11
    assert alerts - fires == set(), "no promtool case where these fire"
    assert alerts - quiet == set(), "no promtool case where these stay quiet"
    assert (fires | quiet) - alerts == set(), "cases of alerts that no rule has"


def test_the_rules_use_only_metric_names_the_daemon_exports() -> None:
    from detector.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    exported |= {name + suffix for name in exported for suffix in ("_total", "_bucket")}
    used = set(re.findall(r"\b(?:rnnsentry|process)_[a-z_]+",
                          (DEPLOY / "prometheus" / "rnnsentry.rules.yml").read_text()))  # fmt: skip
    assert used and used <= exported, used - exported


def test_the_daemon_image_holds_no_torch_and_runs_the_daemon() -> None:
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    assert "torch" not in text.replace("No torch", "") and "[train]" not in text
    assert 'ENTRYPOINT ["rnnsentry", "run"]' in text
    assert re.search(r"^USER \d+", text, re.M), "the image must not run as root"


def test_the_systemd_unit_runs_and_reloads_the_daemon() -> None:
    text = (DEPLOY / "systemd" / "rnnsentry.service").read_text()
    assert re.search(r"^ExecStart=\S+/rnnsentry run --config \S+$", text, re.M)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "LoadCredential=mqtt_password:" in text  # read via $CREDENTIALS_DIRECTORY


def test_files_the_compose_stack_mounts_exist() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    for rel in re.findall(r"- \./([\w./-]+):", text):
        if rel != "model.onnx":  # the user's trained model
            assert (DEPLOY / rel).exists(), rel
