"""The publisher's output contract beyond alerts: each stream's retained state, and Home
Assistant's MQTT discovery. In this process over an in-memory link (with and without
scoring processes), and once through a real mosquitto for a subscriber that comes late."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.config import build_config
from detector.daemon import Daemon
from detector.link import MemoryLink, Published
from tests.support import (
    TINY_FEATURES,
    Listener,
    Publisher,
    daemon_config,
    poll_until,
    sample_payload,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto

T0 = 1_700_000_000.0


def _run(model: Path, workers: int, link: MemoryLink, **mqtt: Any) -> Daemon:
    config = daemon_config("mqtt://127.0.0.1:1", model, daemon={"workers": workers},
                           scoring={"warmup_steps": 20}, metrics={"enabled": False},
                           mqtt=mqtt)  # fmt: skip
    daemon = Daemon(config, link=link)
    daemon.start()
    return daemon


def _spike_then_calm(link: MemoryLink, stream: str, steps: int = 160) -> None:
    rows = tiny_fleet(n_streams=1, n_steps=steps, seed=7, start_step=600).values[0].copy()
    rows[90, 1] += 40.0 * np.std(rows[:80, 1])
    for t in range(steps):
        assert link.deliver(f"sensors/{stream}", sample_payload(TINY_FEATURES, rows[t], T0 + t)
                            .encode())  # fmt: skip


def _docs(items: list[Published]) -> list[dict[str, Any]]:
    return [json.loads(p.payload) for p in items]


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_each_alert_leaves_the_stream_s_state_retained(tiny_model: Path, workers: int) -> None:
    link = MemoryLink()
    daemon = _run(tiny_model, workers, link)
    try:
        _spike_then_calm(link, "pump-1")
        poll_until(lambda: len(link.sent_to("rnnsentry/state/pump-1")) == 2)
    finally:
        daemon.stop()
    raised, cleared = link.sent_to("rnnsentry/state/pump-1")
    assert raised.retain and raised.qos == 1 and cleared.retain
    alert = _docs(link.sent_to("rnnsentry/alerts/pump-1"))[0]
    on, off = _docs([raised, cleared])
    assert (on["state"], on["alert_id"], on["ts"]) == ("alert", alert["alert_id"], alert["ts"])
    assert on["since"] == alert["time"]
    assert (off["state"], off["alert_id"], off["since"]) == ("ok", None, None)
    assert link.sent_to("homeassistant/") == []  # discovery is off unless asked for


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_home_assistant_discovery_announces_each_stream_once(
    tiny_model: Path, workers: int
) -> None:
    link = MemoryLink()
    daemon = _run(tiny_model, workers, link, homeassistant_prefix="homeassistant")
    try:
        rows = tiny_fleet(n_streams=2, n_steps=30, seed=3, start_step=600).values
        for t in range(30):
            for s, stream in enumerate(("pump-1", "north/p7")):
                payload = sample_payload(TINY_FEATURES, rows[s, t], T0 + t).encode()
                assert link.deliver(f"sensors/{stream}", payload)
        poll_until(lambda: len(link.sent_to("homeassistant/")) == 2
                   and len(link.sent_to("rnnsentry/state/")) == 2)  # fmt: skip
    finally:
        daemon.stop()
    configs = {p.topic: json.loads(p.payload) for p in link.sent_to("homeassistant/")}
    assert all(p.retain for p in link.sent_to("homeassistant/"))
    topic = "homeassistant/binary_sensor/rnnsentry_test/north_p7_cd04b9e1/config"
    assert set(configs) == {topic, "homeassistant/binary_sensor/rnnsentry_test/pump-1/config"}
    sensor = configs[topic]
    assert sensor["device_class"] == "problem"
    assert sensor["state_topic"] == sensor["json_attributes_topic"] == "rnnsentry/state/north/p7"
    assert (sensor["payload_on"], sensor["payload_off"]) == ("alert", "ok")
    assert sensor["availability_topic"] == "rnnsentry/status/test"
    assert sensor["unique_id"] != configs[topic.replace("north_p7_cd04b9e1", "pump-1")]["unique_id"]
    states = {json.loads(p.payload)["stream"]: json.loads(p.payload)["state"]
              for p in link.sent_to("rnnsentry/state/")}  # fmt: skip
    assert states == {"pump-1": "ok", "north/p7": "ok"}


@pytest.mark.integration
def test_a_dashboard_that_starts_later_sees_the_open_alert(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: Any
) -> None:

    config = daemon_config(mosquitto.url, tiny_model, scoring={"warmup_steps": 20})
    start_daemon(config)
    publisher = Publisher(mosquitto.port)
    rows = tiny_fleet(n_streams=1, n_steps=92, seed=7, start_step=600).values[0].copy()
    rows[90, 1] += 40.0 * np.std(rows[:80, 1])
    try:
        for t in range(92):  # ends in the spike: the alert is open
            publisher.send("sensors/pump-9", sample_payload(TINY_FEATURES, rows[t], T0 + t))
        early = Listener(mosquitto.port, ["rnnsentry/state/#"])
        early.json_on("rnnsentry/state/pump-9", lambda d: d["state"] == "alert")  # stored now
        early.close()
        late = Listener(mosquitto.port, ["rnnsentry/state/#"])  # subscribes after the fact
        topic, payload, retained = late.messages.get(timeout=10)
        late.close()
    finally:
        publisher.close()
    assert topic == "rnnsentry/state/pump-9" and retained
    assert json.loads(payload)["state"] == "alert"


@pytest.mark.parametrize(("mqtt", "key"), [
    ({"state_topic": "rnnsentry/state"}, "mqtt.state_topic"),
    ({"state_topic": "rnnsentry/+/{stream}"}, "mqtt.state_topic"),
    ({"state_topic": "", "homeassistant_prefix": "homeassistant"}, "mqtt.homeassistant_prefix"),
    ({"homeassistant_prefix": "home/#"}, "mqtt.homeassistant_prefix"),
])  # fmt: skip
def test_state_and_discovery_settings_are_checked(mqtt: dict[str, str], key: str) -> None:
    _, problems = build_config({"mqtt": mqtt, "models": [{"path": "m.onnx"}]})
    assert any(p.startswith(key) for p in problems), problems
