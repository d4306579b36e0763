"""Prometheus metrics (names are a contract) and the HTTP endpoint that serves them.

Every label value comes from a closed set created at start-up, so zero series
exist before the first event; no stream id is ever a label. ``/metrics``,
``/healthz`` (process alive) and ``/readyz`` (the daemon's readiness check).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from detector.errors import REJECTION_REASONS

log = logging.getLogger(__name__)

OUTCOMES = ("scored", "rejected", "dropped")
ALERT_EVENTS = ("raised", "cleared", "update")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_INFER_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1)


class Metrics:
    """All of rnnsentry's metrics on one (by default private) registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("rnnsentry_messages", "Samples by outcome", ["outcome"], registry=r)
        self.rejections = Counter(
            "rnnsentry_rejections", "Rejected messages or samples by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.alerts = Counter("rnnsentry_alerts", "Alert events", ["event"], registry=r)
        self.ignored_values = Counter(
            "rnnsentry_ignored_values", "Value names in payloads that no model feature has",
            registry=r,
        )  # fmt: skip
        self.gap_resets = Counter(
            "rnnsentry_gap_resets", "Stream states reset after a time gap", registry=r
        )
        self.evictions = Counter(
            "rnnsentry_evictions", "Streams forgotten (idle or table full)", registry=r
        )
        self.publish_failures = Counter(
            "rnnsentry_publish_failures", "Alert or score publishes the client refused",
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "rnnsentry_reloads", "Model reloads (SIGHUP) by result", ["result"], registry=r
        )
        self.snapshot_failures = Counter(
            "rnnsentry_snapshot_failures", "Snapshots that could not be written", registry=r
        )
        self.streams_active = Gauge(
            "rnnsentry_streams_active", "Streams with state in memory", registry=r
        )
        self.queue_depth = Gauge(
            "rnnsentry_queue_depth", "Messages waiting for the worker", registry=r
        )
        self.mqtt_connected = Gauge(
            "rnnsentry_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.batch_size = Histogram(
            "rnnsentry_batch_size", "Samples per onnxruntime call", buckets=_BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "rnnsentry_inference_seconds", "Time of one onnxruntime call",
            buckets=_INFER_BUCKETS, registry=r,
        )  # fmt: skip
        self.decision_latency = Histogram(
            "rnnsentry_decision_latency_seconds", "From receiving a message to its decision",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "rnnsentry_model_info", "Loaded models (value 1)", ["model", "cell", "fingerprint"],
            registry=r,
        )  # fmt: skip
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        for event in ALERT_EVENTS:
            self.alerts.labels(event)
        for result in ("ok", "failed"):
            self.reloads.labels(result)

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejections.labels(reason).inc(n)
        self.messages.labels("rejected").inc(n)

    def set_models(self, models: list[tuple[str, str, str]]) -> None:
        self.model_info.clear()
        for name, cell, fingerprint in models:
            self.model_info.labels(name, cell, fingerprint).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A small threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(
        self, metrics: Metrics, host: str, port: int, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        handler = _make_handler(metrics, ready)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler(metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> Any:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok, why = ready()
                self._send(200 if ok else 503, (why + "\n").encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("metrics http: %s", format % args)

    return Handler
