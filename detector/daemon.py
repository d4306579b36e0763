"""The daemon: wiring and lifecycle around the engine.

``Daemon.start()`` reads as its steps (models, metrics server, worker, MQTT);
``stop()`` undoes them in reverse: stop intake, drain the queue, publish
``offline``, disconnect, join the worker, close the metrics server.

Batches are taken and scored under one lock, by whichever thread sees them due. After
each message it queues, paho's thread scores the batch itself if one is due
(``batch.max`` queued, or the oldest has waited ``batch.max_wait_ms``); the worker thread
scores what is left when no later message comes to find it due. Under load, paho's thread
reads and scores in turn, with no hand-over between two busy threads: on CPython, two
threads that both want the interpreter lock pay for every switch, and paho's reader
releases and retakes it at each of its system calls. A backlog then waits in the socket
and the broker, not in our queue. Measured with ``bench/throughput.py`` (10,000 streams):
the hand-over design dropped 84,000 of 300,000 flooded messages and scored 20,000/s paced;
this one drops none and scores 24,400/s. Holding the lock while taking *and* scoring keeps
each stream's samples in arrival order.
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
from typing import Final

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
from detector.payload import PlainForm, parse_into, parse_message
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
    values: list[float]  # flat: the model's n_features values per sample, in feature order
    received: list[float]


_UNROUTABLE: Final = (-1, "")  # a memoised "no template matches this topic"
_ROUTE_MEMO_MAX = 131_072  # topics remembered (~200 bytes each, 26 MB at most); cleared when full


def _drain_into(inbox: queue.Queue[Inbound], batch: list[Inbound], batch_max: int) -> None:
    """Move what is queued into ``batch``, up to ``batch_max``, under ONE lock: a get()
    per message costs a lock round trip and a condition-variable notify each."""
    with inbox.mutex:
        items = inbox.queue
        n = min(batch_max - len(batch), len(items))
        if n <= 0:
            return
        if n == len(items):
            batch.extend(items)
            items.clear()
        else:
            batch.extend([items.popleft() for _ in range(n)])
        inbox.not_full.notify(n)


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
        self._batch_lock = threading.Lock()  # taking and scoring a batch; model swaps
        self._batch_max = config.batch.max
        self._wait_s = config.batch.max_wait_ms / 1000.0
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
            on_queued=self.on_queued,
            password=read_password(mc),
        )
        self.link.start()
        log.info("connecting to %s as %s", mc.broker, self.config.client_id)

    # --- the worker ---

    def _work(self) -> None:
        batch_max, wait_s = self._batch_max, self._wait_s
        while True:
            stopping = self._stopping.is_set()
            # The worker's share is the batch that paho's thread left: no message came after
            # it to find it due. It looks a little later than paho's thread would, so that
            # under load it finds nothing to do and takes no interpreter lock from paho.
            if stopping:
                queued = self._await_due(batch_max, 0.0, 0.0)
            else:
                queued = self._await_due(batch_max, wait_s, 0.1, slack_s=wait_s)
            if queued:
                self._score_queued(None if stopping else time.time())
            elif stopping:
                return
            self._housekeeping()

    def on_queued(self, received: float) -> None:
        """paho's thread, after queueing a message received at ``received``: score a batch
        here and now if one is due (``batch.max`` queued, or the oldest waited long enough)."""
        if self._due(received):
            self._score_queued(received)

    def _score_queued(self, now: float | None) -> None:
        """Take up to ``batch.max`` queued messages and score them, under the batch lock;
        with ``now``, only if a batch is still due then (another thread may have taken it)."""
        with self._batch_lock:
            if now is not None and not self._due(now):
                return
            batch: list[Inbound] = []
            _drain_into(self.inbox, batch, self._batch_max)
            if not batch:
                return
            try:
                self.process(batch)
            except Exception:  # a bug must not kill the daemon's threads: count and go on
                log.exception("batch of %d messages failed", len(batch))
                self.metrics.messages.labels("dropped").inc(len(batch))

    def _due(self, now: float) -> bool:
        """A batch is due: ``batch.max`` queued, or the oldest queued ``max_wait`` ago."""
        queued = self.inbox.queue
        try:
            return len(queued) >= self._batch_max or now - queued[0][2] >= self._wait_s
        except IndexError:  # nothing queued (another thread took it meanwhile)
            return False

    def _await_due(
        self, batch_max: int, wait_s: float, idle_s: float, slack_s: float = 0.0
    ) -> bool:
        """Wait up to ``idle_s`` for a message, then until a batch is due: ``batch_max``
        queued, or the oldest queued ``wait_s`` ago. False: nothing queued.

        It sleeps rather than waits on the queue: a waiting thread is woken by every put,
        and each wake-up costs paho's busy thread a hand-over of the interpreter lock."""
        inbox = self.inbox
        with inbox.not_empty:
            if not inbox.queue:
                if idle_s <= 0:
                    return False
                inbox.not_empty.wait(idle_s)
                if not inbox.queue:
                    return False
            oldest = inbox.queue[0][2]
            full = len(inbox.queue) >= batch_max
        if not full:
            delay = min(wait_s + slack_s, oldest + wait_s + slack_s - time.time())
            if delay > 0:
                time.sleep(delay)
        return True

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
            with self._batch_lock:
                self._save_snapshot()
        if now - self._last_evict >= _EVICT_EVERY_S:
            self._last_evict = now
            wall = time.time()
            with self._batch_lock:
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
        with self._batch_lock:  # no batch is being scored while the state moves over
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

    # The topic -> route memo of the router it was made for (a reload brings a new router).
    _route_memo: dict[str, tuple[int, str]] | None = None
    _route_memo_router: Router | None = None

    def _routes(self) -> dict[str, tuple[int, str]]:
        memo = self._route_memo
        fresh = self._route_memo_router is self.router
        if memo is None or not fresh or len(memo) >= _ROUTE_MEMO_MAX:
            memo = self._route_memo = {}
            self._route_memo_router = self.router
        return memo

    def _route(self, topic: str, memo: dict[str, tuple[int, str]]) -> tuple[int, str]:
        route = self.router.route(topic)
        memo[topic] = _UNROUTABLE if route is None else route
        return memo[topic]

    def process(self, batch: list[Inbound]) -> None:
        """Route, parse, step and publish one micro-batch (the worker's whole job).

        The loop runs once per message, so it stays small: a memoised route, then
        ``parse_into`` for the plain payload forms; anything else (rejections included)
        goes through ``parse_message``, which says why.
        """
        m = self.metrics
        pending: dict[int, _Pending] = {}
        limits = self.config.payload
        engines = self.engines
        routes = self._routes()
        forms = [PlainForm.of(tuple(e.model.meta.features)) for e in engines]
        for topic, payload, received in batch:
            route = routes.get(topic) or self._route(topic, routes)
            target, stream = route
            if target < 0:
                m.reject("unknown_route")
                self._rejection_log.note("unknown_route", repr(topic))
                continue
            p = pending.get(target)
            if p is None:
                p = pending[target] = _Pending([], [], [], [])
            k = parse_into(payload, forms[target], received, limits, p.ts, p.values)
            if k == 1:
                p.streams.append(stream)
                p.received.append(received)
            elif k:
                p.streams.extend([stream] * k)
                p.received.extend([received] * k)
            else:
                self._parse_slowly(topic, payload, received, engines[target].model, stream, p)
        for target, p in pending.items():
            if p.streams:
                self._step(engines[target], p)
        m.streams_active.set(sum(len(e.table) for e in engines))

    def _parse_slowly(
        self, topic: str, payload: bytes, received: float, model: LoadedModel, stream: str,
        p: _Pending,
    ) -> None:  # fmt: skip
        """The full parser: rejections with their reason, ignored value names, ISO times."""
        m = self.metrics
        try:
            parsed = parse_message(
                payload, model.meta.features, model.feature_index, received, self.config.payload
            )
        except PayloadError as exc:
            m.reject(exc.reason)
            self._rejection_log.note(exc.reason, f"{topic}: {exc.detail}")
            return
        if parsed.ignored_names:
            m.ignored_values.inc(parsed.ignored_names)
        for reading in parsed.readings:
            p.streams.append(stream)
            p.ts.append(reading.ts)
            p.values.extend(reading.values)
            p.received.append(received)

    def _step(self, engine: Engine, p: _Pending) -> None:
        m = self.metrics
        n = len(p.streams)
        x = np.array(p.values, dtype=np.float64).reshape(n, engine.model.meta.n_features)
        result = engine.process(p.streams, np.array(p.ts, dtype=np.float64), x)
        decided = time.time()
        m.batch_size.observe_many(np.asarray(result.call_sizes, dtype=np.float64))
        m.inference_seconds.observe_many(np.asarray(result.call_seconds, dtype=np.float64))
        scored = result.status == SCORED
        n_scored = int(np.count_nonzero(scored))
        m.messages.labels("scored").inc(n_scored)
        if n_scored < n:
            for code, reason in _STATUS_REASON.items():
                count = int(np.count_nonzero(result.status == code))
                if count:
                    m.reject(reason, count)
                    self._rejection_log.note(reason, f"{count} sample(s) in one batch", count)
        if result.gap_resets:
            m.gap_resets.inc(result.gap_resets)
        if result.evicted:
            m.evictions.inc(result.evicted)
        m.decision_latency.observe_many(decided - np.array(p.received, dtype=np.float64))
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
            "top_features": [
                {"feature": f, "std_error": round(e, 4), "share": round(share, 4)}
                for f, e, share in event.top
            ],
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
