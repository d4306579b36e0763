"""Static checks of deploy/systemd/rnnsentry.service: systemd's own verifier finds nothing
to say, its security review rates it 2.0 or better, and it runs the daemon as the daemon
expects (notify, watchdog, exit code 2 not restarted). tests/e2e/test_systemd.py runs the
daemon as this unit would."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from detector.cli import main

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "rnnsentry.service"
MAX_EXPOSURE = 2.0


def settings(text: str) -> dict[str, list[str]]:
    """Each ``Key=value`` of a unit file, every value of a key repeated."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            out.setdefault(match[1], []).append(match[2])
    return out


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    return found


def test_systemd_verifies_the_unit_without_a_word(tmp_path: Path) -> None:
    """``systemd-analyze verify`` warns of unknown keys and bad values but still exits 0:
    its output must be empty. The daemon's executable is not installed here, so a stub
    stands in for it."""
    stub = tmp_path / "rnnsentry"
    stub.write_text("#!/bin/sh\n", encoding="utf-8")
    stub.chmod(0o755)
    unit = tmp_path / "rnnsentry.service"
    unit.write_text(UNIT.read_text().replace("/opt/rnnsentry/bin/rnnsentry", str(stub)))
    done = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True)  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_security_review_rates_the_unit_at_most_2() -> None:
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True)  # fmt: skip
    match = re.search(r"Overall exposure level for rnnsentry\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= MAX_EXPOSURE, done.stdout


def test_the_unit_waits_for_ready_feeds_the_watchdog_and_spares_config_errors() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]  # the scoring processes never notify
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert 10 <= int(unit["WatchdogSec"][0]) <= 120
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert "WorkingDirectory" not in unit  # systemd's default, /, as the e2e test runs it
    assert "ORT_DISABLE_TELEMETRY=1" in unit["Environment"]


def test_a_configuration_error_exits_2_as_the_unit_expects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
