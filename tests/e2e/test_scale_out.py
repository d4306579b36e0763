"""Three daemons share the streams on a real NATS server, each stream on exactly one.

NATS's subject mapping ``sensors.*`` -> ``part.{{partition(3,1)}}.sensors.{{wildcard(1)}}``
puts each stream in one of three partitions by a hash of its id, and daemon i reads
``part/i/sensors/{stream}`` over NATS's MQTT 3.1.1 listener. Every sample is scored once,
by the daemon of its stream's partition; one daemon killed with -9 finds the QoS 1 input
sent while it was down waiting in the broker, and scores it when it is back.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.support import (
    NATS_PARTITIONS,
    TINY_FEATURES,
    DaemonProcess,
    Listener,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
    wait_for,
)
from training.demo.localbroker import NatsServer, find_nats_server

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PARTITIONS = 3
STREAMS = [f"pump-{i:02d}" for i in range(24)]
SAMPLES = 12  # per stream, before the kill and again while one daemon is down
T0 = 1_700_000_000.0
SCORED_TIMEOUT_S = 60.0  # three daemons and a broker on a loaded 2-core machine


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    if find_nats_server() is None:
        pytest.skip("nats-server is not installed here (make setup installs it as root)")
    server = NatsServer(NATS_PARTITIONS).start()
    try:
        yield server
    finally:
        server.stop()


def _daemon(model: Path, nats: NatsServer, log_dir: Path, i: int) -> DaemonProcess:
    return DaemonProcess(
        model, nats.url, log_dir, instance=f"part-{i}",
        extra_args=["--topic", f"part/{i}/sensors/{{stream}}"],
        env={"RNNSENTRY_MQTT__PROTOCOL": "3.1.1", "RNNSENTRY_DAEMON__WORKERS": "0",
             "RNNSENTRY_MQTT__PUBLISH_SCORES": "true",
             # Whose score it is: the daemon's own prefix.
             "RNNSENTRY_MQTT__SCORE_TOPIC": f"rnnsentry/scores/part-{i}/{{stream}}"},
    )  # fmt: skip


def _send(nats: NatsServer, first_step: int) -> None:
    rows = tiny_fleet(n_streams=len(STREAMS), n_steps=2 * SAMPLES, seed=9, start_step=600).values
    publisher = Publisher(nats.mqtt_port, protocol=paho.MQTTv311)
    try:
        for k in range(first_step, first_step + SAMPLES):
            for s, stream in enumerate(STREAMS):
                payload = sample_payload(TINY_FEATURES, rows[s, k], T0 + k)
                publisher.send(f"sensors/{stream}", payload, qos=1)
    finally:
        publisher.close()


def _scored(daemon: DaemonProcess) -> float:
    return daemon.metric("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0


def _consumers(nats: NatsServer) -> dict[str, dict[str, Any]]:
    """NATS's MQTT QoS 1 consumers by the subject they read (``$MQTT.msgs.part.<i>...``)."""
    url = f"{nats.monitor_url}/jsz?consumers=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.load(resp)
    return {
        c["config"]["filter_subject"]: c
        for account in doc.get("account_details", [])
        for stream in account.get("stream_detail", [])
        if stream["name"] == "$MQTT_msgs"
        for c in stream.get("consumer_detail") or []
    }


def _take_scores(listener: Listener, n: int) -> list[tuple[int, str, float]]:
    """The next ``n`` score documents as (daemon, stream, ts)."""
    got = []
    for _ in range(n):
        topic, payload, _ = wait_for(listener.messages, lambda m: True, SCORED_TIMEOUT_S)
        part = int(topic.split("/")[2].removeprefix("part-"))
        doc = json.loads(payload)
        assert topic.endswith("/" + doc["stream"]), topic
        got.append((part, doc["stream"], doc["ts"]))
    return got


