"""``rnnsentry demo``: the whole path on one machine in about a minute.

Generates a synthetic pump fleet, trains a small GRU on normal data, starts a
local mosquitto (or uses ``--broker``) and the daemon, replays the fleet in real
time with injected anomalies, prints alerts as they are raised and cleared, and
ends with a summary of what was caught. Without mosquitto it says what to install.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from detector.artifact import ModelMeta
from detector.config import build_config
from detector.daemon import Daemon
from detector.errors import RnnsentryError
from training.demo.localbroker import INSTALL_HINT, Mosquitto, find_mosquitto, free_port
from training.evaluation.evaluate import first_raise

if TYPE_CHECKING:
    from training.evaluation.synth import Fleet

TRAIN_STEPS = 1200  # per pump: five compressed "days" of normal operation
PERIOD_STEPS = 240
LEAD_STEPS = 30  # normal steps before the anomalies' margin ...
MARGIN_STEPS = 15  # ... after which the first may start
GRACE_STEPS = 30  # an alert raised this soon after an anomaly ends is late, not a false one


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=60.0, help="seconds of live replay")
    p.add_argument("--streams", type=int, default=20, help="pumps in the fleet (4 sensors each)")
    p.add_argument("--rate", type=float, default=10.0, help="samples per second per pump")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--broker", metavar="mqtt://HOST:PORT", help="use this broker, start none")
    p.add_argument("--work-dir", metavar="DIR", help="where the model goes (default: a temp dir)")


@dataclass
class _Seen:
    stream: str
    event: str
    ts: float
    step: int
    likelihood: float
    top: str


def _say(text: str) -> None:
    print(text, flush=True)


def train_demo_model(
    seed: int, streams: int, interval_s: float, path: Path,
    say: Callable[[str], None] | None = None,
) -> ModelMeta:  # fmt: skip
    """The demo's model: a GRU (hidden 32, the default schedule) trained on the normal
    history of the fleet's first pumps (at most eight), written to ``path``."""
    from training.evaluation.synth import generate_fleet
    from training.trainer import fit_and_export
    from training.trainer.train import TrainOptions

    n_train = min(streams, 8)
    history = generate_fleet(
        n_streams=n_train,
        n_steps=TRAIN_STEPS,
        period_steps=PERIOD_STEPS,
        interval_s=interval_s,
        seed=seed,
        anomalies=0,
    )
    if say is not None:
        say(
            f"[demo] training a GRU on {n_train} pumps x {TRAIN_STEPS} steps x "
            f"{len(history.features)} sensors ({', '.join(history.features)}) ..."
        )
    options = TrainOptions(cell="gru", hidden_size=32, seed=seed)  # the default schedule
    meta: ModelMeta = fit_and_export(
        list(history.values),
        list(history.features),
        path,
        options,
        sample_interval_s=interval_s,
        name="demo-pumps",
        quiet=True,
    )
    return meta


