"""Fault: the broker killed with ``kill -9`` in the middle of the streams' lives, and
started again on the same port from its persistence file.

Promise: with QoS 1 input and a broker that keeps sessions, 0 samples lost: every sample
sent, before the crash, while the broker is down and after it is back, is scored exactly
once; a sample the broker delivers twice is rejected as a duplicate, never scored twice.
The daemon reconnects by itself, resubscribes and says ``online`` again.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    TINY_FEATURES,
    DaemonProcess,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.faults

STREAMS, STEPS = 5, 60


@pytest.fixture
def store() -> Iterator[Path]:
    """A folder for mosquitto's persistence file that it can write: started as root, it
    becomes the ``mosquitto`` user, who cannot reach into pytest's private temp folders."""
    folder = Path(tempfile.mkdtemp(prefix="rnnsentry-faults-broker-"))
    if os.geteuid() == 0:
        try:
            shutil.chown(folder, user="mosquitto")
        except (LookupError, OSError):
            folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_broker_killed_mid_stream_loses_no_qos1_sample(
    tiny_model: Path, tmp_path: Path, store: Path
) -> None:
    broker = Mosquitto(extra_config=f"persistence true\npersistence_location {store}/\n"
                                    "autosave_interval 1\nautosave_on_changes true\n")  # fmt: skip
    broker.start()
    env = {"RNNSENTRY_MQTT__RECONNECT_MIN_S": "1", "RNNSENTRY_MQTT__RECONNECT_MAX_S": "1",
           "RNNSENTRY_DAEMON__WORKERS": "2"}  # fmt: skip
    rows = tiny_fleet(n_streams=STREAMS, n_steps=STEPS, seed=8, start_step=600).values
    daemon = DaemonProcess(tiny_model, broker.url, tmp_path, instance="broker-kill", env=env)
    publisher: Publisher | None = None
    try:
        publisher = Publisher(broker.port)

        def send(lo: int, hi: int) -> None:
            assert publisher is not None
            for t in range(lo, hi):
                for s in range(STREAMS):
                    payload = sample_payload(TINY_FEATURES, rows[s, t], 1000.0 + t)
                    info = publisher.client.publish(f"sensors/pump-{s}", payload, qos=1)
                    assert info.rc in (0, 4)  # sent, or queued until the link is back

        def scored() -> float:
            return daemon.metric("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0

        send(0, 30)
        poll_until(lambda: scored() == 30 * STREAMS)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)  # no goodbye: sessions as last saved
        broker.proc.wait()
        poll_until(lambda: not daemon.ready())  # it has seen the broker go
        send(30, 45)  # while the broker is down: they wait in the publisher's queue
        broker.start()  # same port, same persistence file
        send(45, STEPS)
        poll_until(lambda: daemon.ready())
        poll_until(lambda: scored() >= STEPS * STREAMS)
        rejected = daemon.metric("rnnsentry_rejections_total", {"reason": "duplicate"}) or 0.0
        assert scored() == STEPS * STREAMS  # each sample once: 0 lost, none twice
        other = (
            daemon.metric("rnnsentry_messages_total", {"outcome": "rejected"}) or 0.0
        ) - rejected
        assert other == 0 and daemon.metric("rnnsentry_messages_total", {"outcome": "dropped"}) == 0
        assert daemon.stop() == 0
    finally:
        if publisher is not None:
            publisher.close()
        daemon.stop(signal.SIGKILL)
        broker.stop()
