"""Helpers for tests: tiny models, an MQTT listener, waiting, scraping metrics, daemons
in this process and in a subprocess."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from detector.config import Config, build_config
from detector.daemon import Daemon
from training.demo.localbroker import free_port

# Named timeouts: generous on a loaded 2-core machine, never a bare sleep.
CONNECT_TIMEOUT_S = 10.0
MESSAGE_TIMEOUT_S = 15.0
DAEMON_START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 20.0

TINY_FEATURES = ("flow", "pressure", "temperature", "vibration")
# NATS's subject mapping of deploy/nats/nats.conf: each stream in one of 3 partitions.
NATS_PARTITIONS = {"sensors.*": "part.{{partition(3,1)}}.sensors.{{wildcard(1)}}"}


def tiny_fleet(n_streams: int = 4, n_steps: int = 600, seed: int = 0, start_step: int = 0) -> Any:
    from training.evaluation.synth import generate_fleet

    return generate_fleet(
        n_streams=n_streams, n_steps=n_steps, features=TINY_FEATURES, seed=seed,
        start_step=start_step, anomalies=0,
    )  # fmt: skip


def train_tiny_model(
    out: Path, cell: str = "gru", hidden: int = 8, epochs: int = 3, one_feature: bool = False
) -> Any:
    """Train a very small model on normal synthetic pumps; returns its ModelMeta.
    ``one_feature``: on the first sensor only, named ``value`` (a bare number is a payload)."""
    from training.trainer import fit_and_export
    from training.trainer.train import TrainOptions

    fleet = tiny_fleet()
    options = TrainOptions(cell=cell, hidden_size=hidden, epochs=epochs, window=32, stride=32)
    if one_feature:
        streams, features = [v[:, :1] for v in fleet.values], ["value"]
    else:
        streams, features = list(fleet.values), list(fleet.features)
    return fit_and_export(
        streams, features, out, options, sample_interval_s=fleet.interval_s, quiet=True
    )


def wait_for(
    q: queue.Queue[Any], predicate: Callable[[Any], bool], timeout: float = MESSAGE_TIMEOUT_S
) -> Any:
    """The first item of ``q`` that satisfies ``predicate``; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"nothing matching arrived within {timeout} s")
        try:
            item = q.get(timeout=left)
        except queue.Empty:
            continue
        if predicate(item):
            return item


