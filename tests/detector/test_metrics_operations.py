"""The metrics an operator watches beside the contract's, over a real scrape: build and
process information, streams in alert, reconnects and the time of the last message, each
with scoring in the reading process (workers = 0) and in worker processes (workers = 2)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from detector import __version__
from detector.daemon import Daemon
from detector.link import MemoryLink
from tests.support import (
    CONNECT_TIMEOUT_S,
    TINY_FEATURES,
    InProcessDaemons,
    Publisher,
    daemon_config,
    metric_value,
    poll_until,
    sample_payload,
    scrape,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
RECONNECT_TIMEOUT_S = 30.0


def spiked_pump() -> np.ndarray:
    """200 normal samples of one pump with a pressure spike at step 90: one alert is raised
    at the spike and cleared by the calm samples after it."""
    values = tiny_fleet(n_streams=1, n_steps=200, seed=7, start_step=600).values[0].copy()
    values[90, 1] += 40.0 * values[:80, 1].std()
    return values


def served(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float | None:
    assert daemon.server is not None
    status, body = scrape(daemon.server.port)
    assert status == 200
    return metric_value(body, name, labels)


def test_build_process_and_platform_information_are_served(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    daemon = start_daemon(daemon_config(mosquitto.url, tiny_model, instance="ops"))
    assert served(daemon, "rnnsentry_build_info", {"version": __version__}) == 1
    assert (served(daemon, "process_resident_memory_bytes") or 0) > 10e6
    assert served(daemon, "process_cpu_seconds_total") is not None
    start = served(daemon, "process_start_time_seconds")
    assert start is not None and start <= time.time()
    assert served(daemon, "rnnsentry_scoring_cpu_seconds_total") == 0  # no scoring process
    assert served(daemon, "python_info") == 1


def test_alerts_active_and_the_last_message_time_follow_the_input(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    config = daemon_config(mosquitto.url, tiny_model, instance="ops",
                           scoring={"warmup_steps": 20})  # fmt: skip
    daemon = start_daemon(config)
    assert served(daemon, "rnnsentry_last_message_timestamp_seconds") == 0  # none yet
    assert served(daemon, "rnnsentry_alerts_active") == 0
    values = spiked_pump()
    publisher = Publisher(mosquitto.port)
    try:
        sent = time.time()
        for t, row in enumerate(values[:100]):
            publisher.send("sensors/pump-1", sample_payload(TINY_FEATURES, row, T0 + t), qos=0)
        poll_until(lambda: served(daemon, "rnnsentry_alerts_total", {"event": "raised"}) == 1)
        assert served(daemon, "rnnsentry_alerts_active") == 1
        last = served(daemon, "rnnsentry_last_message_timestamp_seconds")
        assert last is not None and sent <= last <= time.time()  # a receive time, not ts

        for t, row in enumerate(values[100:], start=100):
            publisher.send("sensors/pump-1", sample_payload(TINY_FEATURES, row, T0 + t), qos=0)
        poll_until(lambda: served(daemon, "rnnsentry_alerts_total", {"event": "cleared"}) == 1)
        assert served(daemon, "rnnsentry_alerts_active") == 0
        assert (served(daemon, "rnnsentry_last_message_timestamp_seconds") or 0) > last
    finally:
        publisher.close()


def test_a_reconnect_is_counted_and_the_first_connection_is_not(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    daemon = start_daemon(daemon_config(mosquitto.url, tiny_model, instance="ops"))
    assert served(daemon, "rnnsentry_mqtt_reconnects_total") == 0
    mosquitto.restart()
    poll_until(lambda: served(daemon, "rnnsentry_mqtt_reconnects_total") == 1,
               RECONNECT_TIMEOUT_S)  # fmt: skip
    poll_until(lambda: served(daemon, "rnnsentry_mqtt_connected") == 1, CONNECT_TIMEOUT_S)


@pytest.fixture
def pooled(tiny_model: Path) -> Iterator[tuple[Daemon, MemoryLink]]:
    """A daemon with two scoring processes over an in-memory link, metrics served."""
    link = MemoryLink()
    config = daemon_config("mqtt://127.0.0.1:1", tiny_model, instance="ops",
                           daemon={"workers": 2}, scoring={"warmup_steps": 20})  # fmt: skip
    daemon = Daemon(config, link=link)
    daemon.start()
    try:
        yield daemon, link
    finally:
        daemon.stop()


def test_with_scoring_processes_counts_add_up_and_the_rest_is_the_reading_process(
    pooled: tuple[Daemon, MemoryLink],
) -> None:
    daemon, link = pooled
    values = spiked_pump()
    # The spiking pump and a calm one: which worker owns each does not matter to the sums.
    calm = tiny_fleet(n_streams=1, n_steps=100, seed=8, start_step=600).values[0]
    for t in range(100):
        for stream, row in (("pump-1", values[t]), ("pump-2", calm[t])):
            payload = sample_payload(TINY_FEATURES, row, T0 + t).encode()
            assert link.deliver(f"sensors/{stream}", payload, received=T0 + 1000.0 + t)
    poll_until(lambda: served(daemon, "rnnsentry_messages_total", {"outcome": "scored"}) == 200)
    poll_until(lambda: served(daemon, "rnnsentry_alerts_active") == 1)
    assert served(daemon, "rnnsentry_streams_active") == 2
    # One process's own values, never added up over three processes.
    assert served(daemon, "rnnsentry_last_message_timestamp_seconds") == T0 + 1099.0
    assert served(daemon, "rnnsentry_build_info", {"version": __version__}) == 1
    assert served(daemon, "rnnsentry_mqtt_connected") == 1
    assert served(daemon, "rnnsentry_mqtt_reconnects_total") == 0
    start = served(daemon, "process_start_time_seconds")
    assert start is not None and start <= time.time()
    # The scoring processes' own CPU time and memory, added up over the two of them.
    assert (served(daemon, "rnnsentry_scoring_cpu_seconds_total") or 0) > 0
    reader = served(daemon, "process_resident_memory_bytes") or 0
    assert (served(daemon, "rnnsentry_scoring_resident_memory_bytes") or 0) > 20e6
    assert reader > 10e6

    for t in range(100, 200):
        payload = sample_payload(TINY_FEATURES, values[t], T0 + t).encode()
        assert link.deliver("sensors/pump-1", payload)
    poll_until(lambda: served(daemon, "rnnsentry_alerts_total", {"event": "cleared"}) == 1)
    poll_until(lambda: served(daemon, "rnnsentry_alerts_active") == 0)
