"""The daemon: wiring and lifecycle around the engine.

``Daemon.start()`` reads as its steps (models, metrics server, worker, MQTT);
``stop()`` undoes them in reverse: stop intake, drain the queue, publish
``offline``, disconnect, join the worker, close the metrics server. One worker
thread owns all stream state; paho's thread only enqueues.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from detector.config import Config, read_password
from detector.engine import (
    DUPLICATE,
    MODEL_NON_FINITE,
    OUT_OF_ORDER,
    SCORED,
    AlertEvent,
    BatchResult,
    Engine,
)
from detector.errors import ConfigError, PayloadError
from detector.metrics import Metrics, MetricsServer
from detector.model import LoadedModel
from detector.mqtt import Inbound, MqttLink
from detector.payload import parse_message
from detector.routing import Router
from detector.snapshot import load_snapshot, save_snapshot

log = logging.getLogger(__name__)

_STATUS_REASON = {OUT_OF_ORDER: "out_of_order", DUPLICATE: "duplicate",
                  MODEL_NON_FINITE: "model_non_finite"}  # fmt: skip
_EVICT_EVERY_S = 10.0
_REJECTION_LOG_EVERY_S = 10.0


class RateLimitedLog:
    """At most one warning per reason per interval, saying how many were not logged.

    >>> r = RateLimitedLog(10.0)
    >>> [r.note("decode", "x", now=t) for t in (0.0, 1.0, 11.0)]
    [True, False, True]
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def note(self, reason: str, detail: str, count: int = 1, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last.get(reason, -math.inf) < self.every_s:
            self._quiet[reason] = self._quiet.get(reason, 0) + count
            return False
        self._last[reason] = now
        quiet = self._quiet.pop(reason, 0)
        log.warning("rejected (%s): %s%s", reason, detail,
                    f" [+{quiet} more since the last such line]" if quiet else "")  # fmt: skip
        return True


@dataclass
class _Pending:
    """Samples of one batch bound for one model."""

    streams: list[str]
    ts: list[float]
    values: list[list[float]]
    received: list[float]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Daemon:
    """Subscribes, scores, alerts, and reports; see the module docstring."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        if not config.models:
            raise ConfigError("no model configured: give --model or a [[models]] section")
        self.config = config
        self.metrics = metrics or Metrics()
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=config.batch.queue_size)
        self.engines: list[Engine] = []
        self.router = Router([])
        self.link: MqttLink | None = None
        self.server: MetricsServer | None = None
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._last_evict = time.monotonic()
        self._last_snapshot = time.monotonic()
        self.instance = config.daemon.instance
        self._rejection_log = RateLimitedLog(_REJECTION_LOG_EVERY_S)

    # --- lifecycle ---

    def start(self) -> None:
        self._install(self._load_models())
        self._restore_snapshot()
        self._start_metrics()
        self._start_worker()
        self._start_mqtt()

    def stop(self) -> None:
        """Stop intake, drain what was received, say offline, disconnect, snapshot, close."""
        if self.link is not None:
            self.link.stop_intake()  # later input stays in the broker's session for the next run
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=30)  # it finishes the batch in hand and drains the queue
        if self.link is not None:
            self.link.stop()
        self._save_snapshot()
        if self.server is not None:
            self.server.stop()
        log.info("stopped")

    def request_reload(self) -> None:
        """Ask the worker to reload the model files (SIGHUP); it keeps the old on failure."""
        self._reload_requested.set()

    def ready(self) -> tuple[bool, str]:
        if not self.engines:
            return False, "no model loaded"
        if self.link is None or not self.link.connected.is_set():
            why = f" ({self.link.last_error})" if self.link and self.link.last_error else ""
            return False, "not connected to the broker" + why
        if self.inbox.qsize() >= 0.9 * self.config.batch.queue_size:
            return False, "input queue above its high-water mark"
        return True, "ready"

    # --- start-up steps ---

    def _load_models(self) -> tuple[list[Engine], Router]:
        """Load and check every model file; raises ModelFileError naming the bad one."""
        rt = self.config.runtime
        engines: list[Engine] = []
        routes: list[tuple[str, int]] = []
        for i, mc in enumerate(self.config.models):
            model = LoadedModel.load(mc.path, mc.name or None, rt.providers, rt.intra_op_threads)
            engines.append(Engine(model, self.config.scoring, self.config.streams))
            routes.extend((topic, i) for topic in mc.topics)
        names = [e.model.name for e in engines]
        for name in sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"two models are named {name!r}: give each a name in [[models]]")
        return engines, Router(routes)

    def _install(self, loaded: tuple[list[Engine], Router]) -> None:
        self.engines, self.router = loaded
        self.metrics.set_models(
            [(e.model.name, e.model.meta.cell, e.model.meta.fingerprint) for e in self.engines]
        )

    def _restore_snapshot(self) -> None:
        path = self.config.snapshot.path
        if path:
            try:
                restored = load_snapshot(path, self.engines)
            except OSError as exc:
                raise ConfigError(f"snapshot.path: cannot read {path}: {exc.strerror}") from None
            if restored:
                log.info("restored stream state from %s: %s", path, restored)
            self.metrics.streams_active.set(sum(len(e.table) for e in self.engines))

    def _save_snapshot(self) -> None:
        path = self.config.snapshot.path
        if not path or not self.engines:
            return
        try:
            size = save_snapshot(path, self.engines)
            log.debug("snapshot of %d bytes written to %s", size, path)
        except OSError as exc:
            self.metrics.snapshot_failures.inc()
            log.error("cannot write the snapshot %s: %s", path, exc)

    def _start_metrics(self) -> None:
        mc = self.config.metrics
        if mc.enabled:
            self.server = MetricsServer(self.metrics, mc.host, mc.port, self.ready)
            self.server.start()
            log.info("metrics on http://%s:%d/metrics", mc.host, self.server.port)

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self._worker.start()

    def _start_mqtt(self) -> None:
        mc = self.config.mqtt
        self.link = MqttLink(
            mc,
            client_id=self.config.client_id,
            status_topic=mc.status_topic.format(instance=self.instance),
            filters=self.router.filters,
            inbox=self.inbox,
            on_drop=self.metrics.messages.labels("dropped").inc,
            on_connection=lambda up: self.metrics.mqtt_connected.set(1 if up else 0),
            password=read_password(mc),
        )
        self.link.start()
        log.info("connecting to %s as %s", mc.broker, self.config.client_id)

    # --- the worker ---

    def _work(self) -> None:
        batch_max = self.config.batch.max
        wait_s = self.config.batch.max_wait_ms / 1000.0
        while True:
            stopping = self._stopping.is_set()
            batch = self._take(batch_max, wait_s, 0.0 if stopping else 0.1)
            if batch:
                try:
                    self.process(batch)
                except Exception:  # a bug must not kill the only worker: count and go on
                    log.exception("batch of %d messages failed", len(batch))
                    self.metrics.messages.labels("dropped").inc(len(batch))
            elif stopping:
                return
            self._housekeeping()

    def _take(self, batch_max: int, wait_s: float, idle_s: float) -> list[Inbound]:
        try:
            first = self.inbox.get(timeout=idle_s) if idle_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + wait_s
        while len(batch) < batch_max:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        return batch

    def _housekeeping(self) -> None:
        m = self.metrics
        m.queue_depth.set(self.inbox.qsize())
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self._reload()
        now = time.monotonic()
        interval = self.config.snapshot.interval_s
        if self.config.snapshot.path and interval > 0 and now - self._last_snapshot >= interval:
            self._last_snapshot = now
            self._save_snapshot()
        if now - self._last_evict >= _EVICT_EVERY_S:
            self._last_evict = now
            wall = time.time()
            m.evictions.inc(sum(e.evict_idle(wall) for e in self.engines))
            m.streams_active.set(sum(len(e.table) for e in self.engines))

    def _reload(self) -> None:
        """Validate every new model file first; swap only if all load (worker thread)."""
        try:
            engines, router = self._load_models()
        except Exception as exc:  # keep serving with the old models
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed, keeping the running model(s): %s", exc)
            return
        # The same [[models]] entry keeps its streams, whatever name the new file carries.
        for engine, previous in zip(engines, self.engines, strict=True):
            if not engine.adopt_state(previous):
                log.warning("model %s changed its state shape: its streams start afresh",
                            engine.model.name)  # fmt: skip
        self._install((engines, router))
        link = self.link
        if link is not None and set(router.filters) != set(link.filters):
            gone = sorted(set(link.filters) - set(router.filters))
            link.filters = router.filters  # what on_connect subscribes after a reconnect
            if gone:
                link.client.unsubscribe(gone)
            link.client.subscribe([(f, self.config.mqtt.qos) for f in router.filters])
        self.metrics.reloads.labels("ok").inc()
        log.info("models reloaded: %s", ", ".join(
            f"{e.model.name} ({e.model.meta.fingerprint})" for e in engines))  # fmt: skip

    def process(self, batch: list[Inbound]) -> None:
        """Route, parse, step and publish one micro-batch (the worker's whole job)."""
        m = self.metrics
        pending: dict[int, _Pending] = {}
        limits = self.config.payload
        for topic, payload, received in batch:
            route = self.router.route(topic)
            if route is None:
                m.reject("unknown_route")
                self._rejection_log.note("unknown_route", repr(topic))
                continue
            target, stream = route
            model = self.engines[target].model
            try:
                parsed = parse_message(
                    payload, model.meta.features, model.feature_index, received, limits
                )
            except PayloadError as exc:
                m.reject(exc.reason)
                self._rejection_log.note(exc.reason, f"{topic}: {exc.detail}")
                continue
            if parsed.ignored_names:
                m.ignored_values.inc(parsed.ignored_names)
            p = pending.get(target)
            if p is None:
                p = pending[target] = _Pending([], [], [], [])
            for reading in parsed.readings:
                p.streams.append(stream)
                p.ts.append(reading.ts)
                p.values.append(reading.values)
                p.received.append(received)
        for target, p in pending.items():
            self._step(self.engines[target], p)
        m.streams_active.set(sum(len(e.table) for e in self.engines))

    def _step(self, engine: Engine, p: _Pending) -> None:
        m = self.metrics
        result = engine.process(p.streams, np.asarray(p.ts), np.asarray(p.values))
        decided = time.time()
        for size, seconds in zip(result.call_sizes, result.call_seconds, strict=True):
            m.batch_size.observe(size)
            m.inference_seconds.observe(seconds)
        scored = result.status == SCORED
        m.messages.labels("scored").inc(int(scored.sum()))
        for code, reason in _STATUS_REASON.items():
            count = int((result.status == code).sum())
            if count:
                m.reject(reason, count)
                self._rejection_log.note(reason, f"{count} sample(s) in one batch", count)
        if result.gap_resets:
            m.gap_resets.inc(result.gap_resets)
        if result.evicted:
            m.evictions.inc(result.evicted)
        for received in p.received:
            m.decision_latency.observe(decided - received)
        for event in result.events:
            self._publish_alert(engine, event, decided)
        if self.config.mqtt.publish_scores:
            self._publish_scores(p, result, scored)

    def _publish_alert(self, engine: Engine, event: AlertEvent, decided: float) -> None:
        model = engine.model
        doc = {
            "stream": event.stream,
            "event": event.event,
            "alert_id": f"{event.stream}#{event.episode}",
            "episode": event.episode,
            "ts": event.ts,
            "time": _iso(event.ts),
            "decided_at": decided,
            "likelihood": event.likelihood,
            "anomaly_score": round(event.score, 6),
            "raw_score": event.raw_score,
            "threshold": self.config.scoring.threshold,
            "top_features": [{"feature": f, "std_error": round(e, 4)} for f, e in event.top],
            "model": model.name,
            "fingerprint": model.meta.fingerprint,
            "instance": self.instance,
        }
        self.metrics.alerts.labels(event.event).inc()
        if event.event != "update":
            log.info("alert %s %s (likelihood %.6f)", event.event, doc["alert_id"],
                     event.likelihood)  # fmt: skip
        self._send(self.config.mqtt.alert_topic.format(stream=event.stream), doc, qos=1)

    def _publish_scores(self, p: _Pending, result: BatchResult, scored: np.ndarray) -> None:
        for i in np.flatnonzero(scored):
            raw = float(result.raw[i])
            doc = {
                "stream": p.streams[i],
                "ts": p.ts[i],
                "raw_score": None if math.isnan(raw) else raw,
                "likelihood": float(result.likelihood[i]),
                "anomaly_score": round(float(result.score[i]), 6),
                "active": bool(result.active[i]),
            }
            self._send(self.config.mqtt.score_topic.format(stream=p.streams[i]), doc, qos=0)

    def _send(self, topic: str, doc: dict[str, object], qos: int) -> None:
        if self.link is None:
            return
        if not self.link.publish(topic, json.dumps(doc).encode(), qos=qos):
            self.metrics.publish_failures.inc()
