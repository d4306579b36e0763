"""Soak: the daemon for an hour under steady QoS 1 load, with faults on a schedule.

A publisher process sends single-sample QoS 1 messages, round-robin over ``--streams``
streams, at ``--rate`` messages/s, with one gross spike a minute on some stream (each
raises an alert that clears a few samples later) and a burst of hostile payloads every
three minutes. A collector process subscribes to every score and alert (a persistent
QoS 1 session). The broker keeps its sessions on disk. Faults, by the clock:

- the broker killed with -9 every 5 minutes and started again 3 s later;
- SIGHUP (a reload of the same model) every 5 minutes;
- once, at a sixth of the run, the daemon killed with -9 and started again from its
  snapshot and alert journal.

Reported: the daemon's resident memory (every process), threads and open files over the
run, their drift after the daemon's restart (from a window a quarter into the run to the
last twelfth), samples sent and scored, samples whose score never arrived (split into
those sent while the broker was down or coming back, whose QoS 0 score the broker could
drop, and the rest: lost), samples scored twice (QoS 1 redelivered after the daemon's
kill -9 rewound its state), and alert ids whose raised and cleared do not pair.

    .venv/bin/python bench/soak.py [--minutes 60] [--rate 1000] [--streams 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    SPAWN,
    T0,
    DaemonProcess,
    bench_model,
    daemon_config,
    feature_names,
    machine_line,
    table,
    value_pool,
)

from training.demo.localbroker import Mosquitto

FEATURES = 8
SPIKE_EVERY_S = 60.0
HOSTILE_EVERY_S = 180.0
BROKER_KILL_EVERY_S = 300.0
BROKER_DOWN_S = 3.0
RELOAD_EVERY_S = 300.0
SAMPLE_EVERY_S = 10.0
BROKER_WINDOW_S = 15.0  # after a broker kill, scores may be dropped for this long


def _client(client_id: str, port: int) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)  # fmt: skip
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(1, 1)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600  # a session that outlives the connection
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    return client


def _publisher_main(port: int, streams: int, rate: float, seconds: float, out: Any) -> None:
    """Paced QoS 1 samples; spikes and hostile bursts on the schedule; what was sent."""
    client = _client("soak-publisher", port)
    client.loop_start()
    names = feature_names(FEATURES)
    pool = value_pool(FEATURES, steps=2000)
    rng = np.random.default_rng(0)
    began = time.time()
    sent_at: list[float] = []  # per round: when it was sent
    spikes: list[tuple[int, int]] = []
    next_spike, next_hostile = began + SPIKE_EVERY_S / 2, began + HOSTILE_EVERY_S / 2
    hostile = 0
    step = 0
    while time.time() - began < seconds:
        now = time.time()
        sent_at.append(now)
        spike = -1
        if now >= next_spike:
            spike, next_spike = int(rng.integers(streams)), next_spike + SPIKE_EVERY_S
            spikes.append((spike, step))
        for k in range(streams):
            row = pool[k % len(pool), step % (len(pool[0]) - 1)]
            values = {n: (1000.0 if k == spike else round(float(v), 5))
                      for n, v in zip(names, row, strict=True)}  # fmt: skip
            payload = json.dumps({"ts": T0 + step, "values": values})
            client.publish(f"sensors/s{k}", payload, qos=1)
            due = began + (step * streams + k + 1) / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
        if now >= next_hostile:
            next_hostile += HOSTILE_EVERY_S
            for payload in (b"\xff", b"{", b'{"ts": 1e300, "values": {}}', b"[]", b"null"):
                for _ in range(10):
                    client.publish("sensors/hostile", payload, qos=1)
                    hostile += 1
        step += 1
    time.sleep(2.0)  # the last publishes acknowledged
    client.disconnect()
    client.loop_stop()
    out.put({"rounds": step, "sent_at": sent_at, "spikes": spikes, "hostile": hostile})


def _collector_main(port: int, streams: int, max_rounds: int, stop: Any, ready: Any,
                    out: Any) -> None:  # fmt: skip
    """Every score (stream, round) seen, how often; every alert id's events."""
    seen = np.zeros((streams, max_rounds), np.uint8)
    alerts: dict[str, list[str]] = {}

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        if msg.topic.startswith("rnnsentry/scores/"):
            k, r = int(doc["stream"][1:]), int(round(doc["ts"] - T0))
            if r < max_rounds:
                seen[k, r] = min(255, int(seen[k, r]) + 1)
        else:
            alerts.setdefault(doc["alert_id"], []).append(doc["event"])

    client = _client("soak-collector", port)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe([("rnnsentry/scores/#", 1),
                                                   ("rnnsentry/alerts/#", 1)])  # fmt: skip
    client.on_subscribe = lambda *a: ready.set()
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    out.put({"seen": seen, "alerts": alerts})


