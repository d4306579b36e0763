"""The daemon as systemd runs it, with a stand-in for systemd's notify socket.

Promises: READY=1 only once the broker has granted the subscriptions (held back here by a
proxy that keeps the broker's SUBACK), and a sample published right after it is scored;
WATCHDOG=1 from the scoring loop, at most every half of WATCHDOG_USEC and never later than
WATCHDOG_USEC, before the broker answers and while scoring; RELOADING=1 then READY=1 on
SIGHUP; STOPPING=1 on SIGTERM; every message from the main process, none from a scoring
process. And the shipped config, with its model beside it, starts from the unit's working
directory ``/``, while paths from the environment or the command line stay relative to the
working directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import (
    DAEMON_START_TIMEOUT_S,
    MESSAGE_TIMEOUT_S,
    TINY_FEATURES,
    DaemonProcess,
    Publisher,
    poll_until,
    sample_payload,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
WATCHDOG_S = 2.0  # the daemon's WATCHDOG_USEC: it should ping every 1 s


class NotifySocket:
    """A datagram socket bound where systemd's would be: each message with its sender's pid
    (SCM_CREDENTIALS, as systemd checks NotifyAccess=) and the time it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(str(path))
        self.messages: list[tuple[float, int, str]] = []  # (monotonic time, pid, text)
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except OSError:
                return
            wanted = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
            credentials = [d for level, kind, d in ancillary if (level, kind) == wanted]
            pid = struct.unpack("iII", credentials[0])[0] if credentials else 0
            with self._arrived:
                self.messages.append((time.monotonic(), pid, data.decode()))
                self._arrived.notify_all()

    def texts(self, start: int = 0) -> list[str]:
        with self._arrived:
            return [text for _, _, text in self.messages[start:]]

    def pings(self, start: int = 0) -> list[float]:
        """When each WATCHDOG=1 from message ``start`` on came."""
        with self._arrived:
            return [t for t, _, text in self.messages[start:] if text == "WATCHDOG=1"]

    def wait_for(self, predicate: Callable[[str], bool], start: int = 0,
                 timeout: float = MESSAGE_TIMEOUT_S) -> int:  # fmt: skip
        """The index of the first message from ``start`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for i in range(start, len(self.messages)):
                    if predicate(self.messages[i][2]):
                        return i
                start = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such notification within {timeout} s")
                self._arrived.wait(left)

    def close(self) -> None:
        self._sock.close()


class SubackGate:
    """A TCP proxy to the broker that holds the broker's SUBACK packets until ``open`` is
    set: the daemon is connected and has asked for its subscriptions, not yet got them."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.open = threading.Event()
        self.held = threading.Event()  # a SUBACK came and waits for ``open``
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.broker_port))
            threading.Thread(target=self._pump, args=(client, broker, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        pending = b""
        try:
            while chunk := source.recv(65536):
                if not from_broker:
                    sink.sendall(chunk)
                    continue
                pending += chunk
                while (size := _packet_size(pending)) is not None:
                    if pending[0] >> 4 == 9:  # SUBACK
                        self.held.set()
                        self.open.wait()
                    sink.sendall(pending[:size])
                    pending = pending[size:]
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        self.open.set()
        self._listener.close()


def _packet_size(data: bytes) -> int | None:
    """The length of the MQTT packet at the start of ``data``, if all of it is there."""
    length, shift = 0, 0
    for i in range(1, min(len(data), 5)):
        length += (data[i] & 0x7F) << shift
        shift += 7
        if not data[i] & 0x80:
            return 1 + i + length if len(data) >= 1 + i + length else None
    return None


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    stand_in = NotifySocket(tmp_path / "notify")
    yield stand_in
    stand_in.close()


def _scored(daemon: DaemonProcess) -> float:
    return daemon.metric("rnnsentry_messages_total", {"outcome": "scored"}) or 0.0


def test_notify_ready_once_subscribed_watchdog_from_the_loop_reload_and_stop(
    tiny_model: Path, mosquitto: Mosquitto, tmp_path: Path, notify: NotifySocket
) -> None:
    gate = SubackGate(mosquitto.port)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
           "RNNSENTRY_DAEMON__WORKERS": "1"}  # fmt: skip
    daemon = DaemonProcess(tiny_model, f"mqtt://127.0.0.1:{gate.port}", tmp_path,
                           instance="sd", env=env, wait_ready=False)  # fmt: skip
    publisher = Publisher(mosquitto.port)
    rows = tiny_fleet(n_streams=1, n_steps=200, seed=2).values[0]
    try:
        # Subscriptions asked for, not granted: the loop pings, nothing says READY.
        assert gate.held.wait(DAEMON_START_TIMEOUT_S), daemon.log_path.read_text()
        held_at = len(notify.messages)
        first = notify.wait_for(lambda m: m == "WATCHDOG=1", held_at)
        second = notify.wait_for(lambda m: m == "WATCHDOG=1", first + 1)
        assert not any("READY=1" in m for m in notify.texts()), notify.texts()
        assert not daemon.ready()  # /readyz agrees
        assert any(m.startswith("STATUS=connecting to mqtt://") for m in notify.texts())

        # Granted: READY=1, and a sample published at once is scored (it was subscribed).
        gate.open.set()
        ready = notify.wait_for(lambda m: m.startswith("READY=1"), second + 1)
        publisher.send("sensors/p1", sample_payload(TINY_FEATURES, rows[0], 1000.0))
        poll_until(lambda: _scored(daemon) == 1)
        assert "sensors/" in notify.texts(ready)[0]  # its STATUS= names the subscriptions

        # While scoring, the pings go on, 1 s apart: at most every half of WATCHDOG_USEC,
        # never as late as all of it.
        sent = 1
        for _ in range(4):  # 10 samples, then the next ping, 4 times
            for t in range(sent, sent + 10):
                publisher.send("sensors/p1", sample_payload(TINY_FEATURES, rows[t], 1000.0 + t))
            sent += 10
            notify.wait_for(lambda m: m == "WATCHDOG=1", len(notify.messages))
        poll_until(lambda: _scored(daemon) == sent)
        pings = notify.pings()
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert min(gaps) > 0.4 * WATCHDOG_S and max(gaps) < WATCHDOG_S, gaps

        # SIGHUP: RELOADING=1 with the time, then READY=1 once the models are swapped.
        before = len(notify.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda m: m.startswith("RELOADING=1\nMONOTONIC_USEC="),
                                    before)  # fmt: skip
        reloaded = notify.wait_for(lambda m: m.startswith("READY=1"), reloading + 1)
        assert "models reloaded" in notify.texts(reloaded)[0]
        assert daemon.metric("rnnsentry_reloads_total", {"result": "ok"}) == 1

        # SIGTERM: STOPPING=1, then a clean exit.
        before = len(notify.messages)
        assert daemon.stop() == 0
        notify.wait_for(lambda m: m.startswith("STOPPING=1"), before)
        senders = {pid for _, pid, _ in notify.messages}
        assert senders == {daemon.proc.pid}, "only the main process notifies"
    finally:
        publisher.close()
        daemon.stop(signal.SIGKILL)
        gate.close()


def test_nothing_is_sent_without_notify_socket(
    tiny_model: Path, mosquitto: Mosquitto, tmp_path: Path, notify: NotifySocket
) -> None:
    daemon = DaemonProcess(tiny_model, mosquitto.url, tmp_path, instance="plain",
                           env={"WATCHDOG_USEC": "1000000"})  # fmt: skip
    assert daemon.stop() == 0
    assert notify.messages == []


def _shipped_config(etc: Path, model: Path) -> Path:
    """deploy/rnnsentry.toml in ``etc`` with the model beside it, as the unit expects."""
    etc.mkdir()
    shutil.copy(DEPLOY / "rnnsentry.toml", etc / "rnnsentry.toml")
    shutil.copy(model, etc / "model.onnx")
    return etc / "rnnsentry.toml"


def _check_config(cwd: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")]))}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "detector", "run", *args, "--check-config"],
                          cwd=cwd, env=env, capture_output=True, text=True)  # fmt: skip


def test_the_shipped_config_starts_from_the_root_with_its_model_beside_it(
    tiny_model: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = _shipped_config(tmp_path / "etc", tiny_model)
    done = _check_config("/", "--config", str(config), "--metrics-port", "0")
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr
    # --topic alone keeps the file's model, read against the file's folder too.
    done = _check_config("/", "--config", str(config), "--metrics-port", "0",
                         "--topic", "plant/{stream}")  # fmt: skip
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr

    daemon = DaemonProcess(None, mosquitto.url, tmp_path, instance="shipped",
                           extra_args=["--config", str(config)], cwd=Path("/"))  # fmt: skip
    assert daemon.stop() == 0


def test_paths_from_the_environment_and_flags_stay_relative_to_the_working_directory(
    tiny_model: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = _shipped_config(tmp_path / "etc", tiny_model)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(tiny_model, work / "mine.onnx")  # only here, not beside the config
    done = _check_config(work, "--config", str(config), "--model", "mine.onnx",
                         "--metrics-port", "0")  # fmt: skip
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr
    done = _check_config(tmp_path / "etc", "--config", str(config), "--model", "mine.onnx",
                         "--metrics-port", "0")  # fmt: skip
    assert done.returncode == 1 and "mine.onnx" in done.stdout, done.stdout + done.stderr

    env = {"RNNSENTRY_SNAPSHOT__PATH": "state.snap", "RNNSENTRY_DAEMON__WORKERS": "0"}
    daemon = DaemonProcess(None, mosquitto.url, tmp_path, instance="cwd", env=env,
                           extra_args=["--config", str(config)], cwd=work)  # fmt: skip
    assert daemon.stop() == 0
    assert (work / "state.snap").exists() and not (tmp_path / "etc" / "state.snap").exists()
