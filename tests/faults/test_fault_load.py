"""Faults of load: a QoS 0 flood beyond what the daemon can score, SIGTERM in the middle
of it, and an explosion of stream ids past ``streams.max_streams``.

Promises, as numbers:
- under a flood every message the daemon takes is counted (scored, rejected or dropped),
  none of the valid ones is rejected, ``/healthz`` keeps answering, its memory grows by
  less than 64 MB, and SIGTERM ends it cleanly (exit 0, ``offline``) within 3 s;
- 20 times ``max_streams`` distinct ids hold the table at ``max_streams``, evict the rest
  (counted), and a stream that keeps sending keeps its state: all its samples scored, no
  gap reset.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.support import (
    TINY_FEATURES,
    DaemonProcess,
    Listener,
    Publisher,
    poll_until,
    sample_payload,
    scrape,
    tiny_fleet,
    wait_for,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.faults

FLOOD_S = 4.0
STOP_WITHIN_S = 3.0


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the scoring processes)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(entry.name) != pid and int(stat[1]) != pid:
                continue
            total += int(stat[21]) * 4096  # rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total


def _packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0."""
    body = struct.pack("!H", len(topic)) + topic.encode() + payload
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            break
    return b"\x30" + bytes(length) + body


def _flood(port: int, until: threading.Event, sent: list[int]) -> None:
    """Raw QoS 0 publishes as fast as the socket takes them, on 500 streams."""
    rows = tiny_fleet(n_streams=1, n_steps=400, seed=9, start_step=600).values[0]
    chunk = []
    for t in range(400):
        for s in range(500):
            payload = sample_payload(TINY_FEATURES, rows[t], 1000.0 + t).encode()
            chunk.append(_packet(f"sensors/f{s}", payload))
    blocks = [b"".join(chunk[i : i + 1000]) for i in range(0, len(chunk), 1000)]
    cid = b"faults-flood"
    hello = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(cid)) + cid
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"\x10" + bytes([len(hello)]) + hello)
        assert sock.recv(4)[:1] == b"\x20"
        for block in blocks:
            if until.is_set():
                break
            sock.sendall(block)
            sent[0] += 1000


def test_a_qos0_flood_is_counted_and_sigterm_ends_it_quickly(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    status = Listener(mosquitto.port, ["rnnsentry/status/#"])
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="flood")
    stop = threading.Event()
    sent = [0]
    flooder = threading.Thread(target=_flood, args=(mosquitto.port, stop, sent), daemon=True)
    try:
        assert wait_for(status.messages, lambda m: True)[1] == b"online"
        rss_before = _rss_bytes(daemon.proc.pid)
        flooder.start()
        began = time.monotonic()
        slowest = 0.0
        while time.monotonic() - began < FLOOD_S:
            asked = time.monotonic()
            assert scrape(daemon.port, "/healthz")[0] == 200
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.25)
        counts = {o: daemon.metric("rnnsentry_messages_total", {"outcome": o}) or 0.0
                  for o in ("scored", "rejected", "dropped")}  # fmt: skip
        growth = _rss_bytes(daemon.proc.pid) - rss_before
        asked = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)  # the flood still pours in
        assert daemon.proc.wait(timeout=10) == 0
        took = time.monotonic() - asked
        assert wait_for(status.messages, lambda m: m[1] == b"offline")[1] == b"offline"
        assert counts["scored"] > 0 and counts["rejected"] == 0
        assert sum(counts.values()) <= sent[0]  # nothing counted that was not sent
        assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.0f} MB"
        assert slowest < 2.0, f"/healthz took {slowest:.2f} s under the flood"
        assert took < STOP_WITHIN_S, f"SIGTERM under a flood took {took:.2f} s"
    finally:
        stop.set()
        flooder.join(timeout=10) if flooder.is_alive() else None
        status.close()
        daemon.stop(signal.SIGKILL)


def test_stream_ids_past_max_streams_are_evicted_and_a_steady_stream_keeps_its_state(
    mosquitto: Mosquitto, tiny_model: Path, tmp_path: Path
) -> None:
    limit, ids = 100, 2000
    env = {"RNNSENTRY_STREAMS__MAX_STREAMS": str(limit), "RNNSENTRY_DAEMON__WORKERS": "0",
           "RNNSENTRY_BATCH__MAX": "64"}  # fmt: skip
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="explode", env=env)
    publisher = Publisher(mosquitto.port)
    rows = tiny_fleet(n_streams=1, n_steps=ids // 20 + 1, seed=10, start_step=600).values[0]
    try:
        rss_before = _rss_bytes(daemon.proc.pid)
        steady = 0
        for i in range(ids):
            payload = sample_payload(TINY_FEATURES, rows[i // 20], 1000.0)
            publisher.client.publish(f"sensors/new-{i}", payload, qos=1)
            if i % 20 == 0:  # the steady stream: one sample every 20 new ids
                payload = sample_payload(TINY_FEATURES, rows[steady], 1000.0 + steady)
                publisher.client.publish("sensors/steady", payload, qos=1)
                steady += 1
        total = ids + steady
        poll_until(lambda: daemon.metric("rnnsentry_messages_total",
                                         {"outcome": "scored"}) == total)  # fmt: skip
        active = daemon.metric("rnnsentry_streams_active")
        evicted = daemon.metric("rnnsentry_evictions_total")
        assert active is not None and active <= limit
        assert evicted is not None and evicted >= ids + 1 - limit
        assert daemon.metric("rnnsentry_gap_resets_total") == 0
        assert daemon.metric("rnnsentry_messages_total", {"outcome": "rejected"}) == 0
        growth = _rss_bytes(daemon.proc.pid) - rss_before
        assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.0f} MB"
        assert daemon.stop() == 0
    finally:
        publisher.close()
        daemon.stop(signal.SIGKILL)
