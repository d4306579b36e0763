"""TLS and passwords against a real mosquitto: certificates the test makes with the openssl
command line, a password file made with mosquitto_passwd, and clear errors when refused."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from detector.daemon import Daemon
from tests.support import (
    CONNECT_TIMEOUT_S,
    MESSAGE_TIMEOUT_S,
    TINY_FEATURES,
    InProcessDaemons,
    daemon_config,
    metric_value,
    poll_until,
    readyz,
    sample_payload,
    scrape,
    tiny_fleet,
)
from training.demo.localbroker import Mosquitto, TlsFiles

pytestmark = pytest.mark.integration

USER = "sentry"
PASSWORD = "correct horse battery staple"
REFUSED_TEXTS = ("bad user name or password", "not authorized")  # MQTT 5 CONNACK 0x86, 0x87
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a broker certificate it signed, a client certificate it signed,
    and a second CA that signed nothing of the broker's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _make_ca(cwd: Path, name: str) -> None:
    _openssl(cwd, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN=rnnsentry test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def _make_leaf(cwd: Path, name: str, cn: str, extensions: str, serial: int) -> None:
    _openssl(cwd, "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}")  # fmt: skip
    (cwd / f"{name}.ext").write_text(
        f"{extensions}\nkeyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", str(serial), "-days", "2", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    _make_leaf(d, "server", "127.0.0.1", server_ext, 1001)
    _make_leaf(d, "client", "rnnsentry", "extendedKeyUsage=clientAuth", 1002)
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "other-ca.crt")  # fmt: skip


@pytest.fixture
def tls_broker(pki: Pki) -> Iterator[Mosquitto]:
    """mosquitto with one TLS listener that wants a client certificate signed by the CA."""
    files = TlsFiles(str(pki.ca), str(pki.server_cert), str(pki.server_key))
    broker = Mosquitto(tls=files)
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """mosquitto that knows one user and admits nobody anonymous."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (package mosquitto)")
    passwords = tmp_path / "passwords"
    done = subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), USER, PASSWORD],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    broker = Mosquitto(password_file=str(passwords))
    try:
        yield broker.start()
    finally:
        broker.stop()


def _daemon_tls(pki: Pki, ca: Path) -> dict[str, str]:
    """[mqtt] TLS settings: trust ``ca``, show the client certificate."""
    return {"tls_ca_file": str(ca), "tls_cert_file": str(pki.client_cert),
            "tls_key_file": str(pki.client_key)}  # fmt: skip


def _metric(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float | None:
    assert daemon.server is not None
    return metric_value(scrape(daemon.server.port)[1], name, labels)


def _publish_samples(port: int, n: int, *, pki: Pki | None = None,
                     password: str | None = None) -> None:  # fmt: skip
    """Publish ``n`` samples on sensors/secure-1 as a client with certificate or password."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if pki is not None:
        client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert),
                       keyfile=str(pki.client_key))  # fmt: skip
    if password is not None:
        client.username_pw_set(USER, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        rows = tiny_fleet(n_streams=1, n_steps=max(n, 2), seed=9, start_step=600).values[0]
        for t in range(n):
            payload = sample_payload(TINY_FEATURES, rows[t], 100.0 + t)
            client.publish("sensors/secure-1", payload, qos=1).wait_for_publish(
                timeout=MESSAGE_TIMEOUT_S
            )
    finally:
        client.disconnect()
        client.loop_stop()


def _unready_reason(daemon: Daemon) -> str:
    """/readyz's body once it is 503 with the last failure in brackets, else ""."""
    code, body = readyz(daemon)
    return body if code == 503 and "(" in body else ""


def _scored(daemon: Daemon) -> float | None:
    return _metric(daemon, "rnnsentry_messages_total", {"outcome": "scored"})


# --- TLS ---


def test_tls_with_a_ca_and_client_certificate_connects_and_scores(
    tls_broker: Mosquitto, pki: Pki, tiny_model: Path, start_daemon: InProcessDaemons
) -> None:
    assert tls_broker.url.startswith("mqtts://127.0.0.1:")
    config = daemon_config(tls_broker.url, tiny_model, instance="secure",
                           mqtt=_daemon_tls(pki, pki.ca))  # fmt: skip
    daemon = start_daemon(config, ready_within=None)
    poll_until(lambda: readyz(daemon)[0] == 200, CONNECT_TIMEOUT_S)
    assert _metric(daemon, "rnnsentry_mqtt_connected") == 1
    _publish_samples(tls_broker.port, 5, pki=pki)
    poll_until(lambda: _scored(daemon) == 5)


# paho 2.2 does not close its SSL socket when the handshake fails (Client._ssl_wrap_socket);
# the garbage collector does, with a ResourceWarning that is not ours.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tls_against_a_broker_the_ca_did_not_sign_is_unready_and_says_why(
    tls_broker: Mosquitto, pki: Pki, tiny_model: Path, start_daemon: InProcessDaemons,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    config = daemon_config(tls_broker.url, tiny_model, instance="secure",
                           mqtt=_daemon_tls(pki, pki.other_ca))  # fmt: skip
    daemon = start_daemon(config, ready_within=None)
    why = poll_until(lambda: _unready_reason(daemon), CONNECT_TIMEOUT_S)
    assert "certificate verify failed" in why, why
    assert _metric(daemon, "rnnsentry_mqtt_connected") == 0
    logged = [r for r in caplog.records if r.name == "detector.mqtt"]
    assert any("certificate verify failed" in r.getMessage() for r in logged)


# --- username and password ---


def test_the_right_password_from_a_file_connects_and_scores(
    password_broker: Mosquitto, tiny_model: Path, tmp_path: Path, start_daemon: InProcessDaemons
) -> None:
    secret = tmp_path / "mqtt_password"
    secret.write_text(PASSWORD + "\n")
    config = daemon_config(password_broker.url, tiny_model, instance="secure",
                           mqtt={"username": USER, "password_file": str(secret)})  # fmt: skip
    daemon = start_daemon(config, ready_within=None)
    poll_until(lambda: readyz(daemon)[0] == 200, CONNECT_TIMEOUT_S)
    _publish_samples(password_broker.port, 5, password=PASSWORD)
    poll_until(lambda: _scored(daemon) == 5)


def test_a_wrong_password_is_refused_with_a_clear_error(
    password_broker: Mosquitto, tiny_model: Path, tmp_path: Path, start_daemon: InProcessDaemons,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="detector.mqtt")
    secret = tmp_path / "mqtt_password"
    secret.write_text("not the password\n")
    config = daemon_config(password_broker.url, tiny_model, instance="secure",
                           mqtt={"username": USER, "password_file": str(secret)})  # fmt: skip
    daemon = start_daemon(config, ready_within=None)

    why = poll_until(lambda: _unready_reason(daemon), CONNECT_TIMEOUT_S).lower()
    assert why.startswith("not connected to the broker")
    assert any(text in why for text in REFUSED_TEXTS), why
    assert _metric(daemon, "rnnsentry_mqtt_connected") == 0
    # It keeps retrying with backoff, and says so once, not on every attempt.
    poll_until(lambda: password_broker.log_tail(20_000).count("not authorised") >= 2)
    errors = [r.getMessage().lower() for r in caplog.records
              if r.name == "detector.mqtt" and r.levelno == logging.ERROR]  # fmt: skip
    assert len(errors) == 1 and "refused" in errors[0], errors
    assert any(text in errors[0] for text in REFUSED_TEXTS), errors
