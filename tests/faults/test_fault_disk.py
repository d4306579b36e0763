"""Fault: the disk fills while the daemon runs (the file-size limit of the process stands
in for a full disk: the kernel refuses the snapshot's bytes as it would with no space).

Promise: scoring goes on (every sample scored); each snapshot that cannot be written is
counted in ``rnnsentry_snapshot_failures_total`` and leaves the last good snapshot whole,
with no temporary file behind; once there is room again snapshots are written, and a
kill -9 restores every stream from them.
"""

from __future__ import annotations

import resource
import signal
import time
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

STREAMS = 300
FULL = 16 * 1024  # bytes a file may reach while the "disk" is full: less than a snapshot


def test_a_full_disk_fails_snapshots_not_scoring_and_keeps_the_last_good_one(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    snap = tmp_path / "snaps" / "state.snap"
    snap.parent.mkdir()
    env = {"RNNSENTRY_SNAPSHOT__PATH": str(snap), "RNNSENTRY_SNAPSHOT__INTERVAL_S": "0.3",
           "RNNSENTRY_DAEMON__WORKERS": "2"}  # fmt: skip
    rows = tiny_fleet(n_streams=1, n_steps=4, seed=12, start_step=600).values[0]
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="disk", env=env)
    publisher = Publisher(mosquitto.port)

    def send(t: int) -> None:
        for s in range(STREAMS):
            payload = sample_payload(TINY_FEATURES, rows[t], 1000.0 + t)
            publisher.client.publish(f"sensors/pump-{s}", payload, qos=1)

    def scored() -> float:
        return daemon.metric("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0

    def failures() -> float:
        return daemon.metric("rnnsentry_snapshot_failures_total") or 0.0

    try:
        send(0)
        poll_until(lambda: scored() == STREAMS)
        poll_until(lambda: snap.exists() and snap.stat().st_size > FULL)
        time.sleep(0.5)  # one more snapshot after the last sample: the good one
        good = snap.read_bytes()
        unlimited = resource.RLIM_INFINITY  # the hard limit stays: only the soft one moves
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (FULL, unlimited))  # full
        poll_until(lambda: failures() >= 3)
        send(1)  # scoring goes on with the disk full
        poll_until(lambda: scored() == 2 * STREAMS)
        assert snap.read_bytes() == good  # the last good snapshot, whole
        assert sorted(p.name for p in snap.parent.iterdir()) == ["state.snap"]  # no temp file
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        poll_until(lambda: snap.read_bytes() != good)  # room again: written
        stuck = failures()
        time.sleep(1.0)
        assert failures() == stuck  # and no longer failing
        daemon.stop(signal.SIGKILL)
        daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="disk", env=env)
        assert daemon.metric("rnnsentry_streams_active") == STREAMS
        assert daemon.stop() == 0
    finally:
        publisher.close()
        daemon.stop(signal.SIGKILL)
