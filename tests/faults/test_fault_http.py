"""Faults at the metrics endpoint.

Promise: a daemon restarted at once (by systemd after a crash) gets its metrics port back
even though the run before served scrapes a moment ago; a port that another process
listens on is still refused, in one line.
"""

from __future__ import annotations

import socket
import urllib.request

import pytest

from detector.config import build_config
from detector.daemon import preflight
from detector.metrics import Metrics, MetricsServer
from training.demo.localbroker import free_port

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
