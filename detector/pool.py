"""Scoring in worker processes: the reading process hands raw messages over, partitioned.

With ``[daemon] workers`` above 0, the process that reads the broker does not decode a
payload. It routes each topic (memoised) to its stream and hands the raw message to the
scoring process that owns the stream, ``crc32(stream) % workers``: a stream's samples all
go to one process, in arrival order, one chunk a batch per process through a pipe. Each
worker runs the scoring stage (:class:`~detector.stage.ScoringStage`) over its streams and
sends back what to publish and its metrics; the reading process publishes every alert
through its one broker connection and serves the metrics of all (:meth:`Metrics.merge`).

A worker that dies is seen by the thread that reads its pipe, and the pool says so
(``failure``); the daemon then stops and exits with an error, so that systemd or
Kubernetes restarts it. Workers ignore SIGINT, SIGTERM and SIGHUP (a service manager may
signal the whole group) and stop or reload when the reading process tells them to, stopping
after scoring everything handed to them; a worker whose reading process is gone finds its
pipe closed and ends.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

from detector.config import Config
from detector.engine import take_over
from detector.journal import AlertJournal, apply_journal, journal_path, read_journals
from detector.link import Inbound, Link
from detector.logs import configure
from detector.metrics import Metrics, RemoteSamples, remote_samples
from detector.publisher import Publisher
from detector.routing import Router
from detector.snapshot import capture, load_snapshot
from detector.stage import REFUSED, Routes, ScoringStage, load_engines

log = logging.getLogger(__name__)

_METRICS_EVERY_S: Final = 0.25  # a worker reports its metrics at most this often
_START_TIMEOUT_S: Final = 120.0  # loading models in a fresh interpreter
_STOP_TIMEOUT_S: Final = 60.0


def partition_of(stream: str, workers: int) -> int:
    """The worker that owns ``stream``: the same for the same stream and count, on every
    host and run (CRC-32, not Python's salted ``hash``).

    >>> partition_of("pump-7", 4), partition_of("pump-7", 4) == partition_of("pump-7", 4)
    (3, True)
    """
    return zlib.crc32(stream.encode("utf-8", "surrogatepass")) % workers


class _Outbox:
    """A worker's link: what the stage publishes waits here for the next reply."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        self.items.append((topic, payload, qos, retain))
        return True

    def take(self) -> list[tuple[str, bytes, int, bool]]:
        items, self.items = self.items, []
        return items


def _worker_main(index: int, workers: int, config: Config, inbox: Connection,
                 replies: Connection) -> None:  # fmt: skip
    """A scoring process: messages in, publications and metrics out, until told to stop."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # the reading process acts on them
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    configure(config.daemon.log_level, config.daemon.log_format, worker=index)
    metrics = Metrics()
    outbox = _Outbox()
    publisher = Publisher(config, metrics)
    publisher.link = outbox  # type: ignore[assignment]
    stage = ScoringStage(config, metrics, publisher)
    stage.install(*load_engines(config))
    if config.snapshot.path:

        def keep(stream: str) -> bool:
            return partition_of(stream, workers) == index

        mine = load_snapshot(config.snapshot.path, stage.engines, keep=keep)
        log.debug("restored %s", mine)
        apply_journal(read_journals(config.snapshot.path), stage.engines, time.time(), keep)
        publisher.journal = AlertJournal(journal_path(config.snapshot.path, index),
                                         metrics.snapshot_failures.inc)  # fmt: skip
    stage.gauge_streams()
    replies.send(("metrics", remote_samples(metrics)))  # the streams it restored, then:
    replies.send(("ready", os.getpid()))
    last_report, dirty = 0.0, False
    while True:
        try:
            if dirty and not inbox.poll(_METRICS_EVERY_S):  # idle: report what it did
                last_report, dirty = time.monotonic(), False
                replies.send(("metrics", remote_samples(metrics)))
            message = inbox.recv()
        except EOFError:  # the reading process is gone: nobody to reply to
            return
        stop = False
        chunk = isinstance(message[0], int)  # (batch number, messages); else a control
        if chunk:
            try:
                stage.process(message[1])
            except Exception:  # a bug must not end the worker: count and go on
                log.exception("batch of %d messages failed", len(message[1]))
                metrics.messages.labels("dropped").inc(len(message[1]))
            # What to publish, then that the chunk is done: its input may be acknowledged
            # (batch number 0: nothing waits for it).
            if message[0]:
                replies.send(("done", (message[0], outbox.take())))
            elif outbox.items:
                replies.send(("publish", outbox.take()))
        else:
            stop = _control(message, stage, metrics, replies, publisher.journal)
            if outbox.items:
                replies.send(("publish", outbox.take()))
        dirty = True
        now = time.monotonic()
        if stop or not chunk or now - last_report >= _METRICS_EVERY_S:
            last_report, dirty = now, False
            replies.send(("metrics", remote_samples(metrics)))
        if stop:
            if publisher.journal is not None:
                publisher.journal.close()
            replies.send(("stopped", None))
            return


def _control(message: tuple[Any, ...], stage: ScoringStage, metrics: Metrics,
             replies: Connection, journal: AlertJournal | None) -> bool:  # fmt: skip
    """One control message; True: stop."""
    kind = message[0]
    if kind == "evict":
        stage.evict_idle(message[1])
    elif kind == "reload":
        try:  # the reading process checked the files; one may have changed since
            engines, router = load_engines(stage.config)
        except Exception as exc:
            log.error("reload failed here, keeping the running model(s): %s", exc)
            return False
        take_over(engines, stage.engines)
        stage.install(engines, router)
    elif kind == "capture":
        if journal is not None:
            journal.mark()
        replies.send(("capture", capture(stage.engines)))
    elif kind == "compact":  # the snapshot of the last capture is written
        if journal is not None:
            journal.compact()
    elif kind == "stop":
        return True
    stage.gauge_streams()
    return False


class WorkerPool:
    """The reading process's side: spawns the workers, hands them messages, publishes what
    they send back and merges their metrics into ``metrics``."""

    def __init__(self, config: Config, metrics: Metrics, workers: int) -> None:
        self.config = config
        self.metrics = metrics
        self.workers = workers
        self.link: Link | None = None
        self.failure = ""  # why the pool stopped working ("" while it works)
        self.on_failure: Callable[[str], None] = lambda why: None
        self._routes = self._routes_of(Router([]))
        self._processes: list[Any] = []
        self._inboxes: list[Connection] = []
        self._readers: list[threading.Thread] = []
        self._send_lock = threading.Lock()  # dispatch and control messages, in order
        self._stopping = False
        self._stopped = [threading.Event() for _ in range(workers)]
        self._ready = [threading.Event() for _ in range(workers)]
        self._captures: list[Any] = [None] * workers
        self._captured = [threading.Event() for _ in range(workers)]
        # Batches handed over and not yet scored by every worker they went to, in order:
        # [messages, workers still scoring]; the link acknowledges a done prefix.
        self._batches: deque[list[int]] = deque()
        self._by_number: dict[int, list[int]] = {}
        self._number = 0
        self._done_lock = threading.Lock()

    def start(self, router: Router) -> None:
        """Spawn the workers and wait until each has loaded its models and state."""
        self._routes = self._routes_of(router)
        ctx = mp.get_context("spawn")  # no fork of a process with threads and sessions
        for i in range(self.workers):
            theirs, ours = ctx.Pipe(duplex=False)
            replies, their_replies = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_worker_main, args=(i, self.workers, self.config, theirs, their_replies),
                name=f"rnnsentry-worker-{i}", daemon=True,
            )  # fmt: skip
            process.start()
            theirs.close()
            their_replies.close()
            self._processes.append(process)
            self._inboxes.append(ours)
            reader = threading.Thread(target=self._read, args=(i, replies),
                                      name=f"worker-{i}-replies", daemon=True)  # fmt: skip
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + _START_TIMEOUT_S
        for i, ready in enumerate(self._ready):
            while not ready.wait(0.1):
                if self.failure or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(self.failure or f"worker {i} did not start in time")

    def set_router(self, router: Router) -> None:
        with self._send_lock:
            self._routes = self._routes_of(router)

    def _routes_of(self, router: Router) -> Routes:
        n = self.workers
        return Routes(router, self.config.mqtt, lambda stream: partition_of(stream, n))

    def dispatch(self, batch: list[Inbound]) -> None:
        """Hand each message to the worker that owns its stream: one send per worker."""
        routes, resolve, shards = self._routes.memo, self._routes.resolve, self._routes.shards
        chunks: list[list[Inbound]] = [[] for _ in range(self.workers)]
        refused: dict[int, int] = {}
        for message in batch:
            topic = message[0]
            target = (routes.get(topic) or resolve(topic))[0]
            if target < 0:
                refused[target] = refused.get(target, 0) + 1
                continue
            chunks[shards[topic]].append(message)
        for target, count in refused.items():
            self.metrics.reject(REFUSED[target], count)
        link = self.link
        # Only input the broker waits for (QoS 1) needs its batch scored before it is
        # acknowledged; a batch of none is done once handed on, and its workers send no
        # word of it: a reply a batch would wake the reading process's threads for each.
        wait = link is not None and link.awaiting()
        with self._send_lock:
            number = 0
            if wait:
                self._number += 1
                number = self._number
            entry = [len(batch), sum(1 for chunk in chunks if chunk) if wait else 0]
            with self._done_lock:
                self._batches.append(entry)
                if wait:
                    self._by_number[number] = entry
            for inbox, chunk in zip(self._inboxes, chunks, strict=True):
                if chunk:
                    self._send(inbox, (number, chunk))
        if not entry[1]:  # nothing to wait for, or every message refused here: done already
            self._settle()

    def _done(self, number: int) -> None:
        """A worker has scored its chunk of batch ``number``."""
        with self._done_lock:
            entry = self._by_number[number]
            entry[1] -= 1
            if not entry[1]:
                del self._by_number[number]
        self._settle()

    def _settle(self) -> None:
        """Acknowledge the input of the batches done, oldest first, up to one still open;
        under the lock, so that two reply threads acknowledge in arrival order."""
        with self._done_lock:
            count = 0
            while self._batches and not self._batches[0][1]:
                count += self._batches.popleft()[0]
            link = self.link
            if count and link is not None:
                link.acknowledge(count)

    def _send(self, inbox: Connection, message: Any) -> None:
        try:
            inbox.send(message)
        except OSError as exc:  # the worker is gone; its reader says so
            if not self.failure:
                log.debug("send to a worker failed: %s", exc)

    def control(self, *message: Any) -> None:
        """A control message to every worker, after what was handed to them before."""
        with self._send_lock:
            for inbox in self._inboxes:
                self._send(inbox, message)

    def capture(self, timeout_s: float = _STOP_TIMEOUT_S) -> list[Any] | None:
        """Every worker's stream state (``snapshot.capture``), or None if one did not
        answer in time."""
        for event in self._captured:
            event.clear()
        self.control("capture")
        deadline = time.monotonic() + timeout_s
        for event in self._captured:
            if not event.wait(max(0.0, deadline - time.monotonic())):
                return None
        return list(self._captures)

    def stop(self) -> None:
        """Tell every worker to finish what it holds and stop; wait for them."""
        self._stopping = True
        self.control("stop")
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for i, process in enumerate(self._processes):
            while not self._stopped[i].wait(0.05) and process.is_alive():
                if time.monotonic() > deadline:
                    break
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %d did not stop in time; ending it", i)
                process.kill()
        for reader in self._readers:
            reader.join(timeout=5)
        for inbox in self._inboxes:
            inbox.close()

    def alive(self) -> bool:
        return not self.failure and all(p.is_alive() for p in self._processes)

    def _read(self, index: int, replies: Connection) -> None:
        """Reply thread of one worker: publish, merge metrics, note state and the end."""
        while True:
            try:
                kind, body = replies.recv()
            except (EOFError, OSError):
                break
            if kind == "done":  # a chunk scored: what it publishes, then its acknowledgement
                number, items = body
                self._publish(items)
                self._done(number)
            elif kind == "publish":
                self._publish(body)
            elif kind == "metrics":
                self.metrics.merge(f"worker-{index}", body)
            elif kind == "capture":
                self._captures[index] = body
                self._captured[index].set()
            elif kind == "ready":
                self._ready[index].set()
            elif kind == "stopped":
                self._stopped[index].set()
        replies.close()
        if not self._stopped[index].is_set():
            code = self._processes[index].exitcode if index < len(self._processes) else None
            self._fail(f"scoring worker {index} ended unexpectedly (exit code {code})")

    def _publish(self, items: list[tuple[str, bytes, int, bool]]) -> None:
        link = self.link
        for topic, payload, qos, retain in items:
            if link is None or not link.publish(topic, payload, qos=qos, retain=retain):
                self.metrics.publish_failures.inc()

    def _fail(self, why: str) -> None:
        if self.failure:
            return
        self.failure = why
        log.error("%s", why)
        self.on_failure(why)


__all__ = ["RemoteSamples", "WorkerPool", "partition_of"]
