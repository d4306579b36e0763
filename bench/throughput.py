"""Throughput through a real mosquitto: a publisher process floods single-sample JSON
payloads (QoS 0) for N streams while ``python -m detector run`` scores them with a GRU of
hidden size 64 and 8 features. In the same run, for reference: a bare paho-mqtt subscriber
that only counts (the ceiling of MQTT ingestion in Python here); at 10,000 streams the
daemon paced at 80 % of that ceiling (the target: no drops), the same with batching off
(``batch.max = 1``) and with ``batch.max_wait_ms = 5``; then the batch payload form (100
samples a message, ``batch.max_wait_ms = 50``; values named, then as lists). A rate is the
slope between 10 % and 90 % of a run's count, cut short where the intake (messages taken
off the socket) was complete: after that a daemon only drains its queue. Drops: the
daemon's (``rnnsentry_messages_total{outcome="dropped"}``), messages missing, and the
broker's own counter ($SYS). Prints markdown; not a test.

    .venv/bin/python bench/throughput.py [--streams 1000,10000,100000] [--messages 300000]
        [--batch-samples 100] [--batch-wait-ms 50] [--wait-quiet-s 1200] [--broker-nagle]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
from common import (
    BareSubscriber,
    BrokerStats,
    DaemonProcess,
    Load,
    Publisher,
    add_broker_arguments,
    add_common_arguments,
    bench_model,
    broker_line,
    daemon_config,
    follow,
    load_note_at_end,
    machine_line,
    rate_text,
    start_broker,
    table,
    wait_quiet,
)

RUNS = [0]  # a distinct client id per daemon run, so no session carries over


def broker_delta(stats: BrokerStats, before: dict[str, int]) -> tuple[dict[str, int], int]:
    after = stats.snapshot()
    return after, after.get("dropped", 0) - before.get("dropped", 0)


def run_bare(
    port: int, stats: BrokerStats, before: dict[str, int], load: Load, protocol: int = 5
) -> tuple[dict[str, Any], dict[str, int]]:
    sub = BareSubscriber(port, protocol)
    pub = Publisher(port, load)
    pub.go()
    progress = follow(sub.received, load.messages)
    sent = pub.result()
    sub.stop()
    after, dropped = broker_delta(stats, before)
    return {
        "rate": progress.rate(),
        "handled": progress.final,
        "missing": load.messages - progress.final,
        "broker_dropped": dropped,
        "publish_rate": load.messages / max(sent["ended"] - sent["began"], 1e-9),
    }, after


def run_daemon(
    model: Any,
    broker_url: str,
    port: int,
    stats: BrokerStats,
    before: dict[str, int],
    load: Load,
    batch_max: int,
    rate: float = 0.0,
    max_wait_ms: float = 2.0,
    workers: int = -1,
) -> tuple[dict[str, Any], dict[str, int]]:
    RUNS[0] += 1
    config = daemon_config(
        model,
        broker_url,
        f"bench{RUNS[0]}",
        batch_max=batch_max,
        max_streams=max(200_000, load.streams),
        batch={"max_wait_ms": max_wait_ms},
        daemon={"workers": workers},
    )
    daemon = DaemonProcess(config)
    try:
        chunk = max(1, int(rate / 1000)) if rate else 500  # paced: a write a millisecond
        pub = Publisher(port, load, rate=rate, chunk_messages=chunk)
        pub.go()
        progress = follow(lambda: daemon.handled(load.per_message), load.samples, settle_s=3.0)
        sent = pub.result()
        m = daemon.metrics()
    finally:
        daemon.stop()
    after, dropped = broker_delta(stats, before)

    def get(name: str, outcome: str | None = None) -> float:
        return m.get(name + (f'{{outcome="{outcome}"}}' if outcome else ""), 0.0)

    batches = get("rnnsentry_batch_size_count")
    steps = get("rnnsentry_batch_size_sum")
    return {
        "rate": progress.rate(),
        "scored_final": progress.final,
        "scored": int(get("rnnsentry_messages_total", "scored")),
        "rejected": int(get("rnnsentry_messages_total", "rejected")),
        "dropped": int(get("rnnsentry_messages_total", "dropped")),
        "missing": load.samples
        - int(
            get("rnnsentry_messages_total", "scored")
            + get("rnnsentry_messages_total", "rejected")
            + get("rnnsentry_messages_total", "dropped")
        ),
        "broker_dropped": dropped,
        "publish_rate": load.messages / max(sent["ended"] - sent["began"], 1e-9),
        "mean_batch": steps / batches if batches else math.nan,
        "infer_per_step_s": get("rnnsentry_inference_seconds_sum") / steps if steps else math.nan,
        "latency_mean_s": (
            get("rnnsentry_decision_latency_seconds_sum")
            / max(get("rnnsentry_decision_latency_seconds_count"), 1)
        ),
    }, after


def paired_rounds(
    model: Any, load: Load, rounds: int, workers: list[int], nodelay: bool
) -> list[list[object]]:
    """The issue's protocol: two brokers; in each round a bare subscriber takes a raw
    pre-encoded flood on one and the daemon (each ``workers`` setting) the same flood on the
    other, the brokers swapping roles every round; the median of the rounds' ratios."""
    brokers = [start_broker(nodelay=nodelay), start_broker(nodelay=nodelay)]
    stats = [BrokerStats(b.port) for b in brokers]
    snaps = [st.snapshot() for st in stats]
    ratios: dict[int, list[float]] = {w: [] for w in workers}
    rates: dict[int, list[float]] = {w: [] for w in workers}
    lost: dict[int, int] = dict.fromkeys(workers, 0)
    bare_rates: list[float] = []
    try:
        for r in range(rounds):
            a, b = r % 2, 1 - r % 2
            bare, snaps[a] = run_bare(brokers[a].port, stats[a], snaps[a], load)
            bare_rates.append(bare["rate"])
            for w in workers:
                got, snaps[b] = run_daemon(model, brokers[b].url, brokers[b].port, stats[b],
                                           snaps[b], load, 512, workers=w)  # fmt: skip
                ratios[w].append(got["rate"] / bare["rate"])
                rates[w].append(got["rate"])
                lost[w] += got["dropped"] + got["missing"]
    finally:
        for st in stats:
            st.close()
        for broker in brokers:
            broker.stop()
    rows: list[list[object]] = []
    for w in workers:
        what = {-1: "default (one per core but one)", 0: "none (one process)"}.get(w, str(w))
        rows.append([
            f"daemon, scoring processes: {what}", f"{load.streams:,}",
            rate_text(float(np.median(bare_rates))), rate_text(float(np.median(rates[w]))),
            f"**{np.median(ratios[w]):.2f}**", ", ".join(f"{x:.2f}" for x in ratios[w]),
            f"{lost[w]:,}",
        ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--streams", default="1000,10000,100000", help="stream counts (%(default)s)"
    )
    parser.add_argument(
        "--messages", type=int, default=300_000, help="messages per run, about (%(default)s)"
    )
    parser.add_argument(
        "--off-messages", type=int, default=60_000, help="for batching off (%(default)s)"
    )
    parser.add_argument(
        "--target-share",
        type=float,
        default=0.8,
        help="the paced run's rate as a share of the bare subscriber's (%(default)s)",
    )
    parser.add_argument("--batch-samples", type=int, default=100, help="(%(default)s)")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=50.0,
        help="batch.max_wait_ms for the batch-payload runs: a message of 100 samples already"
        " waited 100 sample intervals, and a longer wait gathers more streams into each"
        " onnxruntime call (%(default)s)",
    )
    parser.add_argument("--batch-streams", type=int, default=2000, help="(%(default)s)")
    parser.add_argument(
        "--batch-total", type=int, default=1_000_000, help="batch-payload samples (%(default)s)"
    )
    parser.add_argument(
        "--batch-rates",
        default="300000,500000",
        help="paced batch-payload runs, samples/s (%(default)s)",
    )
    parser.add_argument(
        "--reference-streams",
        type=int,
        default=10_000,
        help="where the paced and batching-off runs happen (%(default)s)",
    )
    parser.add_argument(
        "--long-wait-ms",
        type=float,
        default=5.0,
        help="max_wait of the run that shows what longer waits (larger batches) give",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="paired rounds of the flood (%(default)s)"
    )
    parser.add_argument(
        "--workers",
        default="-1,0",
        help="[daemon] workers settings of the paired rounds (%(default)s)",
    )
    parser.add_argument(
        "--paired-only", action="store_true", help="only the paired rounds, then stop"
    )
    parser.add_argument(
        "--paired-model",
        default="lstm,32",
        metavar="CELL,HIDDEN",
        help="the paired rounds' model, over 8 features: `rnnsentry train`'s default shape"
        " (%(default)s)",
    )
    add_common_arguments(parser)
    add_broker_arguments(parser)
    args = parser.parse_args(argv)
    stream_counts = [int(s) for s in args.streams.split(",")]

    note = wait_quiet(args.wait_quiet_s) if args.wait_quiet_s > 0 else ""
    model = bench_model("gru", 64, 8)
    began = time.monotonic()
    print(f"throughput: {machine_line(note)}")
    print(
        "model: gru 1x64, 8 features; daemon: `python -m detector run`, batch.max 512,"
        " max_wait 2 ms, 1 intra-op thread; publisher: one process, raw MQTT 3.1.1 QoS 0;"
        " bare subscriber: paho 2 MQTTv5, subscription QoS 1, on_message only counts."
        " flood: as fast as the socket takes it; paced: at a fixed rate.\n"
    )

    load = Load(streams=args.reference_streams,
                rounds=max(3, math.ceil(args.messages / args.reference_streams)))  # fmt: skip
    workers = [int(w) for w in args.workers.split(",") if w]
    cell, hidden = args.paired_model.split(",")
    paired_model = bench_model(cell, int(hidden), 8)
    paired = paired_rounds(paired_model, load, args.rounds, workers, not args.broker_nagle)
    print(f"paired rounds: {args.rounds}, single-sample JSON flood, two brokers, {cell} 1x"
          f"{hidden} over 8 features, default settings; the median of the rounds' daemon /"
          " bare ratios (target 0.8, aim 1.0)\n")  # fmt: skip
    print(table(["run", "streams", "bare /s (median)", "scored /s (median)", "vs bare (median)",
                 "per round", "dropped + missing"], paired))  # fmt: skip
    print()
    if args.paired_only:
        print(f"wall time {time.monotonic() - began:.0f} s; " + load_note_at_end())
        return 0

    broker = start_broker(nodelay=not args.broker_nagle)
    print(broker_line(not args.broker_nagle) + "\n")
    stats = BrokerStats(broker.port)
    rows: list[list[object]] = []
    ratios: dict[int, dict[str, Any]] = {}
    url, port = broker.url, broker.port
    try:
        snap = stats.snapshot()
        for n in stream_counts:
            load = Load(streams=n, rounds=max(3, math.ceil(args.messages / n)))
            bare, snap = run_bare(port, stats, snap, load)
            on, snap = run_daemon(model, url, port, stats, snap, load, 512)
            entry = {"bare": bare, "on": on}
            rows.append(_row("bare paho subscriber, flood", n, load, bare, None))
            rows.append(_row("daemon, flood", n, load, on, bare))
            if n == args.reference_streams:
                rate = args.target_share * bare["rate"]
                paced, snap = run_daemon(model, url, port, stats, snap, load, 512, rate=rate)
                name = f"daemon, paced at {args.target_share:.0%} of bare"
                rows.append(_row(name, n, load, paced, bare))
                off_load = Load(streams=n, rounds=max(2, math.ceil(args.off_messages / n)))
                off, snap = run_daemon(model, url, port, stats, snap, off_load, 1, rate=rate)
                name = f"daemon, batching off (batch.max 1), paced at {args.target_share:.0%}"
                rows.append(_row(name, n, off_load, off, bare))
                w = args.long_wait_ms
                long, snap = run_daemon(
                    model, url, port, stats, snap, load, 512, rate=rate, max_wait_ms=w
                )
                name = f"daemon, batch.max_wait_ms {w:g}, paced at {args.target_share:.0%}"
                rows.append(_row(name, n, load, long, bare))
                entry.update(paced=paced, off=off, paced_rate=rate, long=long)
            ratios[n] = entry
        per = args.batch_samples
        rounds = max(per, args.batch_total // args.batch_streams // per * per)
        bload = Load(streams=args.batch_streams, per_message=per, rounds=rounds)
        bw = args.batch_wait_ms
        batch, snap = run_daemon(model, url, port, stats, snap, bload, 512, max_wait_ms=bw)
        name = f"daemon, {per} samples a message, named values, max_wait {bw:g} ms, flood"
        rows.append(_row(name, bload.streams, bload, batch, None))
        # "values" as lists in feature order: half the bytes, and less JSON to decode
        bload = Load(streams=args.batch_streams, per_message=per, rounds=rounds, named=False)
        batch_list, snap = run_daemon(model, url, port, stats, snap, bload, 512, max_wait_ms=bw)
        name = f"daemon, {per} samples a message, values as lists, max_wait {bw:g} ms, flood"
        rows.append(_row(name, bload.streams, bload, batch_list, None))
        paced_batches = []
        for samples_per_s in (int(r) for r in args.batch_rates.split(",") if r):
            got, snap = run_daemon(
                model, url, port, stats, snap, bload, 512, rate=samples_per_s / per, max_wait_ms=bw
            )
            name = f"daemon, {per} samples a message, values as lists, paced at"
            name += f" {samples_per_s:,} samples/s, max_wait {bw:g} ms"
            rows.append(_row(name, bload.streams, bload, got, None))
            paced_batches.append((samples_per_s, got))
    finally:
        stats.close()
        broker.stop()

    heads = [
        "run",
        "streams",
        "messages (samples)",
        "published /s",
        "**scored /s** (bare: received)",
        "vs bare",
        "daemon dropped",
        "missing",
        "broker dropped",
        "mean batch",
        "ORT µs/step",
        "mean latency ms",
    ]
    print(table(heads, rows))
    print()
    summary = []
    for n, e in ratios.items():
        bare, on = e["bare"], e["on"]
        summary.append(
            (
                f"{n:,} streams, flood: daemon / bare subscriber",
                f"{on['rate'] / bare['rate']:.0%}",
                f"scored while the flood came in; dropped {on['dropped']:,}, missing"
                f" {on['missing']:,} (the backlog waits in the broker: a due batch is scored"
                " before more is read)",
            )
        )
        if "paced" in e:
            paced = e["paced"]
            clean = paced["dropped"] == 0 and paced["missing"] == 0 and paced["rejected"] == 0
            kept_up = paced["rate"] >= 0.97 * e["paced_rate"]
            summary.append(
                (
                    f"{n:,} streams, paced at {args.target_share:.0%} of bare"
                    f" ({rate_text(e['paced_rate'])}/s)",
                    f"{paced['rate'] / bare['rate']:.0%}",
                    f"scored {rate_text(paced['rate'])}/s, dropped {paced['dropped']:,}, missing"
                    f" {paced['missing']:,}: target >= 80 % with no drops"
                    f" {'met' if clean and kept_up else 'NOT met'}",
                )
            )
            long = e["long"]
            summary.append(
                (
                    f"{n:,} streams, paced, max_wait {args.long_wait_ms:g} ms: daemon / bare",
                    f"{long['rate'] / bare['rate']:.0%}",
                    f"mean batch {long['mean_batch']:.0f} (2 ms: {paced['mean_batch']:.0f}),"
                    " dropped"
                    f" {long['dropped']:,}, mean decision latency"
                    f" {long['latency_mean_s'] * 1e3:.1f} ms",
                )
            )
            off = e["off"]
            summary.append(
                (
                    f"{n:,} streams: batching on / off (both paced at"
                    f" {args.target_share:.0%} of bare)",
                    f"{paced['rate'] / off['rate']:.1f}x",
                    f"on {rate_text(paced['rate'])}/s, off {rate_text(off['rate'])}/s",
                )
            )
            ingest_s = 1.0 / bare["rate"]
            step_s = paced["infer_per_step_s"]
            summary.append(
                (
                    f"{n:,} streams: ORT per step / ingestion per message, in the daemon",
                    f"{step_s / ingest_s:.1%}",
                    f"{step_s * 1e6:.2f} µs at mean batch {paced['mean_batch']:.0f} (paced; the"
                    " timer around the call also holds the wait to take the GIL back) vs"
                    f" {ingest_s * 1e6:.1f} µs a message (bare)",
                )
            )
            alone_s = ort_step_s(model, 512)
            summary.append(
                (
                    f"{n:,} streams: ORT per step / ingestion per message, ORT alone",
                    f"{alone_s / ingest_s:.1%}",
                    f"{alone_s * 1e6:.2f} µs a step at batch 512 (`LoadedModel.step`, this"
                    f" process); target < 5 %: {'met' if alone_s / ingest_s < 0.05 else 'NOT met'}",
                )
            )
    for form, got in (("named values", batch), ("values as lists", batch_list)):
        summary.append(
            (
                f"batch payloads ({form}), flood: samples scored /s",
                rate_text(got["rate"]),
                f"scored while the flood came in; dropped {got['dropped']:,}",
            )
        )
    for samples_per_s, got in paced_batches:
        kept_up = got["rate"] >= 0.97 * samples_per_s and got["dropped"] == 0
        verdict = "kept up" if kept_up else "fell behind"
        summary.append(
            (
                f"batch payloads (values as lists), paced at {samples_per_s:,} samples/s",
                rate_text(got["rate"]),
                f"{verdict} (dropped {got['dropped']:,}, mean decision latency"
                f" {got['latency_mean_s'] * 1e3:.0f} ms); target >= 300,000, aim 500,000",
            )
        )
    print(table(["ratio", "value", "note"], summary))
    print(f"\nwall time {time.monotonic() - began:.0f} s; " + load_note_at_end())
    return 0


def ort_step_s(model: Any, batch: int, seconds: float = 0.5) -> float:
    """Seconds a step of ``model.step`` at this batch size, best of a few rounds."""
    import numpy as np

    from detector.model import LoadedModel

    loaded = LoadedModel.load(model)
    x = np.random.default_rng(0).normal(size=(batch, loaded.meta.n_features))
    states = loaded.zero_states(batch)
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(20):
            loaded.step(x, states)
        best = min(best, (time.perf_counter() - t0) / 20 / batch)
    return best


def _row(
    name: str, n: int, load: Load, r: dict[str, Any], bare: dict[str, Any] | None
) -> list[object]:
    vs = f"{r['rate'] / bare['rate']:.0%}" if bare and bare["rate"] else "-"
    msgs = f"{load.messages:,}" + (f" ({load.samples:,})" if load.per_message > 1 else "")
    return [
        name,
        f"{n:,}",
        msgs,
        rate_text(r["publish_rate"]),
        f"**{rate_text(r['rate'])}**",
        vs,
        f"{r['dropped']:,}" if "dropped" in r else "-",
        f"{r['missing']:,}",
        f"{r['broker_dropped']:,}",
        f"{r['mean_batch']:.0f}" if "mean_batch" in r else "-",
        f"{r['infer_per_step_s'] * 1e6:.2f}" if "infer_per_step_s" in r else "-",
        f"{r['latency_mean_s'] * 1e3:.1f}" if "latency_mean_s" in r else "-",
    ]


if __name__ == "__main__":
    sys.exit(main())
