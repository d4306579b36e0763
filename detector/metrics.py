"""Prometheus metrics (names are a contract) and the HTTP endpoint that serves them.

Every label value comes from a closed set created at start-up, so zero series
exist before the first event; no stream id is ever a label. ``/metrics``,
``/healthz`` (the daemon's liveness check: its scoring loop comes round) and ``/readyz``
(its readiness check).
"""

from __future__ import annotations

import bisect
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client import metrics as _client_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from detector import __version__
from detector.errors import REJECTION_REASONS

log = logging.getLogger(__name__)

OUTCOMES = ("scored", "rejected", "dropped")
ALERT_EVENTS = ("raised", "cleared", "update")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_INFER_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1)

# Another process's samples: (sample name, sorted labels) -> value, as it last reported them.
RemoteSamples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Samples about the reading process alone (the one that serves /metrics): a scoring process
# never reports them, since adding them up over processes would mean nothing (a version, a
# connection state, a time).
READING_PROCESS_ONLY: Final = frozenset({
    "rnnsentry_build_info", "rnnsentry_model_info", "rnnsentry_mqtt_connected",
    "rnnsentry_mqtt_reconnects_total", "rnnsentry_last_message_timestamp_seconds",
    "rnnsentry_queue_depth",
})  # fmt: skip
# A scoring process reports its own CPU time and memory under these names, so that they add
# up over the scoring processes beside the reading process's own ``process_*`` samples.
_SCORING_PROCESS_NAMES: Final = {
    "process_cpu_seconds_total": "rnnsentry_scoring_cpu_seconds_total",
    "process_resident_memory_bytes": "rnnsentry_scoring_resident_memory_bytes",
}


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def remote_samples(metrics: Metrics) -> RemoteSamples:
    """What a worker process reports of its metrics: every non-zero sample that adds up over
    processes (counters and histograms are totals since it started), its CPU time and memory
    under the scoring processes' names, and no ``_created`` time.

    >>> m = Metrics()
    >>> m.messages.labels("scored").inc(3); m.last_message.set(1.7e9)
    >>> names = {name for name, _ in remote_samples(m)}
    >>> "rnnsentry_messages_total" in names, "rnnsentry_last_message_timestamp_seconds" in names
    (True, False)
    """
    out: RemoteSamples = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            name = _SCORING_PROCESS_NAMES.get(sample.name, sample.name)
            if (
                sample.value
                and not name.endswith("_created")
                and not name.startswith(("process_", "python_"))
                and name not in READING_PROCESS_ONLY
            ):
                out[_key(name, sample.labels)] = sample.value
    return out


class BatchHistogram:
    """A histogram that takes a whole array of observations in one numpy call.

    prometheus-client's ``Histogram.observe`` takes a lock and walks the buckets in Python
    for every value; the worker observes one latency per sample, so that cost grew with
    the message rate. This collector is exposed exactly like a ``Histogram`` of the same
    name and buckets (``_bucket`` by ``le``, ``_count``, ``_sum``, ``_created``).

    >>> r = CollectorRegistry()
    >>> h = BatchHistogram("demo_seconds", "Demo", (0.1, 1.0), registry=r)
    >>> h.observe_many(np.array([0.05, 0.1, 0.5, 3.0]))
    >>> [r.get_sample_value("demo_seconds_bucket", {"le": le}) for le in ("0.1", "1.0", "+Inf")]
    [2.0, 3.0, 4.0]
    """

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or not bounds:
            raise ValueError("buckets must be a sorted, non-empty sequence")
        if bounds[-1] == float("inf"):
            bounds.pop()
        self.name = name
        self.documentation = documentation
        self._bounds = np.asarray(bounds)
        self._bound_list = bounds
        self._labels = [
            floatToGoString(b)  # type: ignore[no-untyped-call]
            for b in (*bounds, float("inf"))
        ]
        self._counts = np.zeros(len(bounds) + 1, np.int64)  # per bucket, not cumulative
        self._sum = 0.0
        self._created = time.time()
        self._lock = threading.Lock()  # the worker observes, the HTTP thread collects
        registry.register(self)

    def observe(self, amount: float) -> None:
        i = bisect.bisect_left(self._bound_list, amount)
        with self._lock:
            self._counts[i] += 1
            self._sum += amount

    def observe_many(self, amounts: np.ndarray) -> None:
        """Observe every value of ``amounts`` (a value on a bound counts in that bucket)."""
        if len(amounts) <= 2:  # one onnxruntime call a batch: numpy costs more here
            for amount in amounts.tolist():
                self.observe(amount)
            return
        where = np.searchsorted(self._bounds, amounts, side="left")
        counts = np.bincount(where, minlength=len(self._counts))
        total = float(np.sum(amounts))
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> list[Metric]:
        with self._lock:
            counts = self._counts.copy()
            total = self._sum
        family = Metric(self.name, self.documentation, "histogram")
        cumulative = np.cumsum(counts)
        for le, value in zip(self._labels, cumulative, strict=True):
            family.add_sample(self.name + "_bucket", {"le": le}, float(value))
        family.add_sample(self.name + "_count", {}, float(cumulative[-1]))
        if self._bounds[0] >= 0:
            family.add_sample(self.name + "_sum", {}, total)
        if getattr(_client_metrics, "_use_created", True):
            family.add_sample(self.name + "_created", {}, self._created)
        return [family]


