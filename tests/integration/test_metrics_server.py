"""The metrics endpoint over real HTTP: where it listens by default, what it says of itself,
and what it does with clients that hold connections open."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import pytest

import detector.metrics as metrics_module
from detector.config import MetricsConfig
from detector.metrics import Metrics, MetricsServer

pytestmark = pytest.mark.integration


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    monkeypatch.setattr(metrics_module, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 4)
    made = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, "ready"))
    made.start()
    yield made
    made.stop()


def get(port: int, path: str = "/healthz") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    return conn.getresponse()


def test_it_listens_on_this_machine_only_unless_told() -> None:
    assert MetricsConfig().host == "127.0.0.1"


def test_it_names_no_versions(server: MetricsServer) -> None:
    response = get(server.port)
    assert response.status == 200
    assert response.getheader("Server") == "rnnsentry"


def test_an_idle_connection_is_let_go(server: MetricsServer) -> None:
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    began = time.monotonic()
    assert idle.recv(1) == b""  # the server closed it: it sent nothing
    assert time.monotonic() - began < 4.0
    idle.close()


def test_connections_beyond_the_cap_are_refused_and_the_cap_frees(server: MetricsServer) -> None:
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    time.sleep(0.1)  # each has its thread
    extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert extra.recv(1) == b""  # closed at once: no thread for it
    extra.close()
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the held ones' threads end: slots come back
        try:
            if get(server.port).status == 200:
                break
        except (ConnectionError, http.client.RemoteDisconnected):
            time.sleep(0.1)
    else:
        pytest.fail("the server did not serve again after the held connections closed")
