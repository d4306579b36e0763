"""A mosquitto on a free loopback port for the demo, the tests and the benchmarks.

:class:`Mosquitto` runs the real mosquitto binary with a generated config and
can be restarted on the same port; where mosquitto is not installed it raises
:class:`MosquittoMissing`. :class:`NatsServer` runs nats-server with JetStream and its
MQTT 3.1.1 listener, for the tests of daemons that share streams by partition. Never used
by ``rnnsentry run``, which talks to your broker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

START_TIMEOUT_S = 10.0
# Debian installs mosquitto in /usr/sbin, which is not on an ordinary user's PATH.
SBIN_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin")
INSTALL_HINT = "sudo apt-get install mosquitto"
NATS_INSTALL_HINT = "sudo apt-get install nats-server"


class MosquittoMissing(FileNotFoundError):
    """No mosquitto binary on PATH nor in SBIN_DIRS."""


class NatsMissing(FileNotFoundError):
    """No nats-server binary on PATH nor in SBIN_DIRS."""


def find_mosquitto() -> str | None:
    """The mosquitto binary's path: on PATH, else in one of SBIN_DIRS (None: not installed)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which("mosquitto", path=path)


def find_nats_server() -> str | None:
    """The nats-server binary's path, found as mosquitto's is (None: not installed)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which("nats-server", path=path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_accepting(
    host: str,
    port: int,
    timeout_s: float = START_TIMEOUT_S,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Return once ``host:port`` accepts; TimeoutError after ``timeout_s`` or once the
    server is no longer ``alive()`` (a process that exited will never accept)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline or not alive():
                raise TimeoutError(f"nothing accepts connections on {host}:{port}") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener; ``require_certificate`` makes clients show one too."""

    cafile: str
    certfile: str
    keyfile: str
    require_certificate: bool = True

    def lines(self) -> str:
        return (
            f"cafile {self.cafile}\ncertfile {self.certfile}\nkeyfile {self.keyfile}\n"
            f"require_certificate {'true' if self.require_certificate else 'false'}\n"
        )


class _BrokerProcess:
    """What the two launchers share: a process started from a config file in a folder of
    its own, waited for until its ports accept, and stopped with that folder removed (its
    log kept in memory for ``log_tail``)."""

    name = "broker"  # the program, for messages and the folder's and log's names
    stop_timeout_s = 5.0

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.dir: Path | None = None  # its config, staged secrets and log: only while it runs
        self._last_log = ""  # the log of the run that stop() ended
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path | None:
        return None if self.dir is None else self.dir / f"{self.name}.log"

    def _folder(self) -> Path:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"rnnsentry-{self.name}-"))
        return self.dir

    def _launch(self, conf: Path, ports: tuple[int, ...]) -> None:
        """Start the program on ``conf`` and wait until each of ``ports`` accepts."""
        folder = self._folder()
        log = open(folder / f"{self.name}.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            for port in ports:
                wait_accepting(self.host, port, alive=self._running)
        except TimeoutError:
            self.stop()  # keeps the log for log_tail
            raise RuntimeError(f"{self.name} did not start: {self.log_tail()}") from None

    def _running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.dir is not None:  # nothing of ours stays behind: the log is kept in memory
            self._last_log = self.log_tail(100_000)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the log: of this run, or of the last one once stopped."""
        path = self.log_path
        if path is None:
            return self._last_log[-chars:]
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Mosquitto(_BrokerProcess):
    """A mosquitto process on 127.0.0.1; ``extra_config`` lines go into its config file.

    ``tls`` makes the listener TLS-only (``url`` is then ``mqtts://``); ``password_file``
    (made with ``mosquitto_passwd``) turns anonymous access off unless ``allow_anonymous``
    says otherwise; ``listener_config`` lines go right under the ``listener`` line.
    """

    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        extra_config: str = "",
        *,
        listener_config: str = "",
        tls: TlsFiles | None = None,
        password_file: str | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise MosquittoMissing(f"mosquitto is not installed ({INSTALL_HINT})")
        super().__init__(binary)
        self._port = port or free_port()
        self.extra_config = extra_config
        own = listener_config.strip("\n")
        self.listener_config = own + "\n" if own else ""
        self.tls = tls
        self.password_file = password_file
        self.allow_anonymous = password_file is None if allow_anonymous is None else allow_anonymous

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self._port}"

    def _readable(self, folder: Path, path: str, name: str) -> str:
        """A copy of ``path`` in ``folder`` that mosquitto can read: started as root, it
        becomes the ``mosquitto`` user before it opens certificates and password files."""
        copy = folder / name
        shutil.copyfile(path, copy)
        if os.geteuid() == 0:
            folder.chmod(0o711)
            try:
                shutil.chown(copy, user="mosquitto")
            except (LookupError, OSError):
                copy.chmod(0o644)  # no such user: mosquitto stays whoever started it
        return str(copy)

    def start(self) -> Mosquitto:
        folder = self._folder()
        conf = folder / "mosquitto.conf"
        tls = ""
        if self.tls:
            staged = replace(
                self.tls,
                cafile=self._readable(folder, self.tls.cafile, "tls-ca.pem"),
                certfile=self._readable(folder, self.tls.certfile, "tls-cert.pem"),
                keyfile=self._readable(folder, self.tls.keyfile, "tls-key.pem"),
            )
            tls = staged.lines()
        auth = ""
        if self.password_file:
            auth = f"password_file {self._readable(folder, self.password_file, 'passwords')}\n"
        conf.write_text(
            f"listener {self._port} {self.host}\n"
            f"{tls}{self.listener_config}"
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
            f"{auth}"
            "persistence false\n"
            # mosquitto's default of 1000 silently drops QoS 0 to a slow subscriber.
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            f"{self.extra_config}\n"
        )
        self._launch(conf, (self._port,))
        return self

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsServer(_BrokerProcess):
    """A nats-server on 127.0.0.1: its client, MQTT and monitoring ports free ones, its
    config and JetStream store (MQTT sessions and their QoS 1 messages) in a folder of its
    own that ``stop`` removes. MQTT in NATS needs JetStream and a server name. ``mappings``
    are subject mappings (source -> destination), such as the partitions of
    ``deploy/nats/nats.conf``; an MQTT topic ``a/b`` is the subject ``a.b``.
    """

    name = "nats"
    stop_timeout_s = 10.0

    def __init__(self, mappings: dict[str, str] | None = None) -> None:
        binary = find_nats_server()
        if binary is None:
            raise NatsMissing(f"nats-server is not installed ({NATS_INSTALL_HINT})")
        super().__init__(binary)
        self.port, self.mqtt_port, self.http_port = free_port(), free_port(), free_port()
        self.mappings = dict(mappings or {})

    @property
    def url(self) -> str:
        """The MQTT listener's URL (speaks MQTT 3.1.1)."""
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def config_text(self, folder: Path) -> str:
        mappings = "".join(f'  "{src}": "{dst}"\n' for src, dst in self.mappings.items())
        return (
            "server_name: rnnsentry-test\n"
            f"listen: {self.host}:{self.port}\n"
            f"http: {self.host}:{self.http_port}\n"
            f'jetstream {{ store_dir: "{folder / "jetstream"}", max_memory_store: 64MB,'
            " max_file_store: 256MB }\n"
            f"mqtt {{ listen: {self.host}:{self.mqtt_port} }}\n"
            f"mappings = {{\n{mappings}}}\n"
        )

    def start(self) -> NatsServer:
        folder = self._folder()
        conf = folder / "nats.conf"
        conf.write_text(self.config_text(folder))
        self._launch(conf, (self.port, self.mqtt_port))
        return self

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