class Metrics:
    """All of rnnsentry's metrics on one (by default private) registry, with the process's
    own (``process_*``, ``python_info``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "rnnsentry_build_info", "rnnsentry's version (value 1)", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
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
        self.mqtt_reconnects = Counter(
            "rnnsentry_mqtt_reconnects", "Connections to the broker made again after one was lost",
            registry=r,
        )  # fmt: skip
        self.last_message = Gauge(
            "rnnsentry_last_message_timestamp_seconds",
            "When the last message came from the broker (Unix time; 0: none yet)", registry=r,
        )  # fmt: skip
        self.alerts_active = Gauge(
            "rnnsentry_alerts_active", "Streams with an alert raised and not yet cleared",
            registry=r,
        )  # fmt: skip
        # The scoring processes' own use (workers >= 1); the reading process's is process_*.
        self.scoring_cpu = Counter(
            "rnnsentry_scoring_cpu_seconds", "CPU time of the scoring processes", registry=r
        )
        self.scoring_memory = Gauge(
            "rnnsentry_scoring_resident_memory_bytes",
            "Resident memory of the scoring processes, added up", registry=r,
        )  # fmt: skip
        # Histograms observed in bulk by the worker (one numpy call per batch).
        self.batch_size = BatchHistogram(
            "rnnsentry_batch_size", "Samples per onnxruntime call", _BATCH_BUCKETS, r
        )
        self.inference_seconds = BatchHistogram(
            "rnnsentry_inference_seconds", "Time of one onnxruntime call", _INFER_BUCKETS, r
        )
        self.decision_latency = BatchHistogram(
            "rnnsentry_decision_latency_seconds", "From receiving a message to its decision",
            _LATENCY_BUCKETS, r,
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
        self._remote: dict[str, RemoteSamples] = {}
        self._remote_lock = threading.Lock()

    def merge(self, source: str, samples: RemoteSamples) -> None:
        """Take another process's latest samples (``remote_samples``): from now on every
        sample of the same name and labels shows the sum over this process and the others."""
        with self._remote_lock:
            self._remote[source] = samples

    def _remote_totals(self) -> RemoteSamples:
        totals: RemoteSamples = {}
        with self._remote_lock:
            for samples in self._remote.values():
                for key, value in samples.items():
                    totals[key] = totals.get(key, 0.0) + value
        return totals

    def collect(self) -> list[Metric]:
        """Every family of the registry, other processes' samples added in."""
        families = list(self.registry.collect())
        totals = self._remote_totals()
        if totals:
            for family in families:
                family.samples = [
                    s._replace(
                        value=s.value + totals.get((s.name, tuple(sorted(s.labels.items()))), 0.0)
                    )
                    for s in family.samples
                ]
        return families

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value over every process, as /metrics shows it (None: no such)."""
        key = _key(name, labels or {})
        for family in self.collect():
            for s in family.samples:
                if _key(s.name, s.labels) == key:
                    return float(s.value)
        return None

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejections.labels(reason).inc(n)
        self.messages.labels("rejected").inc(n)

    def set_models(self, models: list[tuple[str, str, str]]) -> None:
        self.model_info.clear()
        for name, cell, fingerprint in models:
            self.model_info.labels(name, cell, fingerprint).set(1)


MAX_CONNECTIONS = 32  # HTTP connections served at once; more are closed at once
IDLE_TIMEOUT_S = 10.0  # a connection open this long is closed, silent or dripping bytes
SERVER_NAME = "rnnsentry"  # the Server header: no library or Python version for a scanner

# A WSGI application: (environ, start_response) -> body chunks.
_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _MergedCollector(Collector):
    """The daemon's metrics as one collector: this process's registry with the samples of
    the scoring processes added in (:meth:`Metrics.collect`), so /metrics shows the sums."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect()


