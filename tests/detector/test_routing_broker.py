"""Routing and payloads over a real mosquitto: two models by template, every payload form,
and a full input queue that drops and counts instead of blocking paho's thread."""

from __future__ import annotations

import json
import logging
import queue
import time
from pathlib import Path
from typing import Any

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
    readyz,
    sample_payload,
    scrape,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.integration

FLOOD_MESSAGES = 3000
SHARED_SAMPLES = 600  # two daemons: 300 each, a window of 200 intervals in each
FLOOD_TIMEOUT_S = 60.0  # a loaded 2-core machine scores a few thousand messages a second
WARMUP = {"warmup_steps": 20}  # [scoring] of this file's daemons: alerts after 20 samples


@pytest.fixture(scope="module")
def lstm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model (LSTM, same features as ``tiny_model``) for a second route."""
    from tests.support import train_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-lstm.onnx"
    train_tiny_model(out, cell="lstm")
    return out


@pytest.fixture(scope="module")
def one_feature_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of one feature, ``value``, so a bare number is a valid payload."""
    from tests.support import train_tiny_model

    out = tmp_path_factory.mktemp("models") / "one-feature.onnx"
    train_tiny_model(out, cell="gru", hidden=4, epochs=2, one_feature=True)
    return out


def _metric(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    assert daemon.server is not None
    status, body = scrape(daemon.server.port)
    assert status == 200
    value = metric_value(body, name, labels)
    assert value is not None, f"{name}{labels or ''} is not exposed"
    return value


def _outcomes(daemon: Daemon) -> dict[str, float]:
    return {o: _metric(daemon, "rnnsentry_messages_total", {"outcome": o})
            for o in ("scored", "rejected", "dropped")}  # fmt: skip


def _wait_outcomes(daemon: Daemon, expected: dict[str, float]) -> None:
    last: dict[str, float] = {}

    def check() -> bool:
        nonlocal last
        last = _outcomes(daemon)
        return last == expected

    try:
        poll_until(check)
    except AssertionError:
        raise AssertionError(f"message outcomes {last}, expected {expected}") from None


def _docs_by_stream(q: queue.Queue[tuple[str, bytes, bool]], prefix: str,
                    wanted: dict[str, int]) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """JSON documents on ``prefix + stream`` until each stream has its ``wanted`` count."""
    got: dict[str, list[dict[str, Any]]] = {s: [] for s in wanted}
    deadline = time.monotonic() + MESSAGE_TIMEOUT_S
    while any(len(got[s]) < n for s, n in wanted.items()):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = {s: n - len(got[s]) for s, n in wanted.items() if len(got[s]) < n}
            raise AssertionError(f"still waiting for {missing} within {MESSAGE_TIMEOUT_S} s")
        try:
            topic, payload, _ = q.get(timeout=left)
        except queue.Empty:
            continue
        stream = topic.removeprefix(prefix)
        if topic.startswith(prefix) and stream in got:
            got[stream].append(json.loads(payload))
    return got


def _with_spike(seed: int, feature: int, n_steps: int = 100, at: int = 90) -> np.ndarray:
    values = tiny_fleet(n_streams=1, n_steps=n_steps, seed=seed, start_step=600).values[0].copy()
    values[at, feature] += 40.0 * values[: at - 10, feature].std()  # far outside normal
    return values


# --- 1. routing by template to two models ---


def test_two_templates_route_to_two_models(
    mosquitto: Mosquitto, tiny_model: Path, lstm_model: Path, start_daemon: InProcessDaemons
) -> None:
    config = daemon_config(mosquitto.url, [
        {"path": str(tiny_model), "name": "pumps-gru", "topics": ["sensors/{stream}"]},
        {"path": str(lstm_model), "name": "plant-lstm",
         "topics": ["plant/{site}/{machine}/telemetry"]},
    ], instance="routing", scoring=WARMUP)  # fmt: skip
    listener = Listener(mosquitto.port, ["rnnsentry/alerts/#"])
    daemon = start_daemon(config)
    gru, lstm = daemon.engines
    publisher = Publisher(mosquitto.port)
    pump = _with_spike(seed=7, feature=1)  # pressure
    machine = _with_spike(seed=8, feature=0)  # flow
    for t in range(len(pump)):
        publisher.send("sensors/pump-1", sample_payload(TINY_FEATURES, pump[t], 1000.0 + t), qos=0)
        publisher.send("plant/north/p7/telemetry",
                       sample_payload(TINY_FEATURES, machine[t], 1000.0 + t), qos=0)  # fmt: skip
    # Within the subscriptions (sensors/#, plant/+/+/telemetry) but no stream: no route.
    publisher.send("sensors", sample_payload(TINY_FEATURES, pump[0], 1.0), qos=0)
    publisher.send("plant//p7/telemetry", sample_payload(TINY_FEATURES, pump[0], 1.0), qos=0)
    publisher.close()

    alerts = _docs_by_stream(listener.messages, "rnnsentry/alerts/", {"pump-1": 1, "north/p7": 1})
    listener.close()
    by_stream = {s: docs[0] for s, docs in alerts.items()}
    assert by_stream["pump-1"]["event"] == "raised"
    assert by_stream["pump-1"]["model"] == "pumps-gru"
    assert by_stream["pump-1"]["fingerprint"] == gru.model.meta.fingerprint
    assert by_stream["pump-1"]["top_features"][0]["feature"] == "pressure"
    assert by_stream["north/p7"]["event"] == "raised"
    assert by_stream["north/p7"]["stream"] == "north/p7"  # {site}/{machine} joined
    assert by_stream["north/p7"]["model"] == "plant-lstm"
    assert by_stream["north/p7"]["fingerprint"] == lstm.model.meta.fingerprint
    assert by_stream["north/p7"]["top_features"][0]["feature"] == "flow"
    assert gru.model.meta.fingerprint != lstm.model.meta.fingerprint

    _wait_outcomes(daemon, {"scored": 200, "rejected": 2, "dropped": 0})
    assert _metric(daemon, "rnnsentry_rejections_total", {"reason": "unknown_route"}) == 2
    assert (gru.table.streams(), lstm.table.streams()) == (["pump-1"], ["north/p7"])
    info = {"model": "plant-lstm", "cell": "lstm", "fingerprint": lstm.model.meta.fingerprint}
    assert _metric(daemon, "rnnsentry_model_info", info) == 1
    assert _metric(daemon, "rnnsentry_streams_active") == 2


# --- 2. every payload form ---


def test_every_payload_form_is_scored_with_the_right_timestamp(
    mosquitto: Mosquitto, tiny_model: Path, one_feature_model: Path,
    start_daemon: InProcessDaemons,
) -> None:  # fmt: skip
    config = daemon_config(mosquitto.url, [
        {"path": str(tiny_model), "topics": ["sensors/{stream}"]},
        {"path": str(one_feature_model), "topics": ["meters/{stream}"]},
    ], instance="routing", scoring=WARMUP, mqtt={"publish_scores": True})  # fmt: skip
    listener = Listener(mosquitto.port, ["rnnsentry/scores/#"])
    daemon = start_daemon(config)
    row = [float(v) for v in tiny_fleet(n_streams=1, n_steps=2, seed=3).values[0][0]]
    named = dict(zip(TINY_FEATURES, row, strict=True))
    batch = [{"ts": 1_700_000_010 + i, "values": row} for i in range(5)]
    # stream -> (payload, the sample timestamps the scores must carry; None: receive time)
    cases: dict[str, tuple[Any, list[float | None]]] = {
        "dict-extra": ({"ts": 1_700_000_000, "values": {**named, "humidity": 40.0, "door": 1}},
                       [1_700_000_000.0]),
        "list": ({"ts": 1_700_000_000.5, "values": row}, [1_700_000_000.5]),
        "epoch-ms": ({"ts": 1_700_000_001_000, "values": row}, [1_700_000_001.0]),
        "iso-utc": ({"ts": "2023-11-14T22:13:22Z", "values": named}, [1_700_000_002.0]),
        "iso-offset": ({"ts": "2023-11-15T00:13:23+02:00", "values": row}, [1_700_000_003.0]),
        "no-ts": ({"values": row}, [None]),
        "batch": (batch, [1_700_000_010.0 + i for i in range(5)]),
    }  # fmt: skip
    meter_cases: dict[str, tuple[Any, list[float | None]]] = {
        "bare": (b"3.25", [None]),
        "scalar-values": ({"ts": 1_700_000_000, "values": 2.5}, [1_700_000_000.0]),
        "one-item-list": ({"ts": 1_700_000_000, "values": [1.5]}, [1_700_000_000.0]),
        "named": ({"ts": "2023-11-14T22:13:20Z", "values": {"value": 1.0, "unit": 3}},
                  [1_700_000_000.0]),
    }  # fmt: skip
    publisher = Publisher(mosquitto.port)
    sent_from = time.time()
    for stream, (payload, _) in cases.items():
        publisher.send(f"sensors/{stream}", payload)
    for stream, (payload, _) in meter_cases.items():
        publisher.send(f"meters/{stream}", payload)
    sent_until = time.time()
    publisher.close()

    expected = {**cases, **meter_cases}
    scores = _docs_by_stream(listener.messages, "rnnsentry/scores/",
                             {s: len(ts) for s, (_, ts) in expected.items()})  # fmt: skip
    listener.close()
    for stream, (_, stamps) in expected.items():
        got = [doc["ts"] for doc in scores[stream]]
        for ts, want in zip(got, stamps, strict=True):
            if want is None:  # receive time, stamped by the daemon's MQTT thread
                assert sent_from - 1.0 <= ts <= sent_until + 1.0, (stream, ts)
            else:
                assert ts == pytest.approx(want, abs=1e-6), stream
    total = sum(len(ts) for _, ts in expected.values())
    _wait_outcomes(daemon, {"scored": total, "rejected": 0, "dropped": 0})
    assert _metric(daemon, "rnnsentry_ignored_values_total") == 3  # humidity, door, unit


# --- 3. a full queue drops and counts ---


def test_a_flood_is_scored_not_dropped_the_daemon_reads_no_faster_than_it_scores(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    config = daemon_config(mosquitto.url, tiny_model, instance="routing", scoring=WARMUP,
                           batch={"max": 1, "queue_size": 2})  # fmt: skip
    daemon = start_daemon(config)
    rows = tiny_fleet(n_streams=4, n_steps=FLOOD_MESSAGES // 4, seed=5, start_step=600).values
    payloads = [
        (f"sensors/flood-{s}", sample_payload(TINY_FEATURES, rows[s][t], 2000.0 + t))
        for t in range(rows.shape[1]) for s in range(rows.shape[0])
    ]  # fmt: skip
    publisher = Publisher(mosquitto.port)
    last = None
    for topic, payload in payloads:  # as fast as paho writes: no wait per message
        last = publisher.client.publish(topic, payload, qos=0)
    assert last is not None
    last.wait_for_publish(timeout=MESSAGE_TIMEOUT_S)
    publisher.close()

    def accounted() -> dict[str, float] | None:
        got = _outcomes(daemon)
        return got if sum(got.values()) == len(payloads) else None

    # A queue of 2 and batches of 1: paho's thread scores each due batch before it reads
    # on, so the backlog waits in the socket and the broker's queue, not in a queue of ours.
    outcomes = poll_until(accounted, FLOOD_TIMEOUT_S)
    assert outcomes == {"scored": len(payloads), "rejected": 0, "dropped": 0}
    # still connected (keep-alive answered while scoring), and ready once drained
    assert _metric(daemon, "rnnsentry_mqtt_connected") == 1
    assert _metric(daemon, "rnnsentry_queue_depth") <= 2
    poll_until(lambda: readyz(daemon)[0] == 200)


# --- 4. a shared subscription ---


def test_a_shared_subscription_routes_and_a_stream_dealt_round_robin_is_said_to_be_split(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """mosquitto deals a $share group's messages out round-robin: each daemon scores its
    share, in order, and says that it sees only part of the stream."""
    caplog.set_level(logging.WARNING, logger="detector.stage")
    models = [{"path": str(tiny_model), "topics": ["$share/rnnsentry/sensors/{stream}"]}]
    daemons = [start_daemon(daemon_config(mosquitto.url, models, instance=f"share-{i}"))
               for i in range(2)]  # fmt: skip
    assert daemons[0].link is not None and daemons[0].link.filters == ["$share/rnnsentry/sensors/#"]
    rows = tiny_fleet(n_streams=1, n_steps=SHARED_SAMPLES, seed=6, start_step=600).values[0]
    publisher = Publisher(mosquitto.port)
    for t in range(SHARED_SAMPLES):  # the tiny model's interval: 1 s
        publisher.send("sensors/pump-9", sample_payload(TINY_FEATURES, rows[t], 5000.0 + t))
    publisher.close()

    def scored() -> list[float]:
        return [_metric(d, "rnnsentry_messages_total", {"outcome": "scored"}) for d in daemons]

    poll_until(lambda: sum(scored()) == SHARED_SAMPLES)
    assert all(n > 0 for n in scored()), scored()  # both took part
    for daemon in daemons:
        assert _outcomes(daemon)["rejected"] == 0  # no unknown_route, and none out of order
        assert daemon.engines[0].table.streams() == ["pump-9"]
    said = [r.getMessage() for r in caplog.records if "sees only part" in r.getMessage()]
    assert len(said) == 2, said  # one line from each daemon
