"""``rnnsentry run`` killed with -9 and started again: the broker publishes the retained
Last Will ``offline``, and QoS 1 input sent while the daemon was down is scored once it is
back (the MQTT 5 session outlives the process)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support import (
    EXIT_TIMEOUT_S,
    TINY_FEATURES,
    DaemonProcess,
    Listener,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
    wait_for,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.e2e

INSTANCE = "e2e-restart"
STATUS_TOPIC = f"rnnsentry/status/{INSTANCE}"
# A killed process's socket is closed by the kernel, so the will comes at once; the 2 s
# keepalive only bounds the wait should it not.
WILL_TIMEOUT_S = 10.0
QUEUED_SAMPLES = 30
# The daemon's environment: a 2 s keepalive, reconnects after 1 s.
LINK_ENV = {"RNNSENTRY_MQTT__KEEPALIVE_S": "2", "RNNSENTRY_MQTT__RECONNECT_MIN_S": "1",
            "RNNSENTRY_MQTT__RECONNECT_MAX_S": "1"}  # fmt: skip


def test_kill_9_leaves_the_retained_will_and_a_restart_scores_the_input_sent_meanwhile(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    daemons: list[DaemonProcess] = []
    listeners: list[Listener] = []
    try:
        daemons.append(DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance=INSTANCE,
                                     env=LINK_ENV))  # fmt: skip
        status = Listener(mosquitto.port, ["rnnsentry/status/#"])
        listeners.append(status)
        assert wait_for(status.messages, lambda m: True) == (STATUS_TOPIC, b"online", True)

        first = daemons[0]  # killed: no chance to say goodbye, the broker must
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        topic, payload, _ = wait_for(status.messages, lambda m: True, WILL_TIMEOUT_S)
        assert (topic, payload) == (STATUS_TOPIC, b"offline")
        newcomer = Listener(mosquitto.port, ["rnnsentry/status/#"])
        listeners.append(newcomer)
        assert wait_for(newcomer.messages, lambda m: True) == (STATUS_TOPIC, b"offline", True)

        rows = tiny_fleet(n_streams=1, n_steps=QUEUED_SAMPLES, seed=2, start_step=600).values[0]
        publisher = Publisher(mosquitto.port)
        for t, row in enumerate(rows):
            publisher.send("sensors/while-down", sample_payload(TINY_FEATURES, row, 500.0 + t))
        publisher.close()

        second = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance=INSTANCE,
                               env=LINK_ENV)  # fmt: skip
        daemons.append(second)
        assert wait_for(status.messages, lambda m: True)[:2] == (STATUS_TOPIC, b"online")
        scored = {"outcome": "scored"}
        poll_until(lambda: second.metric("rnnsentry_messages_total", scored) == QUEUED_SAMPLES)
    finally:
        for listener in listeners:
            listener.close()
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_scoring_process_that_dies_ends_the_daemon_with_an_error(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    """So that systemd or Kubernetes restarts it: exit 1, the reason in the log, offline."""
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="e2e-worker-dies",
                           env={"RNNSENTRY_DAEMON__WORKERS": "2"})  # fmt: skip
    try:
        status = Listener(mosquitto.port, ["rnnsentry/status/e2e-worker-dies"])
        assert wait_for(status.messages, lambda m: True)[1] == b"online"
        scorers = [p for p in _children(daemon.proc.pid)
                   if "spawn_main" in (Path(f"/proc/{p}/cmdline").read_bytes()
                                            .decode(errors="replace"))]  # fmt: skip
        assert len(scorers) == 2, scorers
        os.kill(scorers[0], signal.SIGKILL)
        assert daemon.proc.wait(timeout=EXIT_TIMEOUT_S) == 1
        log = daemon.log_path.read_text()
        assert "scoring worker" in log and "ended unexpectedly" in log
        assert wait_for(status.messages, lambda m: m[1] == b"offline")[1] == b"offline"
        status.close()
    finally:
        daemon.stop(signal.SIGKILL)


def test_sigterm_in_a_burst_loses_nothing_across_a_restart(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    """Stopped while QoS 1 input pours in: what it took is scored before it exits (every
    stage drains), what it did not take stays in the broker's session, and the next run
    scores that. Every sample is scored once."""
    env = {"RNNSENTRY_MQTT__PUBLISH_SCORES": "true", "RNNSENTRY_DAEMON__WORKERS": "2", **LINK_ENV}
    rows = tiny_fleet(n_streams=4, n_steps=80, seed=4, start_step=600).values
    sent = {(f"pump-{s}", 1000.0 + t) for s in range(4) for t in range(80)}
    scores = Listener(mosquitto.port, ["rnnsentry/scores/#"])
    first = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="e2e-drain", env=env)
    publisher = Publisher(mosquitto.port)
    try:
        for t in range(80):
            for s in range(4):
                payload = sample_payload(TINY_FEATURES, rows[s, t], 1000.0 + t)
                publisher.send(f"sensors/pump-{s}", payload)
            if t == 40:
                first.proc.send_signal(signal.SIGTERM)  # mid-burst
        assert first.proc.wait(timeout=EXIT_TIMEOUT_S) == 0  # one signal: a clean stop
        seen: list[tuple[str, float]] = []

        def all_scored() -> bool:
            while not scores.messages.empty():
                doc = json.loads(scores.messages.get()[1])
                seen.append((doc["stream"], doc["ts"]))
            return set(seen) >= sent

        time.sleep(0.5)  # the first run's last scores in flight
        all_scored()
        by_first = len(seen)
        second = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="e2e-drain", env=env)
        poll_until(all_scored)
        assert 0 < by_first < len(sent)  # the stop came mid-burst: each run scored a part
        assert second.stop() == 0
        all_scored()
        assert sorted(seen) == sorted(sent)  # each once
    finally:
        publisher.close()
        scores.close()
        first.stop(signal.SIGKILL)
