"""The daemon in-process against a real mosquitto: scoring, alerts, rejections, health."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from detector.daemon import Daemon
from tests.support import (
    MESSAGE_TIMEOUT_S,
    TINY_FEATURES,
    InProcessDaemons,
    Listener,
    Publisher,
    daemon_config,
    metric_value,
    poll_until,
    sample_payload,
    scrape,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto, free_port

pytestmark = pytest.mark.integration

WARMUP = {"warmup_steps": 20}  # [scoring] of this file's daemons: alerts after 20 samples


@pytest.fixture
def running(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> Iterator[tuple[Daemon, Listener, Publisher]]:
    listener = Listener(mosquitto.port, ["rnnsentry/#"])
    try:
        config = daemon_config(mosquitto.url, tiny_model, instance="it",
                               metrics={"port": free_port()}, scoring=WARMUP)  # fmt: skip
        daemon = start_daemon(config, ready_within=MESSAGE_TIMEOUT_S)
        publisher = Publisher(mosquitto.port)
        try:
            yield daemon, listener, publisher
        finally:
            publisher.close()
            start_daemon.stop(daemon)
    finally:
        listener.close()


def _metrics(daemon: Daemon) -> str:
    assert daemon.server is not None
    status, body = scrape(daemon.server.port)
    assert status == 200
    return body


def test_status_online_is_retained_and_offline_on_stop(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    config = daemon_config(mosquitto.url, tiny_model, instance="it",
                           metrics={"port": free_port()}, scoring=WARMUP)  # fmt: skip
    daemon = start_daemon(config, ready_within=MESSAGE_TIMEOUT_S)
    late = Listener(mosquitto.port, ["rnnsentry/status/#"])  # subscribes after the fact
    topic, payload, retained = late.messages.get(timeout=10)
    assert (topic, payload, retained) == ("rnnsentry/status/it", b"online", True)
    start_daemon.stop(daemon)
    topic, payload, _ = late.messages.get(timeout=10)
    assert (topic, payload) == ("rnnsentry/status/it", b"offline")
    late.close()


def test_a_spike_raises_an_alert_with_its_payload(
    running: tuple[Daemon, Listener, Publisher],
) -> None:
    daemon, listener, publisher = running
    fleet = tiny_fleet(n_streams=1, n_steps=200, seed=7, start_step=600)
    values = fleet.values[0].copy()
    values[90, 1] += 40.0 * values[:80, 1].std()  # a pressure spike far outside normal
    for t, row in enumerate(values[:100]):
        publisher.send("sensors/pump-1", sample_payload(TINY_FEATURES, row, 1000.0 + t), qos=0)
    alert = listener.json_on("rnnsentry/alerts/pump-1", lambda d: d["event"] == "raised")
    assert alert["stream"] == "pump-1"
    assert alert["ts"] in (1090.0, 1091.0)  # the spike, or the step after (short average)
    assert alert["likelihood"] >= alert["threshold"]
    top = alert["top_features"]
    assert top[0]["feature"] == "pressure"
    # Shares of the alert's average: the spiking sensor's is most of it, largest first.
    shares = [f["share"] for f in top]
    assert shares == sorted(shares, reverse=True) and 0.5 < shares[0] <= 1.0
    assert sum(shares) <= 1.0 + 1e-3
    assert alert["fingerprint"] == daemon.engines[0].model.meta.fingerprint
    assert alert["alert_id"] == f"pump-1@{alert['ts']!r}"  # the raise's own sample time

    def scored() -> float | None:
        value = metric_value(_metrics(daemon), "rnnsentry_messages_total", {"outcome": "scored"})
        return value if value == 100 else None

    assert poll_until(scored) == 100
    body = _metrics(daemon)
    assert metric_value(body, "rnnsentry_alerts_total", {"event": "raised"}) == 1

    # Back to normal: the same episode clears (hysteresis: clear_steps calm samples) once
    # the short average has let go of the spike.
    for t, row in enumerate(values[100:200], start=100):
        publisher.send("sensors/pump-1", sample_payload(TINY_FEATURES, row, 1000.0 + t), qos=0)
    cleared = listener.json_on("rnnsentry/alerts/pump-1", lambda d: d["event"] == "cleared")
    assert cleared["alert_id"] == alert["alert_id"] and cleared["episode"] == 1
    assert cleared["ts"] > alert["ts"]
    assert cleared["likelihood"] < daemon.config.scoring.clear_threshold
    assert metric_value(body, "rnnsentry_streams_active") == 1
    assert metric_value(body, "rnnsentry_mqtt_connected") == 1


def test_bad_messages_are_counted_by_reason_and_good_ones_still_scored(
    running: tuple[Daemon, Listener, Publisher],
) -> None:
    daemon, _, publisher = running
    publisher.send("sensors/a", b"\xff\xfe not json")
    publisher.send("sensors/a", b'{"ts": 1, "values": [1, 2]}')  # wrong length
    publisher.send("sensors/a", b'{"ts": 1, "values": [NaN, 1, 2, 3]}')
    publisher.send("sensors/a", b'{"ts": "yesterday", "values": [0, 1, 2, 3]}')
    publisher.send("sensors/a", json.dumps({"ts": 5, "values": [0, 1, 2, 3]}))
    publisher.send("sensors/a", json.dumps({"ts": 4, "values": [0, 1, 2, 3]}))  # older
    publisher.send("sensors/a", json.dumps({"ts": 5, "values": [0, 1, 2, 3]}))  # same ts

    expected = {"decode": 1, "schema": 1, "non_finite": 1, "bad_timestamp": 1,
                "out_of_order": 1, "duplicate": 1}  # fmt: skip

    def counted() -> dict[str, float | None] | None:
        body = _metrics(daemon)
        got = {r: metric_value(body, "rnnsentry_rejections_total", {"reason": r}) for r in expected}
        return got if got == expected else None

    poll_until(counted)
    body = _metrics(daemon)
    assert metric_value(body, "rnnsentry_messages_total", {"outcome": "scored"}) == 1
    assert metric_value(body, "rnnsentry_messages_total", {"outcome": "rejected"}) == 6


def test_readyz_turns_unready_when_the_broker_goes_away(
    running: tuple[Daemon, Listener, Publisher], mosquitto: Mosquitto
) -> None:
    daemon, _, _ = running
    assert daemon.server is not None
    port = daemon.server.port
    assert scrape(port, "/healthz")[0] == 200
    assert scrape(port, "/readyz")[0] == 200
    mosquitto.stop()
    poll_until(lambda: scrape(port, "/readyz")[0] == 503)
    assert "broker" in scrape(port, "/readyz")[1]
    assert scrape(port, "/healthz")[0] == 200
    mosquitto.start()
    poll_until(lambda: scrape(port, "/readyz")[0] == 200, timeout=30)


def test_batch_payload_scores_every_sample(
    running: tuple[Daemon, Listener, Publisher],
) -> None:
    daemon, _, publisher = running
    rows = np.random.default_rng(3).normal(size=(50, len(TINY_FEATURES)))
    batch = [{"ts": 100.0 + i, "values": list(map(float, r))} for i, r in enumerate(rows)]
    publisher.send("sensors/batchy", batch)
    poll_until(
        lambda: (
            metric_value(_metrics(daemon), "rnnsentry_messages_total", {"outcome": "scored"}) == 50
        )
    )


def test_a_full_table_evicts_the_least_recently_seen_and_a_gap_resets_state(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    config = daemon_config(mosquitto.url, tiny_model, instance="it",
                           metrics={"port": free_port()}, scoring=WARMUP, batch={"max": 2},
                           streams={"max_streams": 2, "max_gap_s": 5.0})  # fmt: skip
    daemon = start_daemon(config, ready_within=MESSAGE_TIMEOUT_S)
    publisher = Publisher(mosquitto.port)
    try:
        rows = tiny_fleet(n_streams=1, n_steps=20, seed=2).values[0]
        send = lambda s, t: publisher.send(  # noqa: E731
            f"sensors/{s}", sample_payload(TINY_FEATURES, rows[t % 20], 100.0 + t)
        )
        for t in range(3):
            send("a", t)
        send("b", 0)
        send("c", 0)  # the table holds two streams: "a", seen longest ago, goes
        poll_until(lambda: metric_value(_metrics(daemon), "rnnsentry_evictions_total") == 1)
        body = _metrics(daemon)
        assert metric_value(body, "rnnsentry_streams_active") == 2
        assert "a" not in daemon.engines[0].table and "c" in daemon.engines[0].table

        send("b", 1)
        send("b", 30)  # 29 s after the last sample: more than max_gap_s
        poll_until(lambda: metric_value(_metrics(daemon), "rnnsentry_gap_resets_total") == 1)
        assert metric_value(_metrics(daemon), "rnnsentry_messages_total",
                            {"outcome": "scored"}) == 7  # fmt: skip
    finally:
        publisher.close()
