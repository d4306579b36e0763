"""Helpers the performance benchmarks share: the benchmark model, a broker with loss
counters, a raw-socket MQTT load generator, the daemon as a subprocess, a bare counting
subscriber, rate measurement and markdown tables. Not a test; imported by bench/*.py.

The load generator writes pre-encoded MQTT 3.1.1 PUBLISH packets straight to a socket, so
on a 2-core machine nearly all CPU goes to the broker and the daemon under test.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.demo.localbroker import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(tempfile.gettempdir()) / "rnnsentry-bench-models"
T0 = 1_750_000_000.0  # epoch seconds of every stream's first sample
INTERVAL_S = 1.0  # the benchmark model's sample interval
HEAVY_JOBS = "bench/quality.py|pytest"
SPAWN = mp.get_context("spawn")  # no fork of a process that may hold paho threads


# --- the model ---


def feature_names(n: int) -> list[str]:
    """flow_0, pressure_0, temperature_0, vibration_0, flow_1, ... (synth's roles in turn)."""
    roles = ("flow", "pressure", "temperature", "vibration")
    return [f"{roles[j % 4]}_{j // 4}" for j in range(n)]


def bench_model(cell: str = "gru", hidden: int = 64, features: int = 8) -> Path:
    """A trained model of this shape, cached across runs (training takes ~10-30 s)."""
    from detector.errors import ModelFileError
    from detector.model import LoadedModel

    path = MODEL_DIR / f"{cell}-h{hidden}-f{features}.onnx"
    if path.exists():
        try:
            meta = LoadedModel.load(path).meta
            if meta.calibration.error_lag is not None and meta.skip == "level":  # the
                # current exporter's and trainer's
                return path
        except ModelFileError:
            pass
        path.unlink()  # made by an older exporter: train again
    from training.evaluation.synth import generate_fleet
    from training.trainer import fit_and_export
    from training.trainer.train import TrainOptions

    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    fleet = generate_fleet(8, 2000, features=feature_names(features), seed=0)
    options = TrainOptions(cell=cell, hidden_size=hidden, epochs=3, window=64)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fit_and_export(
        list(fleet.values),
        fleet.features,
        tmp,
        options,
        sample_interval_s=fleet.interval_s,
        quiet=True,
    )
    tmp.replace(path)
    return path


def value_pool(features: int, pumps: int = 16, steps: int = 1200) -> np.ndarray:
    """[pumps, steps, features] normal synthetic readings (what the model was fitted on)."""
    from training.evaluation.synth import generate_fleet

    return generate_fleet(
        pumps, steps, features=feature_names(features), seed=1, start_step=50_000
    ).values


# --- the machine ---


def busy_jobs() -> list[str]:
    """Command lines of other heavy jobs (other engineers' tests and quality benches)."""
    try:
        out = subprocess.run(["pgrep", "-af", HEAVY_JOBS], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    mine = {os.getpid(), os.getppid()}
    jobs = []
    for line in out.stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        if int(pid) not in mine and "pgrep" not in cmd:
            jobs.append(cmd[:80])
    return jobs


def wait_quiet(max_wait_s: float, poll_s: float = 30.0) -> str:
    """Wait until no other heavy job runs (at most ``max_wait_s``); says what it found."""
    began = time.monotonic()
    while True:
        jobs = busy_jobs()
        if not jobs:
            waited = time.monotonic() - began
            return f"quiet (no other heavy job; waited {waited:.0f} s)"
        if time.monotonic() - began >= max_wait_s:
            return f"NOT quiet after {max_wait_s:.0f} s: {len(jobs)} job(s) running: {jobs[0]}"
        time.sleep(poll_s)


def machine_line(load_note: str = "") -> str:
    import onnxruntime

    la = os.getloadavg()
    note = f"; {load_note}" if load_note else ""
    return (
        f"{os.cpu_count()} CPU(s) {platform.machine()}, Python {platform.python_version()},"
        f" onnxruntime {onnxruntime.__version__}; load average {la[0]:.2f} {la[1]:.2f}"
        f" {la[2]:.2f} at start{note}"
    )


def add_broker_arguments(parser: Any) -> None:
    parser.add_argument(
        "--broker-nagle",
        action="store_true",
        help="leave mosquitto's default (set_tcp_nodelay false: Nagle on) instead of"
        " set_tcp_nodelay true",
    )


def add_common_arguments(parser: Any) -> None:
    parser.add_argument(
        "--wait-quiet-s",
        type=float,
        default=0.0,
        help="first wait up to this long for other heavy jobs to end"
        f" ({HEAVY_JOBS}); 0: do not wait",
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rate_text(per_s: float) -> str:
    return f"{per_s:,.0f}" if math.isfinite(per_s) else "-"


# --- the broker ---


def start_broker(nodelay: bool = True) -> Mosquitto:
    """mosquitto with $SYS counters every second (Mosquitto already sets a large
    max_queued_messages: the default 1000 silently drops QoS 0 to a slow subscriber).

    ``nodelay``: ``set_tcp_nodelay true``. mosquitto's default leaves Nagle's algorithm on
    for its clients' sockets, which holds small messages back to coalesce them: measured
    at half load, publish -> alert p50 19 ms with it, 3 ms without."""
    extra = "set_tcp_nodelay true\n" if nodelay else ""
    return Mosquitto(extra_config="sys_interval 1\nmax_queued_bytes 0\n" + extra).start()


def broker_line(nodelay: bool) -> str:
    return "mosquitto " + (
        "with set_tcp_nodelay true" if nodelay else "with its default set_tcp_nodelay false"
    )


class BrokerStats:
    """The broker's own publish counters from $SYS (refreshed every second)."""

    TOPICS = ("dropped", "received", "sent")

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.values: dict[str, int] = {}
        self._seen = threading.Event()
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.subscribe([(f"$SYS/broker/publish/messages/{t}", 0) for t in self.TOPICS])
        client.loop_start()
        self.client = client

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.values[msg.topic.rsplit("/", 1)[1]] = int(msg.payload)
        self._seen.set()

    def snapshot(self) -> dict[str, int]:
        """The counters after the broker's next $SYS update."""
        self._seen.clear()
        self._seen.wait(2.5)
        self._seen.clear()
        self._seen.wait(2.5)  # the three topics come together: wait one more period
        return dict(self.values)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- raw MQTT publishing ---


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH at QoS 0."""
    body = struct.pack("!H", len(topic)) + topic + payload
    return b"\x30" + _varint(len(body)) + body


def connect_raw(port: int, client_id: str) -> socket.socket:
    """A TCP connection that has sent CONNECT (MQTT 3.1.1, clean, no keepalive) and read
    CONNACK."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(cid)) + cid
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    ack = b""
    while len(ack) < 4:
        part = sock.recv(4 - len(ack))
        if not part:
            raise ConnectionError("the broker closed the connection instead of CONNACK")
        ack += part
    if ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {ack!r}")
    return sock


@dataclass(frozen=True)
class Load:
    """What a publisher sends: ``rounds`` samples per stream, round-robin over streams.

    ``per_message`` samples go in one message (1: the single-sample object; more: a JSON
    list of objects). ``inject``: (stream, round) pairs whose sample is a gross anomaly.
    """

    streams: int
    rounds: int
    features: int = 8
    per_message: int = 1
    topic: str = "sensors/s{stream}"
    inject: tuple[tuple[int, int], ...] = ()
    named: bool = True  # "values" as {"name": v, ...}; False: a list in feature order

    @property
    def messages(self) -> int:
        return self.streams * (self.rounds // self.per_message)

    @property
    def samples(self) -> int:
        return self.messages * self.per_message


def _fragments(load: Load) -> list[list[bytes]]:
    """Per pump, per step: the ``"values"`` object of a normal reading, JSON text."""
    names = feature_names(load.features)
    pool = value_pool(load.features, steps=load.rounds + 600)
    if not load.named:
        return [[("[" + ", ".join(f"{v:.5g}" for v in row) + "]").encode() for row in pump]
                for pump in pool]  # fmt: skip
    return [
        [
            (
                "{" + ", ".join(f'"{n}": {v:.5g}' for n, v in zip(names, row, strict=True)) + "}"
            ).encode()
            for row in pump
        ]
        for pump in pool
    ]


def _anomaly(load: Load) -> bytes:
    if not load.named:
        return ("[" + ", ".join("1000.0" for _ in range(load.features)) + "]").encode()
    return ("{" + ", ".join(f'"{n}": 1000.0' for n in feature_names(load.features)) + "}").encode()


def build_chunks(load: Load, chunk_messages: int) -> tuple[list[bytes], dict[int, tuple[int, int]]]:
    """The whole load as socket writes of ``chunk_messages`` packets each, and for the
    injected samples: chunk index -> (stream, round) of those in that chunk."""
    frags = _fragments(load)
    pumps = len(frags)
    bad = _anomaly(load)
    inject = set(load.inject)
    topics = [load.topic.format(stream=k).encode() for k in range(load.streams)]
    chunks: list[bytes] = []
    marks: dict[int, tuple[int, int]] = {}
    part: list[bytes] = []
    per = load.per_message
    for m in range(load.rounds // per):
        for k in range(load.streams):
            pump, offset = k % pumps, (k // pumps) % 500
            samples = []
            for r in range(m * per, (m + 1) * per):
                values = bad if (k, r) in inject else frags[pump][offset + r]
                if (k, r) in inject:
                    marks[len(chunks)] = (k, r)
                samples.append(b'{"ts": %.3f, "values": %s}' % (T0 + r * INTERVAL_S, values))
            payload = samples[0] if per == 1 else b"[" + b", ".join(samples) + b"]"
            part.append(publish_packet(topics[k], payload))
            if len(part) == chunk_messages:
                chunks.append(b"".join(part))
                part = []
    if part:
        chunks.append(b"".join(part))
    return chunks, marks


def _publisher_main(
    port: int, load: Load, rate: float, chunk_messages: int, ready: Any, go: Any, out: Any
) -> None:
    chunks, marks = build_chunks(load, chunk_messages)
    sock = connect_raw(port, f"bench-pub-{os.getpid()}")
    ready.set()
    go.wait()
    sent_at: dict[tuple[int, int], float] = {}
    began = time.time()
    for i, chunk in enumerate(chunks):
        if rate > 0:
            due = began + i * chunk_messages / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
        if i in marks:
            sent_at[marks[i]] = time.time()
        sock.sendall(chunk)
    ended = time.time()
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    out.put({"began": began, "ended": ended, "sent_at": sent_at})


class Publisher:
    """A child process that builds the load, connects, and sends it when told to."""

    def __init__(self, port: int, load: Load, rate: float = 0.0, chunk_messages: int = 500):
        self.load = load
        self._ready, self._go = SPAWN.Event(), SPAWN.Event()
        self._out: Any = SPAWN.Queue()
        self.proc = SPAWN.Process(
            target=_publisher_main,
            args=(port, load, rate, chunk_messages, self._ready, self._go, self._out),
            daemon=True,
        )
        self.proc.start()
        if not self._ready.wait(300):
            raise RuntimeError("the publisher did not get ready")

    def go(self) -> None:
        self._go.set()

    def result(self, timeout_s: float = 600) -> dict[str, Any]:
        res: dict[str, Any] = self._out.get(timeout=timeout_s)
        self.proc.join(10)
        return res


# --- the bare counting subscriber ---


def _counter_main(port: int, protocol: int, count: Any, ready: Any, stop: Any) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    n = [0]

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        n[0] += 1

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-count-{os.getpid()}",
        protocol=protocol,
    )
    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.on_connect = lambda c, *a: c.subscribe("sensors/#", qos=1)
    client.max_inflight_messages_set(100)  # what the daemon's MqttLink sets
    client.connect("127.0.0.1", port)
    client.loop_start()
    while not stop.wait(0.05):
        count.value = n[0]
    count.value = n[0]
    client.disconnect()
    client.loop_stop()


class BareSubscriber:
    """paho-mqtt in its own process, counting messages in ``on_message`` and nothing else:
    the ceiling of MQTT ingestion in Python on this machine."""

    def __init__(self, port: int, protocol: int = 5) -> None:
        self._count: Any = SPAWN.Value("q", 0, lock=False)
        self._ready, self._stop = SPAWN.Event(), SPAWN.Event()
        self.proc = SPAWN.Process(
            target=_counter_main,
            args=(port, protocol, self._count, self._ready, self._stop),
            daemon=True,
        )
        self.proc.start()
        if not self._ready.wait(30):
            raise RuntimeError("the bare subscriber did not subscribe")

    def received(self) -> tuple[int, int]:
        n = int(self._count.value)
        return n, n

    def stop(self) -> None:
        self._stop.set()
        self.proc.join(10)


# --- the daemon as a subprocess ---


def _toml(doc: dict[str, Any]) -> str:
    lines = []
    for section, values in doc.items():
        if section == "models":
            for model in values:
                lines.append("[[models]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in model.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def daemon_config(
    model: Path,
    broker_url: str,
    instance: str,
    batch_max: int = 512,
    max_streams: int = 200_000,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "daemon": {"instance": instance, "log_level": "WARNING"},
        "mqtt": {"broker": broker_url},
        "models": [{"path": str(model), "topics": ["sensors/{stream}"]}],
        "batch": {"max": batch_max, "queue_size": max(100_000, batch_max)},
        "streams": {"max_streams": max_streams},
        "metrics": {"port": free_port(), "host": "127.0.0.1"},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


class DaemonProcess:
    """``python -m detector run --config FILE`` with metrics scraped over HTTP."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rnnsentry-bench-"))
        path = self.dir / "rnnsentry.toml"
        path.write_text(_toml(config))
        self.port = int(config["metrics"]["port"])
        self.log = open(self.dir / "daemon.log", "wb")  # noqa: SIM115 (the process's)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detector", "run", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the daemon did not start: " + self.log_tail())
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                return True
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{labels}`` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def handled(self, per_message: int = 1) -> tuple[int, int, int]:
        """(samples counted whatever their outcome, samples scored, samples taken in: those
        counted and those queued) so far."""
        m = self.metrics()
        counts = {
            o: int(m.get(f'rnnsentry_messages_total{{outcome="{o}"}}', 0.0))
            for o in ("scored", "rejected", "dropped")
        }
        done = sum(counts.values())
        queued = int(m.get("rnnsentry_queue_depth", 0.0)) * per_message
        return done, counts["scored"], done + queued

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return (self.dir / "daemon.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.proc.returncode in (0, -signal.SIGTERM):  # a clean stop: nothing to look at
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"the daemon exited with {self.proc.returncode}; its log: {self.dir}",
                  file=sys.stderr)  # fmt: skip


# --- measuring a rate ---


@dataclass
class Progress:
    """A counter polled over time; ``rate`` is its slope between 10 % and 90 % of the final
    value (the steady part of the run: no start-up, no tail), ending earlier if the intake
    (what was taken off the socket) was complete by then: after that a daemon only drains
    its queue, with paho's thread idle, which is not the sustained rate."""

    expected: int = 0
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    intake: list[int] = field(default_factory=list)

    def add(self, t: float, n: int, intake: int) -> None:
        self.times.append(t)
        self.counts.append(n)
        self.intake.append(intake)

    @property
    def final(self) -> int:
        return self.counts[-1] if self.counts else 0

    def _when(self, n: float) -> float:
        return float(np.interp(n, self.counts, self.times))

    def rate(self, lo: float = 0.1, hi: float = 0.9, until_intake: bool = True) -> float:
        if self.final < 100 or len(self.counts) < 3:
            return math.nan
        t1, t2 = self._when(lo * self.final), self._when(hi * self.final)
        done = [
            t for t, n in zip(self.times, self.intake, strict=True) if n >= 0.99 * self.expected
        ]
        if until_intake and done and t1 < done[0] < t2:
            t2 = done[0]
        n1, n2 = (float(np.interp(t, self.times, self.counts)) for t in (t1, t2))
        return (n2 - n1) / (t2 - t1) if t2 > t1 else math.nan


def follow(
    read: Callable[[], tuple[int, ...]],
    expected: int,
    settle_s: float = 2.0,
    timeout_s: float = 240.0,
    poll_s: float = 0.2,
) -> Progress:
    """Poll ``read()`` -> (done, counted[, intake]) until ``done`` reaches ``expected`` or
    stops growing for ``settle_s``; the progress follows ``counted`` (e.g. scored only)."""
    progress = Progress(expected)
    began = time.monotonic()
    last_change, last = began, -1
    while True:
        now = time.monotonic()
        got = read()
        n, counted = got[0], got[1]
        progress.add(now, counted, got[2] if len(got) > 2 else n)
        if n != last:
            last, last_change = n, now
        if n >= expected or (n > 0 and now - last_change > settle_s):
            return progress
        if now - began > timeout_s:
            return progress
        time.sleep(poll_s)


def percentiles(values: np.ndarray, qs: Sequence[float] = (50, 99, 99.9)) -> list[float]:
    if len(values) == 0:
        return [math.nan] * len(qs)
    return [float(v) for v in np.percentile(values, qs)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if math.isfinite(seconds) else "-"


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def inbound_messages(
    load: Load, received: float | None = None
) -> list[tuple[str, bytes, float, bool]]:
    """The load as the daemon's queue holds it: (topic, payload, receive time, redelivered),
    in order."""
    frags = _fragments(load)
    pumps = len(frags)
    bad = _anomaly(load)
    inject = set(load.inject)
    stamp = time.time() if received is None else received
    out = []
    per = load.per_message
    for m in range(load.rounds // per):
        for k in range(load.streams):
            pump, offset = k % pumps, (k // pumps) % 500
            samples = [
                b'{"ts": %.3f, "values": %s}'
                % (T0 + r * INTERVAL_S, bad if (k, r) in inject else frags[pump][offset + r])
                for r in range(m * per, (m + 1) * per)
            ]
            payload = samples[0] if per == 1 else b"[" + b", ".join(samples) + b"]"
            out.append((load.topic.format(stream=k), payload, stamp, False))
    return out


def load_note_at_end() -> str:
    jobs = busy_jobs()
    la = os.getloadavg()[0]
    return f"load average {la:.2f} at the end; other heavy jobs running then: {len(jobs)}"
