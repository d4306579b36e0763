"""``rnnsentry run`` with ``RNNSENTRY_DAEMON__LOG_FORMAT=json``: every line it writes, from
the reading process and from its scoring process, is one JSON object with the time, level,
logger and message."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from tests.support import DaemonProcess, Publisher, poll_until
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.e2e

JSON_ENV = {"RNNSENTRY_DAEMON__LOG_FORMAT": "json", "RNNSENTRY_DAEMON__WORKERS": "1"}


def test_every_line_of_the_daemon_and_its_worker_is_a_json_object(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="e2e-json", env=JSON_ENV)
    try:
        publisher = Publisher(mosquitto.port)
        publisher.send("sensors/pump-1", b"\xff not json")  # the worker logs the rejection
        publisher.close()
        poll_until(lambda: daemon.metric("rnnsentry_rejections_total", {"reason": "decode"}) == 1)
    finally:
        assert daemon.stop() == 0
    lines = daemon.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert records and all(isinstance(r, dict) for r in records)
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    connected = [r for r in records if r["message"].startswith("connected to the broker")]
    assert connected and connected[0]["logger"] == "detector.mqtt"
    assert "worker" not in connected[0]  # the reading process
    (rejected,) = [r for r in records if r["message"].startswith("rejected (decode)")]
    assert (rejected["worker"], rejected["logger"], rejected["level"]) == (
        0, "detector.stage", "WARNING")  # fmt: skip