def live_fleet(
    seed: int, streams: int, duration_s: float, rate: float, lead: int = LEAD_STEPS
) -> Fleet:
    """The live fleet: the pumps continuing where the history ended, with anomalies injected
    (one for every two pumps, at least four), the first MARGIN_STEPS after ``lead``."""
    from training.evaluation.synth import generate_fleet

    steps = max(int(duration_s * rate), lead + 20)
    return generate_fleet(
        n_streams=streams,
        n_steps=steps,
        period_steps=PERIOD_STEPS,
        interval_s=1.0 / rate,
        start_step=TRAIN_STEPS,
        seed=seed,
        anomalies=max(1, min(streams, max(4, streams // 2))),
        min_start=lead + MARGIN_STEPS,
        min_gap=GRACE_STEPS,
    )


def run_demo(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.rate <= 0 or args.streams < 1:
        raise SystemExit("rnnsentry demo: --duration, --rate and --streams must be positive")
    if not args.broker and find_mosquitto() is None:  # said before training, in one line
        raise RnnsentryError(f"the demo needs mosquitto (or --broker URL): {INSTALL_HINT}")
    logging.getLogger("detector").setLevel(logging.WARNING)
    interval = 1.0 / args.rate
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rnnsentry-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    # 1. Normal history, and a small GRU trained on it.
    model_path = work / "pumps.onnx"
    meta = train_demo_model(args.seed, args.streams, interval, model_path, say=_say)
    _say(
        f"[demo] model {model_path} (fingerprint {meta.fingerprint}) trained in "
        f"{time.monotonic() - started:.1f} s"
    )

    # 2. The live fleet continues where the history ended, with anomalies injected.
    live = live_fleet(args.seed, args.streams, args.duration, args.rate)

    # 3. Broker, daemon, and a client that watches the alerts.
    broker: Mosquitto | None = None
    if args.broker:
        broker_url = args.broker
    else:
        broker = Mosquitto().start()
        broker_url = broker.url
        _say(f"[demo] mosquitto on {broker_url}")
    metrics_port = args.metrics_port or free_port()
    config, problems = build_config(
        {
            "daemon": {"instance": "demo"},
            "mqtt": {"broker": broker_url, "client_id": f"rnnsentry-demo-{metrics_port}"},
            "models": [{"path": str(model_path), "topics": ["demo/pumps/{stream}"]}],
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        }
    )
    if problems:
        raise SystemExit("rnnsentry demo: " + "; ".join(problems))
    daemon = Daemon(config)
    alerts: queue.Queue[dict[str, Any]] = queue.Queue()
    client = _client(broker_url, alerts)
    try:
        daemon.start()
        _wait_ready(daemon)
        _say(f"[demo] daemon up; metrics at http://127.0.0.1:{metrics_port}/metrics")
        _say(
            f"[demo] replaying {args.streams} pumps at {args.rate:g} Hz for "
            f"{live.values.shape[1] * interval:.0f} s with {len(live.anomalies)} injected anomalies"
        )
        t0 = time.time()
        seen = _replay(client, live, interval, alerts, t0)
        time.sleep(0.5)
        seen.extend(_drain(alerts, interval, t0))
        # every process's counts (the scoring processes report theirs)
        scored = daemon.metrics.value("rnnsentry_messages_total", {"outcome": "scored"})
        rejected = daemon.metrics.value("rnnsentry_messages_total", {"outcome": "rejected"})
    finally:
        client.disconnect()
        client.loop_stop()
        daemon.stop()
        if broker is not None:
            broker.stop()
    _summary(live, seen, scored or 0, rejected or 0, metrics_port, time.monotonic() - started)
    return 0


def _client(url: str, alerts: queue.Queue[dict[str, Any]]) -> paho.Client:
    host_port = url.split("://", 1)[-1]
    host, _, port = host_port.partition(":")
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    ready: queue.Queue[bool] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("rnnsentry/alerts/#", qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: ready.put(True)
    client.on_message = lambda c, u, m: alerts.put(json.loads(m.payload))
    client.connect(host, int(port or 1883))
    client.loop_start()
    ready.get(timeout=10)
    return client


def _wait_ready(daemon: Daemon, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not daemon.ready()[0]:
        if time.monotonic() > deadline:
            raise SystemExit(f"rnnsentry demo: the daemon is not ready: {daemon.ready()[1]}")
        time.sleep(0.05)


def _replay(
    client: paho.Client, live: Any, interval: float, alerts: queue.Queue[dict[str, Any]], t0: float
) -> list[_Seen]:
    """Publish every pump's sample of each step, one step per interval of wall time."""
    seen: list[_Seen] = []
    n_streams, n_steps, _ = live.values.shape
    names = [f"pump-{i + 1:02d}" for i in range(n_streams)]
    wall0 = time.monotonic()
    for t in range(n_steps):
        ts = round(t0 + t * interval, 3)
        for s in range(n_streams):
            values = dict(
                zip(live.features, (round(float(v), 4) for v in live.values[s, t]), strict=True)
            )
            client.publish(f"demo/pumps/{names[s]}", json.dumps({"ts": ts, "values": values}), 1)
        seen.extend(_drain(alerts, interval, t0))
        delay = wall0 + (t + 1) * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return seen


def _drain(alerts: queue.Queue[dict[str, Any]], interval: float, t0: float) -> list[_Seen]:
    """Print and collect the alerts received so far; ``step`` counts from ``t0``."""
    out: list[_Seen] = []
    while True:
        try:
            doc = alerts.get_nowait()
        except queue.Empty:
            return out
        step = round((doc["ts"] - t0) / interval)
        # The sensors that make up the alert's average (their share of it), and their error now.
        top = ", ".join(
            f"{f['feature']} {100 * f['share']:.0f} % ({f['std_error']:+.1f}σ)"
            for f in doc["top_features"][:2]
        )
        item = _Seen(doc["stream"], doc["event"], doc["ts"], step, doc["likelihood"], top)
        out.append(item)
        _say(
            f"  {item.event.upper():8s} {item.stream}  step {step:4d}  likelihood "
            f"{item.likelihood:.5f}  {top if item.event == 'raised' else ''}"
        )


@dataclass(frozen=True)
class _Verdict:
    """What the alerts did about one injected anomaly (steps [start, end), end exclusive)."""

    stream: str
    kind: str
    start: int
    end: int
    verdict: str  # "caught", "late" or "MISSED"
    steps: int | None  # caught: steps from its start to the raise; late: after its last step


def judge(anomalies: list[Any], raised: list[_Seen]) -> tuple[list[_Verdict], int]:
    """Per anomaly, the first alert raised on its stream inside it (caught), else the first
    raised within GRACE_STEPS after its last step (late), else MISSED; and the false alerts:
    raises inside no anomaly nor its grace. An alert raised before an anomaly starts, even
    one still active through it, does not catch it.

    >>> from types import SimpleNamespace as A
    >>> seen = [_Seen("pump-01", "raised", 0.0, s, 1.0, "") for s in (5, 12, 24, 90)]
    >>> verdicts, false = judge([A(stream=0, kind="spike", start=10, end=13),
    ...                          A(stream=0, kind="drift", start=20, end=22)], seen)
    >>> [(v.verdict, v.steps) for v in verdicts], false
    ([('caught', 2), ('late', 3)], 2)
    """
    verdicts: list[_Verdict] = []
    matched: set[int] = set()  # raises inside an anomaly or its grace
    for a in anomalies:
        stream = f"pump-{a.stream + 1:02d}"
        last = a.end - 1
        mine = [(i, s.step) for i, s in enumerate(raised) if s.stream == stream]
        matched.update(i for i, step in mine if a.start <= step <= last + GRACE_STEPS)
        verdict, row = first_raise(np.array([step for _, step in mine], np.int64), a.start,
                                   last, last + GRACE_STEPS)  # fmt: skip
        steps = None if row is None else row - (a.start if verdict == "caught" else last)
        verdicts.append(_Verdict(stream, a.kind, a.start, a.end, verdict.replace("missed",
                                 "MISSED"), steps))  # fmt: skip
    return verdicts, len(raised) - len(matched)


def _summary(
    live: Any, seen: list[_Seen], scored: float, rejected: float, port: int, elapsed: float
) -> None:
    raised = [s for s in seen if s.event == "raised"]
    verdicts, false_alerts = judge(live.anomalies, raised)
    interval = live.interval_s
    _say("")
    _say("[demo] injected anomalies (caught: an alert raised inside it, delay from its start):")
    for v in verdicts:
        when = "" if v.steps is None else f"{v.steps} steps ({v.steps * interval:.1f} s)"
        if v.verdict == "caught":
            when = f"delay {when}"
        elif v.verdict == "late":
            when = f"raised {when} after its end"
        _say(
            f"  {v.stream}  {v.kind:18s} steps {v.start:4d}-{v.end - 1:<4d}  {v.verdict:6s}  {when}"
        )
    counts = {name: sum(v.verdict == name for v in verdicts) for name in ("caught", "late")}
    delays = [v.steps for v in verdicts if v.verdict == "caught" and v.steps is not None]
    median = f" (median delay {statistics.median(delays):g} steps)" if delays else ""
    _say("")
    _say("[demo] summary")
    _say(f"  anomalies injected   {len(verdicts)}")
    _say(f"  caught               {counts['caught']}{median}")
    _say(
        f"  late                 {counts['late']} (raised within {GRACE_STEPS} steps after the end)"
    )
    _say(f"  missed               {len(verdicts) - counts['caught'] - counts['late']}")
    _say(f"  false alerts         {false_alerts}")
    _say(f"  messages scored      {scored:.0f} (rejected {rejected:.0f})")
    _say(f"  metrics were at      http://127.0.0.1:{port}/metrics")
    _say(f"  wall time            {elapsed:.1f} s")
