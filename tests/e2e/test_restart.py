"""``rnnsentry run`` killed with -9 and started again: the broker publishes the retained
Last Will ``offline``, and QoS 1 input sent while the daemon was down is scored once it is
back (the MQTT 5 session outlives the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from detector.localbroker import Mosquitto, free_port
from tests.support import (
    DAEMON_START_TIMEOUT_S,
    TINY_FEATURES,
    Listener,
    Publisher,
    metric_value,
    poll_until,
    sample_payload,
    scrape,
    tiny_fleet,
    wait_for,
)

pytestmark = pytest.mark.e2e

INSTANCE = "e2e-restart"
STATUS_TOPIC = f"rnnsentry/status/{INSTANCE}"
# A killed process's socket is closed by the kernel, so the will comes at once; the 2 s
# keepalive only bounds the wait should it not.
WILL_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 20.0
QUEUED_SAMPLES = 30


class DaemonProcess:
    """``python -m detector run`` with a fixed instance name (so a fixed client id)."""

    def __init__(self, model: Path, broker: Mosquitto, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        env = {
            **os.environ,
            "RNNSENTRY_MQTT__KEEPALIVE_S": "2",
            "RNNSENTRY_MQTT__RECONNECT_MIN_S": "1",
            "RNNSENTRY_MQTT__RECONNECT_MAX_S": "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detector", "run", "--model", str(model), "--broker",
             broker.url, "--metrics-port", str(self.port), "--instance", INSTANCE],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        poll_until(lambda: self.proc.poll() is not None or self._ready(), DAEMON_START_TIMEOUT_S)
        assert self.proc.poll() is None, log_path.read_text()

    def _ready(self) -> bool:
        try:
            return scrape(self.port, "/readyz")[0] == 200
        except OSError:
            return False

    def scored(self) -> float | None:
        body = scrape(self.port)[1]
        return metric_value(body, "rnnsentry_messages_total", {"outcome": "scored"})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_TIMEOUT_S)
        self._log.close()


def test_kill_9_leaves_the_retained_will_and_a_restart_scores_the_input_sent_meanwhile(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    daemons: list[DaemonProcess] = []
    listeners: list[Listener] = []
    try:
        daemons.append(DaemonProcess(tiny_model, mosquitto, tmp_path / "first.log"))
        status = Listener(mosquitto.port, ["rnnsentry/status/#"])
        listeners.append(status)
        assert wait_for(status.messages, lambda m: True) == (STATUS_TOPIC, b"online", True)

        first = daemons[0].proc
        first.send_signal(signal.SIGKILL)  # no chance to say goodbye: the broker must
        assert first.wait(timeout=EXIT_TIMEOUT_S) == -signal.SIGKILL
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

        second = DaemonProcess(tiny_model, mosquitto, tmp_path / "second.log")
        daemons.append(second)
        assert wait_for(status.messages, lambda m: True)[:2] == (STATUS_TOPIC, b"online")
        poll_until(lambda: second.scored() == QUEUED_SAMPLES)
    finally:
        for listener in listeners:
            listener.close()
        for daemon in daemons:
            daemon.close()
