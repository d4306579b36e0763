"""The daemon: wiring and lifecycle around its parts.

The parts, each with one concern: the link (:mod:`detector.link`; MQTT in
:mod:`detector.mqtt`) takes messages into the batcher's inbox (:mod:`detector.batcher`);
the scoring stage (:mod:`detector.stage`) routes, parses, steps and scores a micro-batch;
the publisher (:mod:`detector.publisher`) owns what goes out. ``Daemon`` wires them
together and owns the lifecycle: ``start()`` reads as its steps (models, snapshot,
metrics server, worker, link); ``stop()`` undoes them in reverse: stop intake, drain the
inbox, say ``offline``, disconnect, snapshot, close the metrics server.

Batches are taken and scored under one lock, by whichever thread sees them due. After
each message it queues, the link's thread scores the batch itself if one is due
(``batch.max`` queued, or the oldest has waited ``batch.max_wait_ms``); the worker thread
scores what is left when no later message comes to find it due. Under load the reader
reads and scores in turn, with no hand-over between two busy threads (on CPython they
would pay for every switch of the interpreter lock), and a backlog waits in the socket
and the broker, not in our queue. Holding the lock while taking *and* scoring keeps each
stream's samples in arrival order. ``bench/throughput.py`` measures the design.

The worker thread's loop comes round at least every 0.1 s, busy or idle: each turn is noted
for /healthz and is what feeds systemd's watchdog (:mod:`detector.notify`), so that a daemon
whose scoring stalls is reported and restarted, not one whose timer still ticks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from detector.batcher import Batcher, Inbox
from detector.config import Config, read_password
from detector.engine import Engine, take_over
from detector.errors import ConfigError, RnnsentryError
from detector.journal import AlertJournal, apply_journal, journal_path, read_journals, remove_stale
from detector.link import Inbound, Link, LinkHooks
from detector.metrics import Metrics, MetricsServer
from detector.mqtt import MqttLink
from detector.notify import Notifier
from detector.pool import WorkerPool
from detector.publisher import Publisher
from detector.routing import Router
from detector.snapshot import capture, load_snapshot, merge_captures, write_atomic
from detector.stage import ScoringStage, load_engines

log = logging.getLogger(__name__)

_EVICT_EVERY_S = 10.0
# /healthz fails once the worker's loop has not come round for this long (or for the
# watchdog's interval, if systemd set a shorter one).
LOOP_STALL_S = 30.0


def preflight(config: Config) -> list[str]:
    """What ``run`` would stop on at start, beyond ``check_config``: model files that do not
    load, a password file that cannot be read, a metrics port in use, a snapshot that cannot
    be read. One line each, naming the setting."""
    problems: list[str] = []
    try:
        load_engines(config)
    except RnnsentryError as exc:
        problems.append(str(exc))
    try:
        read_password(config.mqtt)
    except ConfigError as exc:
        problems.append(str(exc))
    mc = config.metrics
    if mc.enabled and mc.port:
        probe = socket.socket(socket.AF_INET6 if ":" in mc.host else socket.AF_INET)
        # As the server binds: the closed connections of a run just ended (TIME_WAIT) do
        # not hold the port, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((mc.host, mc.port))
        except OSError as exc:
            problems.append(f"metrics.port: cannot listen on {mc.host}:{mc.port} ({exc.strerror})")
        finally:
            probe.close()
    path = config.snapshot.path
    if path:
        where = Path(path)
        if where.exists() and not os.access(where, os.R_OK):
            problems.append(f"snapshot.path: cannot read {path}")
        elif not os.access(where.parent if where.parent != Path() else Path("."), os.W_OK):
            problems.append(f"snapshot.path: cannot write in {where.parent}")
    return problems


class Daemon:
    """Subscribes, scores, alerts, and reports; see the module docstring.

    ``link``: the broker connection to use instead of an MQTT one made from the config
    (for example a :class:`~detector.link.MemoryLink`); it is bound and started by
    ``start``. ``notifier``: where to tell systemd how it goes (default: nowhere).
    """

    def __init__(
        self, config: Config, metrics: Metrics | None = None, link: Link | None = None,
        notifier: Notifier | None = None,
    ) -> None:  # fmt: skip
        if not config.models:
            raise ConfigError("no model configured: give --model or a [[models]] section")
        self.config = config
        self.metrics = metrics or Metrics()
        self.batcher = Batcher(config.batch.queue_size, config.batch.max, config.batch.max_wait_ms)
        self.publisher = Publisher(config, self.metrics)
        self.stage = ScoringStage(config, self.metrics, self.publisher)
        self.link: Link | None = None
        self._given_link = link
        processes = config.daemon.scoring_processes
        self.pool = WorkerPool(config, self.metrics, processes) if processes else None
        if config.snapshot.path and self.pool is None:  # the workers keep their own
            self.publisher.journal = AlertJournal(journal_path(config.snapshot.path, 0),
                                                  self.metrics.snapshot_failures.inc)  # fmt: skip
        self.failed = threading.Event()  # a part stopped working: the daemon must end
        self.server: MetricsServer | None = None
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._batch_lock = threading.Lock()  # taking and scoring a batch; model swaps
        self._last_evict = time.monotonic()
        self._last_snapshot = time.monotonic()
        self.instance = config.daemon.instance
        self.last_received = 0.0  # receive time of the latest message (0: none yet)
        self.metrics.last_message.set_function(lambda: self.last_received)
        self._connected_before = False  # a later connection is a reconnect
        self.notifier = notifier or Notifier({})
        self.loop_turned: float | None = None  # monotonic time of the worker loop's last turn
        watchdog_s = self.notifier.watchdog_s
        self.stall_limit_s = min(LOOP_STALL_S, watchdog_s) if watchdog_s else LOOP_STALL_S

    @property
    def inbox(self) -> Inbox:
        return self.batcher.inbox

    @property
    def engines(self) -> list[Engine]:
        return self.stage.engines

    @property
    def router(self) -> Router:
        return self.stage.router

    # --- lifecycle ---

    @property
    def failure(self) -> str:
        """Why the daemon cannot go on ("" while it can): a scoring process died."""
        return self.pool.failure if self.pool is not None else ""

    def start(self) -> None:
        """Start every part, or none: a part that cannot start ends those started before it
        and its error (ConfigError: one line, naming the setting) goes to the caller."""
        self._install(self._load_models())
        self._start_metrics()
        try:
            if self.pool is not None:  # they restore their own streams from the snapshot
                self.pool.on_failure = lambda why: self.failed.set()
                self.pool.start(self.router)
            else:
                self._restore_snapshot()
            self._start_worker()
            self._start_link()
        except BaseException:
            self._stopping.set()
            if self.pool is not None:
                self.pool.stop()
            if self.server is not None:
                self.server.stop()
            raise

    def stop(self) -> None:
        """Stop intake, drain what was received, say offline, disconnect, snapshot, close."""
        self.notifier.stopping("stopping: scoring what was received, then the snapshot")
        if self.link is not None:
            self.link.stop_intake()  # later input stays in the broker's session for the next run
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=30)  # it finishes the batch in hand and drains the queue
        self._save_snapshot()
        if self.pool is not None:
            self.pool.stop()  # they score what they hold; their alerts are published
        if self.link is not None:
            self.link.stop()
        if self.publisher.journal is not None:
            self.publisher.journal.close()
        if self.server is not None:
            self.server.stop()
        log.info("stopped")

    def request_reload(self) -> None:
        """Ask the worker to reload the model files (SIGHUP); it keeps the old on failure.
        systemd hears RELOADING=1 now, and READY=1 once the worker is done."""
        self.notifier.reloading("reloading the model files")
        self._reload_requested.set()

    def healthy(self) -> tuple[bool, str]:
        """/healthz: the worker's loop came round within ``stall_limit_s`` (or has not
        started yet)."""
        turned = self.loop_turned
        if turned is not None:
            idle_s = time.monotonic() - turned
            if idle_s > self.stall_limit_s:
                return False, f"the scoring loop has not come round for {idle_s:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.engines:
            return False, "no model loaded"
        if self.failure:
            return False, self.failure
        if self.link is None or not self.link.connected.is_set():
            why = f" ({self.link.last_error})" if self.link and self.link.last_error else ""
            return False, "not connected to the broker" + why
        if self.batcher.depth() >= 0.9 * self.batcher.queue_size:
            return False, "input queue above its high-water mark"
        return True, "ready"

    # --- start-up steps ---

    def _load_models(self) -> tuple[list[Engine], Router]:
        """Load and check every model file; raises ModelFileError naming the bad one."""
        return load_engines(self.config)

    def _install(self, loaded: tuple[list[Engine], Router]) -> None:
        engines, router = loaded
        self.stage.install(engines, router)
        self.metrics.set_models(
            [(e.model.name, e.model.meta.cell, e.model.meta.fingerprint) for e in engines]
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
            changed = apply_journal(read_journals(path), self.engines, time.time())
            if changed:
                log.info("alert journal: %d stream(s) resume the alert they last published",
                         changed)  # fmt: skip
            self.stage.gauge_streams()

    def _save_snapshot(self) -> None:
        """Copy every stream's state under the batch lock, then write the file outside it:
        scoring waits for the copy, not for the disk."""
        path = self.config.snapshot.path
        if not path or not self.engines:
            return
        if self.pool is not None:
            parts = self.pool.capture()
            if parts is None:
                self.metrics.snapshot_failures.inc()
                log.error("a scoring process did not hand over its state: no snapshot written")
                return
            arrays = merge_captures(parts)
        else:
            with self._batch_lock:
                arrays = capture(self.engines)
                journal = self.publisher.journal
                if journal is not None:
                    journal.mark()
        try:
            size = write_atomic(path, arrays)
            log.debug("snapshot of %d bytes written to %s", size, path)
        except OSError as exc:
            self.metrics.snapshot_failures.inc()
            log.error("cannot write the snapshot %s: %s", path, exc)
            return
        # The snapshot holds what the journals said up to its capture: trim them.
        if self.pool is not None:
            self.pool.control("compact")
        elif journal is not None:
            journal.compact()
        remove_stale(path, self.pool.workers if self.pool is not None else 1)

    def _start_metrics(self) -> None:
        mc = self.config.metrics
        if mc.enabled:
            try:
                self.server = MetricsServer(self.metrics, mc.host, mc.port, self.ready,
                                            self.healthy)  # fmt: skip
            except OSError as exc:
                raise ConfigError(
                    f"metrics.port: cannot listen on {mc.host}:{mc.port} ({exc.strerror})"
                ) from None
            self.server.start()
            log.info("metrics on http://%s:%d/metrics", mc.host, self.server.port)

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self._worker.start()

    def _start_link(self) -> None:
        hooks = LinkHooks(
            inbox=self.batcher.inbox,
            on_drop=self._on_drop,
            on_connection=self._on_connection,
            on_queued=self.on_queued,
        )
        link = self._given_link
        if link is None:
            mc = self.config.mqtt
            link = MqttLink(
                mc,
                client_id=self.config.client_id,
                status_topic=mc.status_topic.format(instance=self.instance),
                filters=self.router.filters,
                hooks=hooks,
                password=read_password(mc),
            )
            log.info("connecting to %s as %s", mc.broker, self.config.client_id)
        else:
            bind: Callable[[LinkHooks], None] | None = getattr(link, "bind", None)
            if bind is not None:
                bind(hooks)
            link.set_filters(self.router.filters)
        self.link = self.publisher.link = link
        if self.pool is not None:
            self.pool.link = link
        self.notifier.status(f"connecting to {self.config.mqtt.broker}")
        link.start()

    # --- the worker ---

    def _work(self) -> None:
        wait_s = self.batcher.wait_s
        while True:
            self._turned()
            stopping = self._stopping.is_set()
            # The worker's share is the batch that the link's thread left: no message came
            # after it to find it due. It looks a little later than that thread would, so
            # that under load it finds nothing to do and takes no interpreter lock from it.
            if stopping:
                queued = self.batcher.await_due(0.0, 0.0)
            else:
                queued = self.batcher.await_due(wait_s, 0.1, slack_s=wait_s)
            if queued:
                self._score_queued(None if stopping else time.time())
            elif stopping:
                return
            self._housekeeping()

    def _turned(self) -> None:
        """The worker's loop came round: note when, and feed systemd's watchdog if the
        scoring processes are alive too."""
        now = self.loop_turned = time.monotonic()
        if self.notifier.watchdog_due(now) and (self.pool is None or self.pool.alive()):
            self.notifier.watchdog(now)

    def _on_connection(self, up: bool) -> None:
        """The link's thread: connected with the subscriptions granted (``up``), or not."""
        self.metrics.mqtt_connected.set(1 if up else 0)
        broker = self.config.mqtt.broker
        if up:
            if self._connected_before:
                self.metrics.mqtt_reconnects.inc()
                self.notifier.status(f"scoring: connected to {broker} again")
            else:  # systemd's start is done once input can arrive
                self.notifier.ready(f"scoring: connected to {broker}, subscribed to "
                                    + ", ".join(self.router.filters))  # fmt: skip
            self._connected_before = True
        elif not self._stopping.is_set():  # a disconnect at stop is no news
            why = self.link.last_error if self.link is not None else ""
            self.notifier.status(f"not connected to {broker}{f' ({why})' if why else ''};"
                                 " reconnecting")  # fmt: skip

    def _on_drop(self) -> None:
        self.last_received = time.time()  # it came, though there was no room for it
        self.metrics.messages.labels("dropped").inc()

    def on_queued(self, received: float) -> None:
        """The link's thread, after queueing a message received at ``received``: score a
        batch here and now if one is due (``batch.max`` queued, or the oldest waited long
        enough)."""
        self.last_received = received
        if self.batcher.due(received):
            self._score_queued(received)

    def _score_queued(self, now: float | None) -> None:
        """Take up to ``batch.max`` queued messages and score them, under the batch lock;
        with ``now``, only if a batch is still due then (another thread may have taken it)."""
        with self._batch_lock:
            if now is not None and not self.batcher.due(now):
                return
            batch = self.batcher.take()
            if not batch:
                return
            try:
                self.process(batch)
            except Exception:  # a bug must not kill the daemon's threads: count and go on
                log.exception("batch of %d messages failed", len(batch))
                self.metrics.messages.labels("dropped").inc(len(batch))
            if self.pool is None and self.link is not None:  # scored: its QoS 1 input done
                self.link.acknowledge(len(batch))

    def process(self, batch: list[Inbound]) -> None:
        """Route, parse, step and publish one micro-batch (the scoring stage's job), or hand
        it to the scoring processes."""
        if self.pool is not None:
            self.pool.dispatch(batch)
        else:
            self.stage.process(batch)

    def _housekeeping(self) -> None:
        m = self.metrics
        m.queue_depth.set(self.batcher.depth())
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
            if self.pool is not None:
                self.pool.control("evict", wall)
                return
            with self._batch_lock:
                self.stage.evict_idle(wall)

    def _reload(self) -> None:
        """Validate every new model file first; swap only if all load (worker thread)."""
        try:
            engines, router = self._load_models()
        except Exception as exc:  # keep serving with the old models
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed, keeping the running model(s): %s", exc)
            self.notifier.ready(f"scoring with the previous model(s): reload failed: {exc}")
            return
        with self._batch_lock:  # no batch is being scored while the state moves over
            if self.pool is not None:  # each loads the files it was checked here they hold
                self.pool.set_router(router)
                self.pool.control("reload")
            take_over(engines, self.engines)
            self._install((engines, router))
            self.stage.gauge_streams()  # some may be gone
        link = self.link
        if link is not None and set(router.filters) != set(link.filters):
            link.set_filters(router.filters)
        self.metrics.reloads.labels("ok").inc()
        names = ", ".join(f"{e.model.name} ({e.model.meta.fingerprint})" for e in engines)
        log.info("models reloaded: %s", names)
        self.notifier.ready(f"scoring: models reloaded: {names}")
