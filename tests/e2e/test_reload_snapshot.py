"""The daemon as a subprocess: SIGHUP reloads, and state that survives kill -9."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from detector.engine import Engine
from detector.model import LoadedModel
from detector.scoring import ScoringConfig
from tests.support import (
    TINY_FEATURES,
    DaemonProcess,
    Listener,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
    train_tiny_model,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.e2e
# The environment of this file's daemons: a fixed client id, alerts after 5 samples.
SNAP_ENV = {"RNNSENTRY_SCORING__WARMUP_STEPS": "5",
            "RNNSENTRY_MQTT__CLIENT_ID": "rnnsentry-snap-test"}  # fmt: skip


def _scored(daemon: DaemonProcess) -> float | None:
    return daemon.metric("rnnsentry_messages_total", {"outcome": "scored"})


def test_sighup_swaps_a_good_model_and_keeps_the_old_on_a_corrupt_one(
    tiny_model: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A retrained file takes over with every stream afresh, its open alert cleared (reason
    "reloaded"); a corrupt one keeps the running model; the same file again keeps the
    streams."""
    live = tmp_path / "live.onnx"
    shutil.copy(tiny_model, live)
    old_meta = LoadedModel.load(live).meta
    old_fp = old_meta.fingerprint
    other = tmp_path / "other.onnx"
    new_meta = train_tiny_model(other, cell="gru", hidden=8, epochs=1)
    new_fp = new_meta.fingerprint
    assert new_fp != old_fp

    daemon = DaemonProcess(live, mosquitto.url, tmp_path, instance="snap", env=SNAP_ENV)
    listener = Listener(mosquitto.port, ["rnnsentry/alerts/p1"])
    publisher = Publisher(mosquitto.port)
    try:
        rows = tiny_fleet(n_streams=1, n_steps=40, seed=3).values[0].copy()
        rows[22, 0] += 40.0 * rows[:20, 0].std()  # a flow spike: an alert open at the reload
        for t in range(25):
            publisher.send("sensors/p1", sample_payload(TINY_FEATURES, rows[t], 10.0 + t))
        raised = listener.json_on("rnnsentry/alerts/p1", lambda d: d["event"] == "raised")
        poll_until(lambda: _scored(daemon) == 25)
        info = {"model": old_meta.name, "cell": "gru"}
        assert daemon.metric("rnnsentry_model_info", {**info, "fingerprint": old_fp}) == 1

        shutil.copy(other, live)
        daemon.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: daemon.metric("rnnsentry_reloads_total", {"result": "ok"}) == 1)
        new_info = {"model": new_meta.name, "cell": "gru", "fingerprint": new_fp}
        assert daemon.metric("rnnsentry_model_info", new_info) == 1
        assert daemon.metric("rnnsentry_model_info", {**info, "fingerprint": old_fp}) is None
        # another network: the stream's state was the old one's, so it starts afresh, and
        # its open alert is cleared
        assert daemon.metric("rnnsentry_streams_active") == 0
        cleared = listener.json_on("rnnsentry/alerts/p1", lambda d: d["event"] == "cleared")
        assert cleared["alert_id"] == raised["alert_id"] and cleared["reason"] == "reloaded"
        assert "its 1 stream(s) start afresh" in daemon.log_path.read_text()

        live.write_bytes(b"\x08\x07 this is not an onnx model")
        daemon.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: daemon.metric("rnnsentry_reloads_total", {"result": "failed"}) == 1)
        assert daemon.metric("rnnsentry_model_info", new_info) == 1
        for t in range(25, 35):
            publisher.send("sensors/p1", sample_payload(TINY_FEATURES, rows[t], 10.0 + t))
        poll_until(lambda: _scored(daemon) == 35)
        assert "reload failed, keeping the running model(s)" in daemon.log_path.read_text()

        shutil.copy(other, live)  # the same network again: the stream keeps its state
        daemon.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: daemon.metric("rnnsentry_reloads_total", {"result": "ok"}) == 2)
        assert daemon.metric("rnnsentry_streams_active") == 1
    finally:
        publisher.close()
        listener.close()
        assert daemon.stop() == 0


def test_kill_9_then_restart_restores_the_snapshot_and_scores_continue_exactly(
    tiny_model: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    snapshot = tmp_path / "state.snap"
    env = {**SNAP_ENV, "RNNSENTRY_SNAPSHOT__PATH": str(snapshot),
           "RNNSENTRY_SNAPSHOT__INTERVAL_S": "0.2",
           "RNNSENTRY_MQTT__PUBLISH_SCORES": "true"}  # fmt: skip
    rows = tiny_fleet(n_streams=1, n_steps=80, seed=5).values[0]
    stamps = 100.0 + np.arange(80.0)

    # What an uninterrupted run gives, through the same engine in this process.
    engine = Engine(LoadedModel.load(tiny_model), ScoringConfig(warmup_steps=5))
    expected = [engine.process(["pump"], stamps[t : t + 1], rows[t : t + 1]).raw[0]
                for t in range(80)]  # fmt: skip

    first = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="snap", env=env)
    publisher = Publisher(mosquitto.port)
    for t in range(60):
        publisher.send("sensors/pump", sample_payload(TINY_FEATURES, rows[t], stamps[t]))
    poll_until(lambda: _scored(first) == 60)
    scored_at = time.time()
    poll_until(lambda: snapshot.exists() and snapshot.stat().st_mtime > scored_at + 0.05)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="snap", env=env)
    listener = Listener(mosquitto.port, ["rnnsentry/scores/pump"])
    try:
        assert second.metric("rnnsentry_streams_active") == 1  # restored before any input
        for t in range(60, 80):
            publisher.send("sensors/pump", sample_payload(TINY_FEATURES, rows[t], stamps[t]))
        got = [listener.json_on("rnnsentry/scores/pump", lambda d, t=t: d["ts"] == stamps[t])
               for t in range(60, 80)]  # fmt: skip
        np.testing.assert_allclose([g["raw_score"] for g in got], expected[60:], rtol=1e-9)
    finally:
        listener.close()
        publisher.close()
        assert second.stop() == 0
