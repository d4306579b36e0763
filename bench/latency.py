"""Latency at half the sustained rate, through a real mosquitto.

First a flood measures the sustained rate of the daemon (started in this process as
``Daemon``, with ``--workers`` scoring processes; its scored rate over the flood, the drain
of its queue included);
then a fresh daemon takes paced single-sample traffic at half that rate for 10,000 streams,
with gross anomalies injected into some streams. Reported: p50 / p99 / p99.9 of

- arrival -> decision, every message: from paho's receive stamp to the end of the batch's
  ``_step`` (our own timestamps; with scoring processes, which time their own decisions,
  interpolated within the decision-latency histogram's buckets);
- publish -> alert received, the injected anomalies: from the publisher's send to a
  separate subscriber process receiving the ``raised`` alert (same clock: one machine);
- publish -> decision of the same samples (the alert's ``decided_at``).

    .venv/bin/python bench/latency.py [--streams 10000] [--seconds 15] [--rate R]
        [--max-wait-ms 2] [--broker-nagle] [--wait-quiet-s 1200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from common import (
    SPAWN,
    T0,
    BrokerStats,
    Load,
    Publisher,
    add_broker_arguments,
    add_common_arguments,
    bench_model,
    broker_line,
    follow,
    load_note_at_end,
    machine_line,
    ms,
    percentiles,
    rate_text,
    start_broker,
    table,
    wait_quiet,
)

from detector.config import Config, build_config
from detector.daemon import Daemon
from detector.engine import Engine
from detector.stage import Pending

WARMUP_STEPS = 10  # so that 10,000 streams reach alerting age in a short run


class TimedDaemon(Daemon):
    """The daemon, noting when each batch's decisions are made (after the stage's step)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.latencies: list[np.ndarray] = []
        step = self.stage._step

        def timed_step(engine: Engine, p: Pending) -> None:
            step(engine, p)
            done = time.time()
            self.latencies.append(done - np.asarray(p.received, dtype=np.float64))

        self.stage._step = timed_step  # type: ignore[method-assign]


def make_daemon(
    model: Any, url: str, instance: str, streams: int, max_wait_ms: float = 2.0,
    workers: int = -1,
) -> Daemon:  # fmt: skip
    config, problems = build_config(
        {
            "daemon": {"instance": instance, "log_level": "WARNING", "workers": workers},
            "mqtt": {"broker": url},
            "models": [{"path": str(model), "topics": ["sensors/{stream}"]}],
            "metrics": {"enabled": False},
            "scoring": {"warmup_steps": WARMUP_STEPS},
            "streams": {"max_streams": max(100_000, streams)},
            "batch": {"max_wait_ms": max_wait_ms},
        }
    )
    assert not problems, problems
    # Scored in this process, each batch's decisions are timed; in scoring processes, the
    # decision-latency histogram they report is what there is.
    daemon = TimedDaemon(config) if workers == 0 else Daemon(config)
    daemon.start()
    deadline = time.monotonic() + 30
    while not (daemon.link and daemon.link.connected.is_set()):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not connect")
        time.sleep(0.05)
    time.sleep(0.3)  # the subscription is made in on_connect; let SUBACK arrive
    return daemon


def counts(daemon: Daemon) -> tuple[int, int, int]:
    """(messages counted whatever their outcome, scored, counted or queued)."""
    get = daemon.metrics.value  # every process's
    values = {
        o: int(get("rnnsentry_messages_total", {"outcome": o}) or 0)
        for o in ("scored", "rejected", "dropped")
    }
    done = sum(values.values())
    return done, values["scored"], done + len(daemon.inbox)


