"""Scoring in worker processes (``[daemon] workers``): the hand-over, the partitioning, a
worker that dies, a drain on stop, snapshots across process counts and the merged metrics.
The daemon runs in this process over an in-memory link; its workers are real processes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.daemon import Daemon
from detector.link import MemoryLink
from detector.pool import partition_of
from tests.support import (
    TINY_FEATURES,
    daemon_config,
    metric_value,
    poll_until,
    sample_payload,
    scrape,
    tiny_fleet,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


def pooled(model: Path, workers: int, **sections: dict[str, Any]) -> tuple[Daemon, MemoryLink]:
    link = MemoryLink()
    sections.setdefault("metrics", {"enabled": False})
    config = daemon_config("mqtt://127.0.0.1:1", model, daemon={"workers": workers},
                           scoring={"warmup_steps": 20}, **sections)  # fmt: skip
    daemon = Daemon(config, link=link)
    daemon.start()
    return daemon, link


@pytest.fixture
def stop_after() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def feed(link: MemoryLink, streams: int, steps: int, seed: int = 5) -> np.ndarray:
    """``steps`` samples of each of ``streams`` pumps, interleaved as a fleet sends them."""
    rows = tiny_fleet(n_streams=streams, n_steps=steps, seed=seed, start_step=600).values
    for t in range(steps):
        for s in range(streams):
            payload = sample_payload(TINY_FEATURES, rows[s, t], T0 + t).encode()
            assert link.deliver(f"sensors/pump-{s}", payload)
    return rows


def scored(daemon: Daemon) -> float:
    return daemon.metrics.value("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0


def test_partitions_are_stable_and_spread_streams() -> None:
    owners = Counter(partition_of(f"pump-{i}", 4) for i in range(4000))
    assert sorted(owners) == [0, 1, 2, 3] and min(owners.values()) > 800
    assert partition_of("pump-1", 4) == partition_of("pump-1", 4)


def test_each_stream_is_scored_in_order_by_one_worker_and_its_alert_published(
    tiny_model: Path, stop_after: list[Daemon]
) -> None:
    daemon, link = pooled(tiny_model, 2, mqtt={"publish_scores": True})
    stop_after.append(daemon)
    rows = tiny_fleet(n_streams=6, n_steps=60, seed=5, start_step=600).values
    rows[3, 45] += 40.0 * np.std(rows[3], axis=0)
    for t in range(60):
        for s in range(6):
            payload = sample_payload(TINY_FEATURES, rows[s, t], T0 + t).encode()
            assert link.deliver(f"sensors/pump-{s}", payload)
    poll_until(lambda: scored(daemon) == 6 * 60)
    by_stream: dict[str, list[float]] = {}
    for p in link.sent_to("rnnsentry/scores/"):
        doc = json.loads(p.payload)
        by_stream.setdefault(doc["stream"], []).append(doc["ts"])
    assert sorted(by_stream) == [f"pump-{s}" for s in range(6)]
    for stamps in by_stream.values():
        assert stamps == [T0 + t for t in range(60)]  # every sample, in order
    owners = {partition_of(f"pump-{s}", 2) for s in range(6)}
    assert owners == {0, 1}  # both workers had streams
    alerts = [json.loads(p.payload) for p in link.sent_to("rnnsentry/alerts/")]
    assert [(a["stream"], a["ts"]) for a in alerts if a["event"] == "raised"] == [
        ("pump-3", T0 + 45)
    ]
    assert daemon.metrics.value("rnnsentry_rejections_total", {"reason": "out_of_order"}) == 0


def test_stop_scores_everything_handed_over(tiny_model: Path) -> None:
    daemon, link = pooled(tiny_model, 2, batch={"max": 256, "max_wait_ms": 20.0})
    feed(link, streams=50, steps=40)
    link.deliver("sensors/bad", b"not json")
    link.deliver("elsewhere/x", b"{}")
    daemon.stop()  # at once: much is still in the pipes
    assert scored(daemon) == 50 * 40
    assert daemon.metrics.value("rnnsentry_messages_total", {"outcome": "rejected"}) == 2
    assert daemon.metrics.value("rnnsentry_messages_total", {"outcome": "dropped"}) == 0
    assert link.sent_to("rnnsentry/status")[-1].payload == b"offline"


def test_qos1_input_waits_to_be_scored_and_qos0_input_does_not(
    tiny_model: Path, stop_after: list[Daemon]
) -> None:
    """With the scoring processes paused, QoS 0 input is counted done once handed on (a
    crash loses it either way, and nothing waits for a word from the workers); QoS 1 input
    is acknowledged only once scored, and holds back what comes after it."""
    daemon, link = pooled(tiny_model, 2, batch={"max_wait_ms": 1.0})
    stop_after.append(daemon)
    assert daemon.pool is not None
    workers = [p.pid for p in daemon.pool._processes]
    rows = tiny_fleet(n_streams=2, n_steps=30, seed=5, start_step=600).values

    def send(t: int, qos: int) -> None:
        for s in range(2):
            payload = sample_payload(TINY_FEATURES, rows[s, t], T0 + t).encode()
            assert link.deliver(f"sensors/pump-{s}", payload, qos=qos)

    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        for t in range(10):
            send(t, qos=0)
        poll_until(lambda: link.acknowledged == 20)
        assert scored(daemon) == 0 and not link.awaiting()
        send(10, qos=1)
        for t in range(11, 20):
            send(t, qos=0)
        time.sleep(0.3)  # 300 batch waits: the batches are handed on long before
        assert link.acknowledged == 20 and link.awaiting()  # held: a QoS 1 sample is unscored
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    poll_until(lambda: scored(daemon) == 40 and link.acknowledged == 40)
    assert not link.awaiting()
    for t in range(20, 30):
        send(t, qos=0)
    poll_until(lambda: scored(daemon) == 60 and link.acknowledged == 60)


def test_a_worker_that_dies_fails_the_daemon(tiny_model: Path, stop_after: list[Daemon]) -> None:
    daemon, link = pooled(tiny_model, 2)
    stop_after.append(daemon)
    assert daemon.ready()[0] and not daemon.failed.is_set()
    assert daemon.pool is not None
    victim = daemon.pool._processes[1].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert daemon.failed.wait(10.0)
    assert "worker 1 ended unexpectedly" in daemon.failure
    assert daemon.ready() == (False, daemon.failure)


def test_a_snapshot_carries_streams_across_process_counts(tiny_model: Path, tmp_path: Path) -> None:
    snapshot = {"path": str(tmp_path / "state.npz"), "interval_s": 0}
    daemon, link = pooled(tiny_model, 3, snapshot=snapshot)
    feed(link, streams=12, steps=30)
    daemon.stop()
    assert scored(daemon) == 12 * 30

    alone, _ = pooled(tiny_model, 0, snapshot=snapshot)  # scoring in the reading process
    try:
        assert sorted(alone.engines[0].table.streams()) == sorted(f"pump-{s}" for s in range(12))
    finally:
        alone.stop()

    again, link = pooled(tiny_model, 2, snapshot=snapshot)
    try:
        assert again.metrics.value("rnnsentry_streams_active") == 12
        rows = tiny_fleet(n_streams=1, n_steps=31, seed=5, start_step=600).values[0]
        late = sample_payload(TINY_FEATURES, rows[29], T0 + 29).encode()
        link.deliver("sensors/pump-0", late)  # already scored before the restart
        poll_until(lambda: again.metrics.value("rnnsentry_rejections_total",
                                               {"reason": "duplicate"}) == 1)  # fmt: skip
    finally:
        again.stop()


def test_metrics_of_every_process_are_served_as_one(
    tiny_model: Path, stop_after: list[Daemon]
) -> None:
    daemon, link = pooled(tiny_model, 2, metrics={"enabled": True, "host": "127.0.0.1",
                                                  "port": 0})  # fmt: skip
    stop_after.append(daemon)
    feed(link, streams=8, steps=25)
    assert daemon.server is not None

    def served() -> float | None:
        _, body = scrape(daemon.server.port)  # type: ignore[union-attr]
        return metric_value(body, "rnnsentry_messages_total", {"outcome": "scored"})

    poll_until(lambda: served() == 8 * 25)
    _, body = scrape(daemon.server.port)
    assert metric_value(body, "rnnsentry_streams_active") == 8
    assert metric_value(body, "rnnsentry_decision_latency_seconds_count") == 8 * 25


def test_workers_leave_termination_and_reload_signals_to_the_reading_process(
    tiny_model: Path, stop_after: list[Daemon]
) -> None:
    """A service manager may signal the whole group; only the reading process acts."""
    daemon, link = pooled(tiny_model, 1)
    stop_after.append(daemon)
    assert daemon.pool is not None
    pid = daemon.pool._processes[0].pid
    assert pid is not None
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(pid, sig)
    feed(link, streams=2, steps=10)
    poll_until(lambda: scored(daemon) == 20)
    assert daemon.pool.alive() and not daemon.failed.is_set()


def test_the_reading_process_refuses_what_no_worker_could_publish(
    tiny_model: Path, stop_after: list[Daemon]
) -> None:
    daemon, link = pooled(tiny_model, 2)
    stop_after.append(daemon)
    rows = tiny_fleet(n_streams=1, n_steps=5, seed=5, start_step=600).values[0]
    for t, row in enumerate(rows):
        payload = sample_payload(TINY_FEATURES, row, T0 + t).encode()
        link.deliver("sensors/" + "y" * 65_520, payload)
        link.deliver("nowhere/at-all", payload)
        link.deliver("sensors/fine", payload)
    poll_until(lambda: scored(daemon) == 5)
    assert daemon.metrics.value("rnnsentry_rejections_total", {"reason": "unpublishable"}) == 5
    assert daemon.metrics.value("rnnsentry_rejections_total", {"reason": "unknown_route"}) == 5