def test_three_daemons_share_the_streams_and_a_kill_9_loses_nothing(
    nats: NatsServer, tiny_model: Path, tmp_path: Path
) -> None:
    listener = Listener(nats.mqtt_port, ["rnnsentry/scores/#"], protocol=paho.MQTTv311)
    daemons = [_daemon(tiny_model, nats, tmp_path, i) for i in range(PARTITIONS)]
    try:
        # 1. Every sample is scored once, each stream by one daemon only.
        _send(nats, 0)
        sent = len(STREAMS) * SAMPLES
        poll_until(lambda: sum(map(_scored, daemons)) == sent, SCORED_TIMEOUT_S)
        scores = _take_scores(listener, sent)
        owners: dict[str, set[int]] = {}
        for part, stream, _ in scores:
            owners.setdefault(stream, set()).add(part)
        assert sorted(owners) == STREAMS and all(len(o) == 1 for o in owners.values()), owners
        mine = {i: sorted(s for s, o in owners.items() if o == {i}) for i in range(PARTITIONS)}
        assert all(mine.values()), mine  # the hash gives each partition some of 24 streams
        assert Counter((s, ts) for _, s, ts in scores).most_common(1)[0][1] == 1
        for i, daemon in enumerate(daemons):
            assert _scored(daemon) == len(mine[i]) * SAMPLES
            assert daemon.metric("rnnsentry_streams_active") == len(mine[i])
            assert daemon.metric("rnnsentry_messages_total", {"outcome": "rejected"}) == 0
        # Each QoS 1 sample is acknowledged once scored: none left in flight to be sent again.
        poll_until(lambda: all(c["num_ack_pending"] == 0 for c in _consumers(nats).values()))

        # 2. The daemon with the most streams is killed; its input waits in the broker.
        victim = max(mine, key=lambda i: len(mine[i]))
        assert daemons[victim].stop(signal.SIGKILL) == -signal.SIGKILL
        _send(nats, SAMPLES)
        others = [i for i in range(PARTITIONS) if i != victim]
        for i in others:
            poll_until(lambda i=i: _scored(daemons[i]) == 2 * len(mine[i]) * SAMPLES,
                       SCORED_TIMEOUT_S)  # fmt: skip
        # part/i/sensors/# reads part.i.sensors.> (and part.i.sensors, which '#' takes too).
        held = [c["num_pending"] + c["num_ack_pending"] for subject, c in _consumers(nats).items()
                if subject.startswith(f"$MQTT.msgs.part.{victim}.sensors")]  # fmt: skip
        assert sum(held) == len(mine[victim]) * SAMPLES, _consumers(nats).keys()

        # 3. Back under the same instance name (client id): it scores what waited.
        daemons[victim] = _daemon(tiny_model, nats, tmp_path, victim)
        poll_until(lambda: _scored(daemons[victim]) == len(mine[victim]) * SAMPLES,
                   SCORED_TIMEOUT_S)  # fmt: skip
        later = _take_scores(listener, sent)
        everything = scores + later
        expected = {(s, T0 + k) for s in STREAMS for k in range(2 * SAMPLES)}
        counted = Counter((s, ts) for _, s, ts in everything)
        lost = expected - set(counted)
        twice = {key: n for key, n in counted.items() if n > 1}
        assert (lost, twice) == (set(), {})
        assert all({p for p, s, _ in later if s == stream} == owners[stream] for stream in STREAMS)
        assert daemons[victim].metric("rnnsentry_streams_active") == len(mine[victim])
        print(f"\nNATS partitions: sent {2 * sent} samples of {len(STREAMS)} streams;"
              f" streams per daemon {[len(mine[i]) for i in range(PARTITIONS)]};"
              f" daemon {victim} killed with -9 while {len(mine[victim]) * SAMPLES} of its"
              f" samples were sent; scored per daemon"
              f" {[sum(1 for p, _, _ in everything if p == i) for i in range(PARTITIONS)]};"
              f" lost {len(lost)}, scored twice {len(twice)}")  # fmt: skip
    finally:
        for daemon in daemons:
            daemon.stop()
        listener.close()