def _always_healthy() -> tuple[bool, str]:
    return True, "ok"


def metrics_app(
    metrics: Metrics, ready: Callable[[], tuple[bool, str]],
    healthy: Callable[[], tuple[bool, str]] = _always_healthy,
) -> _App:  # fmt: skip
    """/metrics by prometheus-client's own WSGI app (content negotiation, OpenMetrics,
    gzip, ``name[]`` filters), with /healthz (``healthy``) and /readyz (``ready``) beside
    it, each 503 with its reason when its check fails; every response names the server
    :data:`SERVER_NAME`."""
    registry = CollectorRegistry(auto_describe=True)  # names known, so name[] filters work
    registry.register(_MergedCollector(metrics))
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def named(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, ("Server", SERVER_NAME)], *exc)

        path = environ.get("PATH_INFO", "")
        try:
            if path == "/metrics":
                body: Iterable[bytes] = prometheus(environ, named)
                return body
            if environ["REQUEST_METHOD"] != "GET":
                return _text(named, "405 Method Not Allowed", "use GET\n", [("Allow", "GET")])
            if path in ("/healthz", "/readyz"):
                ok, why = (healthy if path == "/healthz" else ready)()
                return _text(named, "200 OK" if ok else "503 Service Unavailable", why + "\n")
            return _text(named, "404 Not Found", "not found: try /metrics, /healthz or /readyz\n")
        except Exception:  # answered here, so wsgiref never writes its own versioned error
            log.exception("metrics http: %s failed", path)
            return _text(named, "500 Internal Server Error", "internal error\n")

    return app


def _text(
    start_response: Callable[..., Any], status: str, body: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:  # fmt: skip
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data))), *(headers or [])])  # fmt: skip
    return [data]


class _Handler(WSGIRequestHandler):
    """wsgiref's handler with no versions and quiet logs."""

    def version_string(self) -> str:
        return SERVER_NAME  # on the errors the handler itself sends (a bad request line)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics http: %s", format % args)


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], max_connections: int, idle_timeout_s: float
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        # Each connection's deadline, open time plus the timeout: one reaper ends a silent
        # client and one that sends a byte now and then (a socket timeout would not).
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(address, _Handler)
        threading.Thread(target=self._reap, name="metrics-http-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this one is refused, the rest go on
            return
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + self.idle_timeout_s
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(request, None)
        self._slots.release()

    def _reap(self) -> None:
        """End the connections past their deadline: their threads' reads return at once."""
        while not self._closed.wait(min(1.0, self.idle_timeout_s / 4)):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [c for c, deadline in self._deadlines.items() if deadline < now]
            for connection in late:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went silent (the idle timeout) or away: not worth a traceback.
        log.debug("metrics http: connection from %s ended", client_address, exc_info=True)


class MetricsServer:
    """/metrics, /healthz and /readyz over wsgiref: at most MAX_CONNECTIONS at once, each
    closed IDLE_TIMEOUT_S after it opened."""

    def __init__(
        self, metrics: Metrics, host: str, port: int, ready: Callable[[], tuple[bool, str]],
        healthy: Callable[[], tuple[bool, str]] = _always_healthy,
    ) -> None:  # fmt: skip
        self._server = _BoundedServer((host, port), MAX_CONNECTIONS, IDLE_TIMEOUT_S)
        self._server.set_app(metrics_app(metrics, ready, healthy))
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
