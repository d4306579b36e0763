"""The daemon's parts wired together over an in-memory link: from a received message to a
published alert, the status it says, and a stop that loses nothing. The MQTT link itself is
tested against mosquitto in test_mqtt.py and test_daemon_broker.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import detector.daemon as daemon_module
from detector.daemon import Daemon
from detector.link import LinkHooks, MemoryLink
from detector.notify import Notifier
from tests.support import (
    TINY_FEATURES,
    daemon_config,
    poll_until,
    sample_payload,
    scrape,
    tiny_fleet,
)

T0 = 1_700_000_000.0


@pytest.fixture
def wired(tiny_model: Path) -> Iterator[tuple[Daemon, MemoryLink]]:
    link = MemoryLink("rnnsentry/status/parts")
    config = daemon_config("mqtt://127.0.0.1:1", tiny_model, instance="parts",
                           metrics={"enabled": False}, scoring={"warmup_steps": 20})  # fmt: skip
    daemon = Daemon(config, link=link)
    daemon.start()
    try:
        yield daemon, link
    finally:
        daemon.stop()


def counted(daemon: Daemon, outcome: str) -> float:
    value = daemon.metrics.registry.get_sample_value("rnnsentry_messages_total",
                                                     {"outcome": outcome})  # fmt: skip
    return value or 0.0


def rejected(daemon: Daemon) -> float:
    total = 0.0
    for family in daemon.metrics.registry.collect():
        if family.name == "rnnsentry_rejections":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def test_a_spike_goes_in_as_a_message_and_comes_out_as_an_alert(
    wired: tuple[Daemon, MemoryLink],
) -> None:
    daemon, link = wired
    rows = tiny_fleet(n_streams=1, n_steps=80, seed=5, start_step=600).values[0]
    rows[60] += 40.0 * np.std(rows, axis=0)  # every sensor far off at one sample
    for t, row in enumerate(rows):
        assert link.deliver("sensors/pump-1", sample_payload(TINY_FEATURES, row, T0 + t).encode())
    poll_until(lambda: counted(daemon, "scored") == len(rows))
    alerts = [json.loads(p.payload) for p in link.sent_to("rnnsentry/alerts/")]
    raised = [a for a in alerts if a["event"] == "raised"]
    assert [a["stream"] for a in raised] == ["pump-1"]
    assert raised[0]["ts"] == T0 + 60 and raised[0]["instance"] == "parts"
    assert link.sent_to("rnnsentry/alerts/")[0].qos == 1
    assert daemon.ready() == (True, "ready")


def test_status_says_online_then_offline_retained(tiny_model: Path) -> None:
    link = MemoryLink("rnnsentry/status/parts")
    config = daemon_config("mqtt://127.0.0.1:1", tiny_model, metrics={"enabled": False})
    daemon = Daemon(config, link=link)
    daemon.start()
    assert link.filters == ["sensors/#"]  # what the daemon's router subscribes to
    daemon.stop()
    status = [(p.payload, p.retain) for p in link.sent_to("rnnsentry/status/parts")]
    assert status == [(b"online", True), (b"offline", True)]
    assert not link.deliver("sensors/late", b"{}")  # intake closed: the broker keeps it
    assert daemon.ready()[0] is False


def test_stop_scores_everything_received_before_it(tiny_model: Path) -> None:
    """Messages delivered from another thread right up to stop are all counted: scored or
    rejected, none left in the inbox, none dropped."""
    link = MemoryLink()
    config = daemon_config("mqtt://127.0.0.1:1", tiny_model, metrics={"enabled": False},
                           batch={"max": 64, "max_wait_ms": 50.0})  # fmt: skip
    daemon = Daemon(config, link=link)
    daemon.start()
    rows = tiny_fleet(n_streams=1, n_steps=50, seed=6, start_step=600).values[0]
    delivered = 0

    def feed() -> None:
        nonlocal delivered
        for s in range(40):
            for t, row in enumerate(rows):
                payload = sample_payload(TINY_FEATURES, row, T0 + t).encode()
                if not link.deliver(f"sensors/s{s}", payload):
                    return
                delivered += 1
        link.deliver("sensors/bad", b"not json")
        delivered += 1

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    daemon.stop()
    assert delivered == 40 * len(rows) + 1
    assert daemon.batcher.depth() == 0 and link.dropped == 0
    assert counted(daemon, "scored") + rejected(daemon) == delivered
    assert counted(daemon, "scored") == 40 * len(rows)


def test_a_memory_link_counts_what_a_full_inbox_drops() -> None:
    import queue

    drops: list[int] = []
    link = MemoryLink()
    link.bind(LinkHooks(queue.Queue(maxsize=2), lambda: drops.append(1), lambda up: None))
    link.start()
    assert [link.deliver("t", b"x") for _ in range(3)] == [True, True, False]
    assert link.dropped == 1 and drops == [1]


def test_an_absurd_time_is_refused_and_does_not_silence_its_stream(
    wired: tuple[Daemon, MemoryLink],
) -> None:
    """Five samples, one stamped year 9999, twenty more: the one is bad_timestamp, the
    twenty are scored (it did not become the stream's last time)."""
    daemon, link = wired
    now = time.time()
    rows = tiny_fleet(n_streams=1, n_steps=26, seed=7, start_step=600).values[0]

    def send(row: np.ndarray, ts: object) -> None:
        doc = {"ts": ts, "values": dict(zip(TINY_FEATURES, map(float, row), strict=True))}
        assert link.deliver("sensors/pump-1", json.dumps(doc).encode(), received=now)

    for t in range(5):
        send(rows[t], now - 100 + t)
    send(rows[5], "9999-12-31T23:59:59Z")
    for t in range(6, 26):
        send(rows[t], now - 100 + t)
    for absurd in (-1e9, 0, 1e10, 1e297, "0001-01-01T00:00:00Z", now + 3600):
        send(rows[0], absurd)
    send(rows[0], now + 60)  # a clock a minute fast: accepted
    poll_until(lambda: counted(daemon, "scored") == 26)

    def reason(name: str) -> float:
        return daemon.metrics.value("rnnsentry_rejections_total", {"reason": name}) or 0.0

    poll_until(lambda: reason("bad_timestamp") == 7)
    assert reason("out_of_order") == 0


def test_a_stream_whose_alerts_could_not_be_sent_is_refused_alone(
    wired: tuple[Daemon, MemoryLink],
) -> None:
    """A stream id so long that its alert topic would pass MQTT's 65,535 bytes is refused
    under its own reason; the other streams of the same batch are scored and alert."""
    daemon, link = wired
    now = time.time()
    rows = tiny_fleet(n_streams=1, n_steps=40, seed=8, start_step=600).values[0]
    rows[30] += 40.0 * np.std(rows, axis=0)
    huge = "sensors/" + "x" * 65_520  # a topic the broker takes; its alert topic is too long
    for t, row in enumerate(rows):
        payload = sample_payload(TINY_FEATURES, row, now - 100 + t).encode()
        link.deliver(huge, payload, received=now)
        link.deliver("sensors/neighbour", payload, received=now)
    poll_until(lambda: counted(daemon, "scored") == 40)
    assert daemon.metrics.value("rnnsentry_rejections_total", {"reason": "unpublishable"}) == 40
    assert counted(daemon, "dropped") == 0
    raised = [json.loads(p.payload) for p in link.sent_to("rnnsentry/alerts/")]
    assert [a["stream"] for a in raised if a["event"] == "raised"] == ["neighbour"]


def test_a_reload_that_drops_every_stream_says_so_in_streams_active(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A new model of another state shape starts every stream afresh: the gauge follows."""
    import shutil

    from tests.support import train_tiny_model

    path = tmp_path / "model.onnx"
    shutil.copy(tiny_model, path)
    link = MemoryLink()
    config = daemon_config("mqtt://127.0.0.1:1", path, metrics={"enabled": False})
    daemon = Daemon(config, link=link)
    daemon.start()
    try:
        rows = tiny_fleet(n_streams=3, n_steps=2, seed=9, start_step=600).values
        for s in range(3):
            link.deliver(f"sensors/p{s}", sample_payload(TINY_FEATURES, rows[s, 0], T0).encode())
        poll_until(lambda: daemon.metrics.value("rnnsentry_streams_active") == 3)
        train_tiny_model(tmp_path / "wider.onnx", cell="gru", hidden=12, epochs=1)
        shutil.copy(tmp_path / "wider.onnx", path)
        daemon.request_reload()
        poll_until(lambda: daemon.metrics.value("rnnsentry_reloads_total",
                                                {"result": "ok"}) == 1)  # fmt: skip
        assert daemon.metrics.value("rnnsentry_streams_active") == 0
    finally:
        daemon.stop()


@pytest.mark.integration
def test_a_stalled_scoring_loop_fails_healthz_and_starves_the_watchdog(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch lock held, as a hung onnxruntime call would hold it: once a batch is due the
    worker's loop stops, /healthz answers 503 past the stall limit and no WATCHDOG=1 goes
    out (systemd would restart the daemon); released, both come back and the batch is
    scored."""
    monkeypatch.setattr(daemon_module, "LOOP_STALL_S", 0.5)
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a stand-in for systemd's
    manager.bind(str(tmp_path / "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    link = MemoryLink()
    daemon = Daemon(daemon_config("mqtt://127.0.0.1:1", tiny_model), link=link, notifier=notifier)
    daemon.start()
    try:
        assert daemon.server is not None
        port = daemon.server.port
        assert scrape(port, "/healthz") == (200, "ok\n")
        row = tiny_fleet(n_streams=1, n_steps=2, seed=4, start_step=600).values[0, 0]
        with daemon._batch_lock:
            link.deliver("sensors/p1", sample_payload(TINY_FEATURES, row, T0).encode())
            status, body = poll_until(lambda: (r := scrape(port, "/healthz"))[0] == 503 and r)
            assert "the scoring loop has not come round" in body
            manager.setblocking(False)
            while True:  # what the loop sent before it stalled
                try:
                    manager.recv(4096)
                except BlockingIOError:
                    break
            manager.settimeout(1.0)  # five watchdog intervals
            with pytest.raises(TimeoutError):
                manager.recv(4096)
        assert manager.recv(4096) == b"WATCHDOG=1"
        poll_until(lambda: scrape(port, "/healthz")[0] == 200)
        poll_until(lambda: counted(daemon, "scored") == 1)
    finally:
        daemon.stop()
        notifier.close()
        manager.close()
