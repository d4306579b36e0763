"""Faults at the metrics endpoint.

Promises: a daemon restarted at once (by systemd after a crash) gets its metrics port back
even though the run before served scrapes a moment ago, while a port that another process
listens on is still refused, in one line; idle and slow clients hold at most 32
connections, each for at most 10 s, and scoring goes on meanwhile.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from detector.config import build_config
from detector.daemon import preflight
from detector.metrics import Metrics, MetricsServer
from tests.support import (
    TINY_FEATURES,
    DaemonProcess,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto, free_port

pytestmark = pytest.mark.faults


def _problems(port: int, model: str) -> list[str]:
    config, problems = build_config({"metrics": {"host": "127.0.0.1", "port": port},
                                     "models": [{"path": model}]})  # fmt: skip
    assert problems == []
    return [p for p in preflight(config) if p.startswith("metrics.port")]


def test_a_restart_gets_the_port_its_last_run_served_scrapes_on(tiny_model: object) -> None:
    port = free_port()
    server = MetricsServer(Metrics(), "127.0.0.1", port, lambda: (True, "ready"))
    server.start()
    for _ in range(3):  # the server closes these: they linger in TIME_WAIT on its port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    server.stop()
    assert _problems(port, str(tiny_model)) == []
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        (problem,) = _problems(port, str(tiny_model))
        assert "cannot listen" in problem
    finally:
        taken.close()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_and_slow_http_clients_hold_no_more_than_the_cap_and_not_for_long(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    """50 clients at the metrics port, the first 32 sending a byte every 0.3 s, the rest
    silent: the daemon serves at most 32 at once, each for at most 10 s, keeps scoring
    (scored = sent), and answers scrapes again once the deadline has passed."""
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="http",
                           env={"RNNSENTRY_DAEMON__WORKERS": "0"})  # fmt: skip
    publisher = Publisher(mosquitto.port)
    rows = tiny_fleet(n_streams=1, n_steps=40, seed=15, start_step=600).values[0]
    clients: list[socket.socket] = []
    try:
        before = _threads(daemon.proc.pid)
        began = time.monotonic()
        clients = [socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
                   for _ in range(50)]  # fmt: skip
        most = 0
        for t in range(40):  # scoring goes on while they hold on
            publisher.send("sensors/p", sample_payload(TINY_FEATURES, rows[t], 1000.0 + t))
            for s in clients[:32]:  # these hold every slot, never silent for long
                try:
                    s.sendall(b"G")
                except OSError:
                    pass
            most = max(most, _threads(daemon.proc.pid))
            time.sleep(0.3)
        poll_until(lambda: daemon.metric("rnnsentry_messages_total", {"outcome": "scored"})
                   == 40, timeout=30)  # fmt: skip
        assert most - before <= 32 + 1  # a thread a connection, the deadlines' one
        assert time.monotonic() - began > 11  # past every connection's deadline: all let go
        assert daemon.ready()
        assert daemon.stop() == 0
    finally:
        for s in clients:
            s.close()
        publisher.close()
        daemon.stop(signal.SIGKILL)
