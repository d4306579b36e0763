"""The metrics endpoint over real HTTP: where it listens by default, what it says of itself,
what it does with clients that hold connections open, and what prometheus-client's own
exposition gives it: OpenMetrics when asked, gzip when accepted, every process's figures."""

from __future__ import annotations

import gzip
import http.client
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

import detector.metrics as metrics_module
from detector.config import MetricsConfig
from detector.metrics import Metrics, MetricsServer, remote_samples
from tests.support import metric_value

pytestmark = pytest.mark.integration


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    monkeypatch.setattr(metrics_module, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(metrics_module, "MAX_CONNECTIONS", 4)
    made = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: (True, "ready"))
    made.start()
    yield made
    made.stop()


def get(
    port: int, path: str = "/healthz", headers: dict[str, str] | None = None, method: str = "GET"
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, headers=headers or {})
    return conn.getresponse()


@pytest.fixture
def counted() -> Iterator[tuple[MetricsServer, dict[str, tuple[bool, str]]]]:
    """A server whose registry counted 2 samples scored here and 5 in a scoring process,
    and whose readiness the test sets."""
    here, worker = Metrics(), Metrics()
    here.messages.labels("scored").inc(2)
    worker.messages.labels("scored").inc(5)
    here.merge("worker-0", remote_samples(worker))
    state: dict[str, tuple[bool, str]] = {"ready": (True, "ready")}
    made = MetricsServer(here, "127.0.0.1", 0, lambda: state["ready"])
    made.start()
    yield made, state
    made.stop()


SCORED = ("rnnsentry_messages_total", {"outcome": "scored"})


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


def test_plain_text_by_default_with_every_process_counted(
    counted: tuple[MetricsServer, dict[str, tuple[bool, str]]],
) -> None:
    response = get(counted[0].port, "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    assert response.getheader("Content-Encoding") is None
    assert response.getheader("Server") == "rnnsentry"
    assert metric_value(response.read().decode(), *SCORED) == 7.0


def test_openmetrics_when_the_scraper_asks_for_it(
    counted: tuple[MetricsServer, dict[str, tuple[bool, str]]],
) -> None:
    accept = "application/openmetrics-text; version=1.0.0, text/plain; version=0.0.4; q=0.5"
    response = get(counted[0].port, "/metrics", {"Accept": accept})
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith(
        "application/openmetrics-text; version=1.0.0"
    )
    text = response.read().decode()
    assert text.endswith("# EOF\n")  # OpenMetrics' terminator; the plain format has none
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in openmetrics_families(text)
        for s in family.samples
    }
    assert values[("rnnsentry_messages_total", (("outcome", "scored"),))] == 7.0
    assert values[("rnnsentry_batch_size_count", ())] == 0.0  # the bulk histograms parse too


def test_gzip_when_the_scraper_accepts_it(
    counted: tuple[MetricsServer, dict[str, tuple[bool, str]]],
) -> None:
    response = get(counted[0].port, "/metrics", {"Accept-Encoding": "gzip"})
    assert response.status == 200
    assert response.getheader("Content-Encoding") == "gzip"
    body = response.read()
    assert int(response.getheader("Content-Length", "0")) == len(body)
    assert metric_value(gzip.decompress(body).decode(), *SCORED) == 7.0


def test_a_name_filter_serves_only_that_family(
    counted: tuple[MetricsServer, dict[str, tuple[bool, str]]],
) -> None:
    text = get(counted[0].port, "/metrics?name[]=rnnsentry_messages_total").read().decode()
    assert metric_value(text, *SCORED) == 7.0
    assert "rnnsentry_streams_active" not in text


def test_health_readiness_and_unknown_paths(
    counted: tuple[MetricsServer, dict[str, tuple[bool, str]]],
) -> None:
    server, state = counted
    assert (get(server.port).status, get(server.port, "/readyz").status) == (200, 200)
    state["ready"] = (False, "broker not connected")
    unready = get(server.port, "/readyz")
    assert (unready.status, unready.read()) == (503, b"broker not connected\n")
    missing = get(server.port, "/nothing")
    assert missing.status == 404 and missing.getheader("Server") == "rnnsentry"
    refused = get(server.port, "/healthz", method="POST")
    assert refused.status == 405 and refused.getheader("Allow") == "GET"


def test_a_malformed_request_is_refused_without_versions(server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /metrics extra HTTP/1.0\r\n\r\n")  # refused by the handler itself
        head = raw.makefile("rb").read().decode("latin-1")
    assert head.startswith("HTTP/1.0 400")
    assert "\r\nServer: rnnsentry\r\n" in head and "Python" not in head


def test_a_client_that_drips_its_request_is_cut_off_at_the_deadline(server: MetricsServer) -> None:
    """A byte now and then keeps a socket from ever being idle; the connection's deadline
    still ends it, so slow clients cannot hold every slot for as long as they like."""
    dripping = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    began = time.monotonic()
    cut = 0
    request = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200
    for i in range(len(request)):  # one byte a tenth of a second each, for up to 20 s
        for s in dripping:
            try:
                s.sendall(request[i : i + 1])
            except OSError:
                continue
        time.sleep(0.1)
        if all(_closed(s) for s in dripping):
            cut = 1
            break
    took = time.monotonic() - began
    for s in dripping:
        s.close()
    assert cut and took < 3.0, f"still held after {took:.1f} s"
    assert get(server.port).status == 200


def _closed(s: socket.socket) -> bool:
    """Whether the server has closed this connection (without blocking)."""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)
