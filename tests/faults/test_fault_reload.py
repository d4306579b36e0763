"""Fault: a corrupt model file and SIGHUP while samples pour in, then the good file back.

Promise: the bad reload is refused and counted (``reloads_total{result="failed"}`` 1), the
running model keeps scoring, the good one is taken (``ok`` 1) with every stream's state,
and not one sample is lost or rejected: scored = sent.
"""

from __future__ import annotations

import shutil
import signal
import threading
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

STREAMS, STEPS = 5, 200


def test_a_bad_model_on_sighup_under_load_loses_nothing(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    live = tmp_path / "live.onnx"
    shutil.copyfile(tiny_model, live)
    daemon = DaemonProcess(live, mosquitto.url, tmp_path, instance="reload",
                           env={"RNNSENTRY_DAEMON__WORKERS": "2"})  # fmt: skip
    publisher = Publisher(mosquitto.port)
    rows = tiny_fleet(n_streams=STREAMS, n_steps=STEPS, seed=13, start_step=600).values
    halfway = threading.Event()

    def pour() -> None:
        for t in range(STEPS):
            for s in range(STREAMS):
                payload = sample_payload(TINY_FEATURES, rows[s, t], 1000.0 + t)
                publisher.send(f"sensors/pump-{s}", payload)
            if t == STEPS // 4:
                halfway.set()

    def reloads(result: str) -> float:
        return daemon.metric("rnnsentry_reloads_total", {"result": result}) or 0.0

    sender = threading.Thread(target=pour, daemon=True)
    try:
        sender.start()
        assert halfway.wait(30)
        live.write_bytes(b"\x08\x07 not an onnx model at all")
        daemon.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: reloads("failed") == 1)
        shutil.copyfile(tiny_model, live)
        daemon.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: reloads("ok") == 1)
        sender.join(timeout=60)
        assert not sender.is_alive()
        poll_until(lambda: daemon.metric("rnnsentry_messages_total", {"outcome": "scored"})
                   == STREAMS * STEPS)  # fmt: skip
        assert daemon.metric("rnnsentry_messages_total", {"outcome": "rejected"}) == 0
        assert daemon.metric("rnnsentry_gap_resets_total") == 0
        assert daemon.stop() == 0
    finally:
        publisher.close()
        daemon.stop(signal.SIGKILL)