def _processes(pid: int) -> list[int]:
    """The daemon and its scoring processes."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _usage(pid: int) -> tuple[int, int, int]:
    """(resident bytes, threads, open files) over the daemon's processes."""
    rss = threads = files = 0
    for p in _processes(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            threads += int(fields[17])
            files += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, IndexError, ValueError):
            continue
    return rss, threads, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s")
    parser.add_argument("--streams", type=int, default=500)
    args = parser.parse_args(argv)
    seconds = args.minutes * 60.0
    work = Path(tempfile.mkdtemp(prefix="rnnsentry-soak-"))
    store = work / "broker"
    store.mkdir()
    if os.geteuid() == 0:
        shutil.chown(store, user="mosquitto") if shutil.which("mosquitto") else None
        store.chmod(0o777)
        work.chmod(0o755)
    # Sessions saved every second (saving on every change would cap the broker's rate): a
    # kill -9 may lose what it took in its last second, which lands in the kill's window.
    broker = Mosquitto(extra_config=f"persistence true\npersistence_location {store}/\n"
                                    "autosave_interval 1\n")  # fmt: skip
    broker.start()
    model = bench_model("lstm", 32, FEATURES)
    config = daemon_config(
        model, broker.url, "soak", max_streams=args.streams * 2,
        mqtt={"publish_scores": True, "reconnect_min_s": 1, "reconnect_max_s": 1},
        snapshot={"path": str(work / "state.snap"), "interval_s": 60},
        scoring={"warmup_steps": 20},
    )  # fmt: skip
    daemon = DaemonProcess(config)
    max_rounds = int(seconds * args.rate / args.streams) + 10
    stop, ready, collected = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    collector = SPAWN.Process(target=_collector_main, daemon=True, args=(
        broker.port, args.streams, max_rounds, stop, ready, collected))  # fmt: skip
    collector.start()
    if not ready.wait(30):
        raise RuntimeError("the collector did not subscribe")
    published = SPAWN.Queue()
    publisher = SPAWN.Process(target=_publisher_main, daemon=True, args=(
        broker.port, args.streams, args.rate, seconds, published))  # fmt: skip
    began = time.time()
    publisher.start()
    samples: list[tuple[float, int, int, int]] = []
    broker_kills: list[float] = []
    daemon_kill_at = seconds / 6 if not os.environ.get("SOAK_NO_KILL") else 0.0
    next_broker, next_reload, next_sample = (BROKER_KILL_EVERY_S / 2, RELOAD_EVERY_S / 5, 0.0)
    restarted_at = 0.0
    print(f"soak: {args.minutes:g} min, {args.rate:g} msg/s over {args.streams} streams; "
          f"files in {work}", flush=True)  # fmt: skip
    while publisher.is_alive():
        t = time.time() - began
        if t >= next_sample:
            samples.append((t, *_usage(daemon.proc.pid)))
            next_sample += SAMPLE_EVERY_S
        if t >= next_broker:
            next_broker += BROKER_KILL_EVERY_S
            broker_kills.append(time.time())
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGKILL)
            broker.proc.wait()
            time.sleep(BROKER_DOWN_S)
            broker.start()
            print(f"  {t:7.0f} s: broker killed and restarted", flush=True)
        if t >= next_reload:
            next_reload += RELOAD_EVERY_S
            daemon.proc.send_signal(signal.SIGHUP)
        if daemon_kill_at and t >= daemon_kill_at:
            daemon_kill_at = 0.0
            daemon.proc.kill()
            daemon.proc.wait()
            daemon.log.close()
            daemon = DaemonProcess(config)
            restarted_at = time.time() - began
            print(f"  {t:7.0f} s: daemon killed with -9 and restarted", flush=True)
        time.sleep(0.2)
    sent = published.get()
    time.sleep(10.0)  # the last scores arrive
    metrics = daemon.metrics()
    daemon.stop()
    time.sleep(2.0)
    stop.set()
    got = collected.get()
    collector.join(10)
    broker.stop()

    rounds = sent["rounds"]
    seen = got["seen"][:, :rounds]
    sent_at = np.asarray(sent["sent_at"])
    missing = seen == 0
    near_kill = np.zeros(rounds, np.bool_)
    for k in broker_kills:
        near_kill |= (sent_at >= k - 2.0) & (sent_at <= k + BROKER_DOWN_S + BROKER_WINDOW_S)
    unseen_near = int(missing[:, near_kill].sum())
    lost = int(missing[:, ~near_kill].sum())
    twice = int((seen > 1).sum())
    alerts: dict[str, list[str]] = got["alerts"]
    paired = sum(1 for ev in alerts.values() if ev == ["raised", "cleared"])
    still_open = sum(1 for ev in alerts.values() if ev == ["raised"])
    unpaired = len(alerts) - paired - still_open

    def window(lo: float, hi: float) -> np.ndarray:
        rows = [s[1:] for s in samples if lo <= s[0] <= hi] or [samples[-1][1:]]
        return np.array(rows, dtype=np.float64).reshape(-1, 3)

    base = window(restarted_at + seconds / 12, restarted_at + seconds / 6)
    last = window(seconds * 11 / 12, seconds)
    all_rows = window(restarted_at + 30, seconds)
    print()
    print(machine_line())
    print(f"{rounds} rounds x {args.streams} streams = {rounds * args.streams} samples sent "
          f"(QoS 1) in {args.minutes:g} min; {len(broker_kills)} broker kills, 1 daemon kill -9, "
          f"{sent['hostile']} hostile messages, {len(sent['spikes'])} spikes")  # fmt: skip
    rows = []
    for i, name in enumerate(("RSS MB", "threads", "open files")):
        scale = 2**20 if i == 0 else 1
        b, e = base[:, i].mean() / scale, last[:, i].mean() / scale
        rows.append([name, f"{b:.1f}", f"{e:.1f}", f"{(e - b) / b * 100:+.1f} %",
                     f"{all_rows[:, i].min() / scale:.1f}",
                     f"{all_rows[:, i].max() / scale:.1f}"])  # fmt: skip
    print(table(["daemon (all processes)", "early", "last", "drift", "min", "max"], rows))
    print()
    counts = 'rnnsentry_messages_total{outcome="'
    print(table(["samples", "count"], [
        ["sent", rounds * args.streams],
        ["score never seen, sent away from any broker kill (lost)", lost],
        ["score never seen, sent within a broker kill's window (QoS 0 scores)", unseen_near],
        ["scored twice (redelivered after the daemon's kill -9)", twice],
        ["rejected by the last run (hostile)", int(metrics.get(f"{counts}rejected\"}}", 0))],
        ["dropped by the last run", int(metrics.get(f"{counts}dropped\"}}", 0))],
    ]))  # fmt: skip
    reasons = {k.split('"')[1]: int(v) for k, v in metrics.items()
               if k.startswith("rnnsentry_rejections_total{") and v}  # fmt: skip
    scored_last = int(metrics.get(counts + 'scored"}', 0))
    print(f"rejections of the last run by reason: {reasons}; scores seen "
          f"{int(got['seen'].sum())}, scored by the last run {scored_last}")  # fmt: skip
    print()
    print(table(["alert ids", "count"], [
        ["raised and cleared once each", paired],
        ["still open at the end", still_open],
        ["unpaired or repeated", unpaired],
    ]))  # fmt: skip
    if unpaired:
        print("unpaired:", {k: v for k, v in alerts.items()
                            if v not in (["raised", "cleared"], ["raised"])})  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