def histogram_quantiles(daemon: Daemon, qs: tuple[float, ...] = (50, 99, 99.9)) -> list[float]:
    """Quantiles of arrival -> decision from the daemon's histogram, linear within a bucket
    (scoring processes time their own decisions; only the buckets come back)."""
    name = "rnnsentry_decision_latency_seconds"
    total = daemon.metrics.value(name + "_count") or 0.0
    bounds = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    cumulative = [daemon.metrics.value(name + "_bucket", {"le": str(b)}) or 0.0 for b in bounds]
    out = []
    for q in qs:
        want, lo, below = total * q / 100.0, 0.0, 0.0
        value = math.nan
        for bound, count in zip(bounds, cumulative, strict=True):
            if count >= want and total:
                share = (want - below) / max(count - below, 1e-12)
                value = lo + share * (bound - lo)
                break
            lo, below = bound, count
        out.append(value)
    return out


def _alerts_main(port: int, ready: Any, stop: Any, out: Any) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[tuple[str, float, float, float]] = []

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        doc = json.loads(msg.payload)
        if doc.get("event") == "raised":
            got.append((doc["stream"], float(doc["ts"]), float(doc["decided_at"]), now))

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-alerts-{os.getpid()}"
    )
    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.on_connect = lambda c, *a: c.subscribe("rnnsentry/alerts/#", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    out.put(got)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000, help="(%(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="length of the paced run (%(default)s)"
    )
    parser.add_argument(
        "--flood",
        type=int,
        default=200_000,
        help="messages of the flood that finds the sustained rate (%(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="paced rate, messages/s (default: half the measured sustained rate)",
    )
    parser.add_argument("--anomalies", type=int, default=300, help="(%(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="batch.max_wait_ms")
    parser.add_argument(
        "--workers", type=int, default=-1, help="[daemon] workers (%(default)s: the default)"
    )
    add_common_arguments(parser)
    add_broker_arguments(parser)
    args = parser.parse_args(argv)

    note = wait_quiet(args.wait_quiet_s) if args.wait_quiet_s > 0 else ""
    model = bench_model("gru", 64, 8)
    began = time.monotonic()
    print(f"latency: {machine_line(note)}")
    print(
        f"model: gru 1x64, 8 features; daemon started here, [daemon] workers {args.workers}"
        f" (batch.max 512, max_wait"
        f" {args.max_wait_ms:g} ms);"
        " publisher: one process, raw MQTT QoS 0; alerts: QoS 1 to a separate"
        " subscriber process\n"
    )
    broker = start_broker(nodelay=not args.broker_nagle)
    print(broker_line(not args.broker_nagle) + "\n")
    stats = BrokerStats(broker.port)
    n = args.streams
    try:
        sustained = math.nan
        if args.rate <= 0:
            daemon = make_daemon(model, broker.url, "lat-flood", n, args.max_wait_ms,
                                 args.workers)  # fmt: skip
            flood = Load(streams=n, rounds=max(3, args.flood // n))
            pub = Publisher(broker.port, flood)
            pub.go()
            # Its scored rate from 10 % to 90 % of the flood's messages, the drain of the
            # queue included: about the rate it keeps up with when paced (the paced runs of
            # bench/throughput.py); while a flood comes in, paho's thread takes most of the
            # GIL and the worker scores less than that (a receive livelock).
            progress = follow(lambda: counts(daemon), flood.samples)
            sustained = progress.rate(until_intake=False)
            pub.result()
            daemon.stop()
            rate = sustained / 2
        else:
            rate = args.rate
        rounds = max(WARMUP_STEPS + 5, math.ceil(rate * args.seconds / n))
        first = WARMUP_STEPS + 2
        step = max(1, n // args.anomalies)
        inject = tuple(
            (k, first + (j % (rounds - first))) for j, k in enumerate(range(0, n, step))
        )[: args.anomalies]
        load = Load(streams=n, rounds=rounds, inject=inject)

        ready, stop, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
        listener = SPAWN.Process(
            target=_alerts_main, args=(broker.port, ready, stop, out), daemon=True
        )
        listener.start()
        ready.wait(30)
        before = stats.snapshot()
        daemon = make_daemon(model, broker.url, "lat-paced", n, args.max_wait_ms,
                             args.workers)  # fmt: skip
        pub = Publisher(broker.port, load, rate=rate, chunk_messages=max(1, int(rate / 1000)))
        pub.go()
        progress = follow(lambda: counts(daemon), load.samples, settle_s=3.0)
        sent = pub.result()
        time.sleep(1.0)  # the last alerts in flight
        stop.set()
        alerts = out.get(timeout=30)
        listener.join(10)
        daemon.stop()
        after = stats.snapshot()
    finally:
        stats.close()
        broker.stop()

    timed = isinstance(daemon, TimedDaemon)
    arrival = np.concatenate(daemon.latencies) if timed and daemon.latencies else np.empty(0)
    send_at = {(k, T0 + r): t for (k, r), t in sent["sent_at"].items()}
    e2e, to_decision = [], []
    for stream, ts, decided, received in alerts:
        key = (int(stream[1:]), ts)
        if key in send_at:
            e2e.append(received - send_at.pop(key))
            to_decision.append(decided - (received - e2e[-1]))
    hist = daemon.metrics.value
    under10 = (hist("rnnsentry_decision_latency_seconds_bucket", {"le": "0.01"}) or 0) / max(
        hist("rnnsentry_decision_latency_seconds_count") or 1, 1
    )
    m = {
        o: int(daemon.metrics.value("rnnsentry_messages_total", {"outcome": o}) or 0)
        for o in ("scored", "dropped")
    }
    broker_dropped = after.get("dropped", 0) - before.get("dropped", 0)
    published = load.messages / max(sent["ended"] - sent["began"], 1e-9)
    print(
        table(
            ["measure", "value"],
            [
                (
                    "sustained rate (flood, this daemon)",
                    f"{rate_text(sustained)} messages/s",
                ),
                (
                    "paced rate asked / achieved by the publisher",
                    f"{rate_text(rate)} / {rate_text(published)} messages/s",
                ),
                ("streams, messages", f"{n:,}, {load.messages:,}"),
                (
                    "scored, dropped by the daemon, broker dropped",
                    f"{m['scored']:,}, {m['dropped']:,}, {broker_dropped:,}",
                ),
                ("scored /s during the paced run", rate_text(progress.rate())),
                ("injected anomalies, raised alerts matched", f"{len(inject)}, {len(e2e)}"),
                ("histogram: share of decisions within 10 ms", f"{under10:.2%}"),
            ],
        )
    )
    print()
    rows = []
    if not timed:
        p50, p99, p999 = histogram_quantiles(daemon)
        count = int(hist("rnnsentry_decision_latency_seconds_count") or 0)
        rows.append(("arrival -> decision (every message; from the histogram's buckets)",
                     f"{count:,}", ms(p50), ms(p99), ms(p999), "-"))  # fmt: skip
    for name, values in (
        *((("arrival -> decision (every message)", arrival),) if timed else ()),
        ("publish -> decision (injected anomalies)", np.asarray(to_decision)),
        ("publish -> alert received (injected anomalies)", np.asarray(e2e)),
    ):
        p50, p99, p999 = percentiles(values)
        worst = float(values.max()) if len(values) else math.nan
        rows.append((name, f"{len(values):,}", ms(p50), ms(p99), ms(p999), ms(worst)))
    print(table(["latency (ms)", "samples", "p50", "p99", "p99.9", "max"], rows))
    p99 = percentiles(arrival)[1] if timed else histogram_quantiles(daemon)[1]
    print(
        f"\ntarget p99 arrival -> decision < 10 ms: {'met' if p99 < 0.010 else 'NOT met'}"
        f" ({ms(p99)} ms)"
    )
    print(f"wall time {time.monotonic() - began:.0f} s; " + load_note_at_end())
    return 0


if __name__ == "__main__":
    sys.exit(main())