def poll_until(check: Callable[[], Any], timeout: float = MESSAGE_TIMEOUT_S) -> Any:
    """Call ``check`` until it returns something truthy (e.g. a scraped value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        time.sleep(0.05)


class Listener:
    """A paho client that puts every (topic, payload, retain) it receives in a queue;
    ``protocol`` paho.MQTTv311 for a broker that speaks 3.1.1 only (NATS)."""

    def __init__(self, port: int, topics: list[str], host: str = "127.0.0.1",
                 protocol: int = paho.MQTTv5) -> None:  # fmt: skip
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._subscribed: queue.Queue[bool] = queue.Queue()
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=protocol)  # fmt: skip
        client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.put(True)
        client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        client.connect(host, port)
        client.loop_start()
        self.client = client
        wait_for(self._subscribed, bool, CONNECT_TIMEOUT_S)

    def json_on(self, prefix: str, predicate: Callable[[dict[str, Any]], bool] = lambda d: True,
                timeout: float = MESSAGE_TIMEOUT_S) -> dict[str, Any]:  # fmt: skip
        def ok(item: tuple[str, bytes, bool]) -> bool:
            if not item[0].startswith(prefix):
                return False
            try:
                return predicate(json.loads(item[1]))
            except ValueError:
                return False

        return dict(json.loads(wait_for(self.messages, ok, timeout)[1]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """A connected paho client for publishing test input (``protocol`` as Listener's)."""

    def __init__(self, port: int, host: str = "127.0.0.1", protocol: int = paho.MQTTv5) -> None:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             protocol=protocol)  # fmt: skip
        client.connect(host, port)
        client.loop_start()
        self.client = client

    def send(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any],
             qos: int = 1) -> None:  # fmt: skip
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=MESSAGE_TIMEOUT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def sample_payload(features: tuple[str, ...] | list[str], values: np.ndarray, ts: float) -> str:
    return json.dumps({"ts": ts, "values": dict(zip(features, map(float, values), strict=True))})


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    """GET a path of the metrics server over HTTP: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample's value from Prometheus text exposition, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return float(sample.value)
    return None


def daemon_config(
    broker_url: str, models: Path | list[dict[str, Any]], instance: str = "test",
    **sections: dict[str, Any],
) -> Config:  # fmt: skip
    """A checked Config for a Daemon in this process.

    Defaults: ``instance`` (and a client id ``rnnsentry-<instance>-<n>`` of its own),
    reconnects after 1 s, metrics on 127.0.0.1 on a port the system picks, batches sent
    after 1 ms. ``models`` is a model file (routed from ``sensors/{stream}``) or the
    [[models]] tables. Each keyword is a section whose keys are added to or replace these.
    """
    if isinstance(models, Path):
        models = [{"path": str(models), "topics": ["sensors/{stream}"]}]
    doc: dict[str, Any] = {
        "daemon": {"instance": instance, "workers": 0},  # in this process: its state is at hand
        "mqtt": {"broker": broker_url, "client_id": f"rnnsentry-{instance}-{free_port()}",
                 "reconnect_min_s": 1, "reconnect_max_s": 1},
        "models": models,
        "metrics": {"host": "127.0.0.1", "port": 0},
        "batch": {"max_wait_ms": 1.0},
    }  # fmt: skip
    for key, values in sections.items():
        doc.setdefault(key, {}).update(values)
    config, problems = build_config(doc)
    assert problems == []
    return config


class InProcessDaemons:
    """Starts Daemons in this process (the ``start_daemon`` fixture); stops them at the end."""

    def __init__(self) -> None:
        self.running: list[Daemon] = []

    def __call__(self, config: Config, ready_within: float | None = CONNECT_TIMEOUT_S) -> Daemon:
        """Start a daemon; wait until it is ready unless ``ready_within`` is None."""
        daemon = Daemon(config)
        self.running.append(daemon)
        daemon.start()
        if ready_within is not None:
            poll_until(lambda: daemon.ready()[0], ready_within)
        return daemon

    def stop(self, daemon: Daemon) -> None:
        """Stop one daemon now (it is not stopped again at the end)."""
        self.running.remove(daemon)
        daemon.stop()

    def stop_all(self) -> None:
        """Stop every daemon still running, the latest first."""
        while self.running:
            self.running.pop().stop()


def readyz(daemon: Daemon) -> tuple[int, str]:
    """GET /readyz of an in-process daemon: (status, body)."""
    assert daemon.server is not None
    return scrape(daemon.server.port, "/readyz")


class DaemonProcess:
    """``python -m detector run`` in a subprocess, its output in ``log_dir/daemon-PORT.log``.

    The constructor returns once /readyz answers 200 (the process is killed if it does not),
    or at once with ``wait_ready=False``. ``model`` None: the model comes from the config
    (``--config`` in ``extra_args``). ``extra_args`` are more command-line flags, ``env``
    more environment variables, ``cwd`` its working directory (this checkout stays on its
    import path).
    """

    def __init__(
        self, model: Path | None, broker_url: str, log_dir: Path, *, instance: str,
        extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
        cwd: Path | None = None, wait_ready: bool = True,
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.log_path = log_dir / f"daemon-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        environ = {**os.environ, **(env or {})}
        if cwd is not None:  # from elsewhere, ``-m detector`` must still find this checkout
            root = str(Path(__file__).resolve().parents[1])
            environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detector", "run",
             *(["--model", str(model)] if model is not None else []),
             "--broker", broker_url, "--metrics-port", str(self.port), "--instance", instance,
             *extra_args],
            env=environ, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not wait_ready:
            return
        try:
            poll_until(lambda: self.proc.poll() is not None or self.ready(),
                       DAEMON_START_TIMEOUT_S)  # fmt: skip
            assert self.proc.poll() is None, self.log_path.read_text()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def ready(self) -> bool:
        try:
            return scrape(self.port, "/readyz")[0] == 200
        except OSError:
            return False

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return metric_value(scrape(self.port)[1], name, labels)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` unless it has exited already; its exit code (-N: killed by signal N)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=EXIT_TIMEOUT_S)
        self._log.close()
        return code
