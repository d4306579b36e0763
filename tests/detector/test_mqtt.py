"""The daemon's broker link against a real mosquitto: a broker down at start-up, a broker
restart (reconnect and resubscribe), and the persistent session across a daemon restart
(input queued while it is away, input reaching it while it stops)."""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from detector.daemon import Daemon
from detector.link import Inbound, LinkHooks
from detector.mqtt import MqttLink
from tests.support import (
    CONNECT_TIMEOUT_S,
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
    wait_for,
)
from training.demo.localbroker import Mosquitto, free_port

pytestmark = pytest.mark.integration

RECONNECT_TIMEOUT_S = 30.0  # reconnect delay is 1 s here; slack for a loaded machine
QUEUED_SAMPLES = 40


# [mqtt] of this file's daemons beyond daemon_config's: the broker keeps a session 10 minutes.
SESSION = {"session_expiry_s": 600}


def _scrape_metric(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    assert daemon.server is not None
    status, body = scrape(daemon.server.port)
    assert status == 200
    value = metric_value(body, name, labels)
    assert value is not None, name
    return value


def _scored(daemon: Daemon) -> float:
    return _scrape_metric(daemon, "rnnsentry_messages_total", {"outcome": "scored"})


def _send_samples(port: int, stream: str, n: int, start_ts: float, qos: int = 1) -> None:
    rows = tiny_fleet(n_streams=1, n_steps=max(n, 2), seed=4, start_step=600).values[0]
    publisher = Publisher(port)
    try:
        for t in range(n):
            payload = sample_payload(TINY_FEATURES, rows[t], start_ts + t)
            publisher.send(f"sensors/{stream}", payload, qos=qos)
    finally:
        publisher.close()


def _session_link(
    mosquitto: Mosquitto, tiny_model: Path, name: str
) -> Callable[[queue.Queue[Inbound]], MqttLink]:
    """Starts a connected MqttLink into an inbox, with one client id (and so one persistent
    session) however often it is called."""
    mqtt = daemon_config(mosquitto.url, tiny_model, instance="link", mqtt=SESSION).mqtt
    client_id = f"rnnsentry-{name}-{free_port()}"

    def link(inbox: queue.Queue[Inbound]) -> MqttLink:
        hooks = LinkHooks(inbox, on_drop=lambda: None, on_connection=lambda up: None)
        made = MqttLink(mqtt, client_id, f"rnnsentry/status/{name}", ["sensors/#"], hooks)
        made.start()
        assert made.connected.wait(CONNECT_TIMEOUT_S), made.last_error
        return made

    return link


def test_a_broker_down_at_start_is_retried_and_readyz_says_why(
    tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    broker = Mosquitto()  # its port is chosen, nothing listens on it yet
    try:
        config = daemon_config(broker.url, tiny_model, instance="link", mqtt=SESSION)
        daemon = start_daemon(config, ready_within=None)

        def reason() -> str:  # the body once it carries the last failure in brackets
            code, body = readyz(daemon)
            return body if code == 503 and "(" in body else ""

        why = poll_until(reason, CONNECT_TIMEOUT_S)
        assert why.startswith("not connected to the broker") and "refused" in why.lower()
        assert _scrape_metric(daemon, "rnnsentry_mqtt_connected") == 0
        broker.start()
        poll_until(lambda: readyz(daemon)[0] == 200, RECONNECT_TIMEOUT_S)
        assert _scrape_metric(daemon, "rnnsentry_mqtt_connected") == 1
        _send_samples(broker.port, "late", 3, 100.0)
        poll_until(lambda: _scored(daemon) == 3)
    finally:
        start_daemon.stop_all()
        broker.stop()


def test_a_broker_restart_reconnects_and_resubscribes(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    daemon = start_daemon(daemon_config(mosquitto.url, tiny_model, instance="link", mqtt=SESSION))
    _send_samples(mosquitto.port, "before", 5, 100.0)
    poll_until(lambda: _scored(daemon) == 5)

    # Same port, persistence off: the new broker knows no session, subscription or status.
    mosquitto.restart()
    status = Listener(mosquitto.port, ["rnnsentry/status/#"])
    try:
        # Only a new connection of the daemon can tell this broker "online".
        wait_for(status.messages, lambda m: m[:2] == ("rnnsentry/status/link", b"online"),
                 RECONNECT_TIMEOUT_S)  # fmt: skip
    finally:
        status.close()
    poll_until(lambda: readyz(daemon)[0] == 200, RECONNECT_TIMEOUT_S)
    assert _scrape_metric(daemon, "rnnsentry_mqtt_connected") == 1
    _send_samples(mosquitto.port, "after", 5, 200.0)  # only a renewed subscription gets these
    poll_until(lambda: _scored(daemon) == 10)
    assert sorted(daemon.engines[0].table.streams()) == ["after", "before"]


def test_a_message_taken_before_the_broker_forgot_the_session_acknowledges_nothing_after(
    mosquitto: Mosquitto, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker restarted without its sessions numbers its messages from 1 again. A message
    the link took before the restart, scored after it, has an id of the old session, which
    on the new one is another message's: acknowledged, the broker would take that other
    message as done before it was scored. So it is acknowledged to nothing, and the new
    message stays the broker's until it is scored: a link that stops first leaves it for
    the next session."""
    link = _session_link(mosquitto, tiny_model, "forgotten")

    caplog.set_level(logging.INFO, logger="detector.mqtt")
    first_inbox: queue.Queue[Inbound] = queue.Queue()
    first = link(first_inbox)
    try:
        _send_samples(mosquitto.port, "old", 1, 1.0)
        assert wait_for(first_inbox, lambda m: True)[0] == "sensors/old"  # taken, not scored
        mosquitto.restart()  # persistence off: the new broker knows no session
        poll_until(lambda: sum("session present: False" in r.getMessage()
                               for r in caplog.records) == 2, RECONNECT_TIMEOUT_S)  # fmt: skip
        poll_until(lambda: first.connected.is_set(), RECONNECT_TIMEOUT_S)
        _send_samples(mosquitto.port, "new", 1, 2.0)
        assert wait_for(first_inbox, lambda m: True)[0] == "sensors/new"
        first.acknowledge(1)  # the old message, scored now
        first.stop_intake()  # stopping before the new one is scored
    finally:
        first.stop()

    second_inbox: queue.Queue[Inbound] = queue.Queue()
    second = link(second_inbox)
    try:
        topic, payload, _, _ = wait_for(second_inbox, lambda m: True)
        assert topic == "sensors/new" and json.loads(payload)["ts"] == 2.0
    finally:
        second.stop()


@pytest.mark.parametrize(("protocol", "said"), [("5", "p5, c0"), ("3.1.1", "p2, c0")])
def test_qos1_input_sent_while_the_daemon_is_stopped_is_scored_after_it_returns(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons,
    protocol: str, said: str,
) -> None:  # fmt: skip
    # one client id; MQTT 5: clean start off, expiry 600 s; 3.1.1: clean session off
    config = daemon_config(mosquitto.url, tiny_model, instance="link",
                           mqtt={**SESSION, "protocol": protocol})  # fmt: skip
    first = start_daemon(config)
    # mosquitto names the protocol (p2: 3.1.1) and the clean flag of each connection.
    assert f"as {config.client_id} ({said}," in mosquitto.log_tail(100_000)
    start_daemon.stop(first)  # a graceful stop, as for an upgrade or a SIGTERM

    _send_samples(mosquitto.port, "queued", QUEUED_SAMPLES, 300.0, qos=1)

    second = start_daemon(config, ready_within=None)
    poll_until(lambda: _scored(second) == QUEUED_SAMPLES, RECONNECT_TIMEOUT_S)
    outcomes: dict[str, Any] = {
        o: _scrape_metric(second, "rnnsentry_messages_total", {"outcome": o})
        for o in ("rejected", "dropped")
    }
    assert outcomes == {"rejected": 0, "dropped": 0}
    assert second.engines[0].table.streams() == ["queued"]


def test_input_arriving_after_stop_intake_is_left_for_the_next_session(
    mosquitto: Mosquitto, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A message that reaches a stopping daemon is not acknowledged, so it is not lost."""
    link = _session_link(mosquitto, tiny_model, "handover")

    caplog.set_level(logging.DEBUG, logger="paho")  # paho logs each PUBLISH it reads
    first_inbox: queue.Queue[Inbound] = queue.Queue()
    first = link(first_inbox)
    try:
        _send_samples(mosquitto.port, "early", 1, 1.0)  # subscribed and taking input
        assert wait_for(first_inbox, lambda m: True)[0] == "sensors/early"
        first.acknowledge(1)  # scored, as the daemon says once it has
        first.stop_intake()
        _send_samples(mosquitto.port, "late", 1, 2.0)
        poll_until(lambda: any("Received PUBLISH" in r.getMessage() and "sensors/late" in
                               r.getMessage() for r in caplog.records))  # fmt: skip
    finally:
        first.stop()
    assert first_inbox.empty()

    second_inbox: queue.Queue[Inbound] = queue.Queue()
    second = link(second_inbox)
    try:
        topic, payload, _, again = wait_for(second_inbox, lambda m: True)
        assert topic == "sensors/late" and json.loads(payload)["ts"] == 2.0
        assert again  # the broker had sent it before, to the stopping session
    finally:
        second.stop()
