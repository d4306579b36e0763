"""Fault: hostile payloads and timestamps sent to a running daemon over MQTT, interleaved
with good samples on the same stream and on a neighbour.

Promise: every hostile message is rejected under its named reason (counted exactly), the
daemon keeps running, and every good sample, on the attacked stream and beside it, is
scored: one bad sample never silences a stream.
"""

from __future__ import annotations

import json
import signal
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

GOOD = {name: 1.0 for name in TINY_FEATURES}


def _doc(ts: object, values: object = GOOD) -> bytes:
    return json.dumps({"ts": ts, "values": values}).encode()


# (payload, the reason it is rejected for); each is sent on the attacked stream.
HOSTILE: list[tuple[bytes, str]] = [
    (b"\xff\xfe not text", "decode"),
    (b"{not json", "decode"),
    (b"[" * 100_000, "too_large"),  # 100 kB of nesting, over max_bytes
    (b"[" * 10_000 + b"]" * 10_000, "decode"),  # nested beyond any parser's depth
    (b'"a string"', "schema"),
    (_doc(5e8, {"flow": 1.0}), "schema"),  # sensors missing
    (_doc(5e8, {name: "1" for name in TINY_FEATURES}), "schema"),
    (
        b'{"ts": 5e8, "values": {"flow": NaN, "pressure": 1, "temperature": 1, "vibration": 1}}',
        "non_finite",
    ),  # fmt: skip
    (_doc(5e8, {**GOOD, "flow": 1e309}), "non_finite"),
    (json.dumps([{"ts": 5e8 + i, "values": GOOD} for i in range(1001)]).encode(), "too_large"),
    (_doc("9999-12-31T23:59:59Z"), "bad_timestamp"),
    (_doc("0001-01-01T00:00:00Z"), "bad_timestamp"),
    (_doc(-1e9), "bad_timestamp"),
    (_doc(0), "bad_timestamp"),
    (_doc(1e10), "bad_timestamp"),
    (_doc(1e297), "bad_timestamp"),
    (_doc("yesterday"), "bad_timestamp"),
]


def test_hostile_input_is_rejected_by_reason_and_never_silences_a_stream(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="hostile",
                           env={"RNNSENTRY_DAEMON__WORKERS": "2"})  # fmt: skip
    publisher = Publisher(mosquitto.port)
    rows = tiny_fleet(n_streams=2, n_steps=len(HOSTILE) + 3, seed=11, start_step=600).values
    expected: dict[str, int] = {}
    try:
        t0 = 1.7e9
        good = 0
        for i, (payload, reason) in enumerate(HOSTILE):
            for s, stream in enumerate(("attacked", "neighbour")):
                ok = sample_payload(TINY_FEATURES, rows[s, i], t0 + i)
                publisher.send(f"sensors/{stream}", ok)
                good += 1
            publisher.send("sensors/attacked", payload)
            expected[reason] = expected.get(reason, 0) + 1
        n = len(HOSTILE)
        # The stream's own history: a time gone back and a time repeated.
        publisher.send("sensors/attacked", sample_payload(TINY_FEATURES, rows[0, 0], t0))
        expected["out_of_order"] = 1
        publisher.send("sensors/attacked", sample_payload(TINY_FEATURES, rows[0, 0], t0 + n - 1))
        expected["duplicate"] = 1
        publisher.send("sensors", sample_payload(TINY_FEATURES, rows[0, 0], t0))
        expected["unknown_route"] = 1  # "sensors/#" delivers it; "sensors/{stream}" has no stream
        publisher.send("sensors/" + "x" * 65_525, sample_payload(TINY_FEATURES, rows[0, 0], t0))
        expected["unpublishable"] = 1  # its alert topic would pass MQTT's 65,535 bytes
        for s, stream in enumerate(("attacked", "neighbour")):  # after all of that: scored
            publisher.send(f"sensors/{stream}", sample_payload(TINY_FEATURES, rows[s, n], t0 + n))
            good += 1

        def scored() -> float:
            return daemon.metric("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0

        def counted() -> float:
            return daemon.metric("rnnsentry_messages_total", {"outcome": "rejected"}) or 0.0

        poll_until(lambda: scored() == good and counted() == sum(expected.values()))
        found = {r: daemon.metric("rnnsentry_rejections_total", {"reason": r}) for r in expected}
        assert found == expected
        assert daemon.metric("rnnsentry_messages_total", {"outcome": "dropped"}) == 0
        assert daemon.proc.poll() is None and daemon.ready()
        assert daemon.stop() == 0
    finally:
        publisher.close()
        daemon.stop(signal.SIGKILL)
