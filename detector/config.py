"""The daemon's configuration: one typed, frozen object, loaded once.

Loaded in three steps (find the file, parse the TOML text, build from a dict)
then environment overrides ``RNNSENTRY_SECTION__KEY`` and command-line flags.
Unknown keys and wrong types are errors; :func:`build_config` collects every
problem with its key. Secrets come from files, never from the TOML itself.
Each section is plain data; beside errors it imports only the setting types of the
pure parts it configures (payload, routing, scoring), never the engine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from detector.errors import ConfigError
from detector.logs import LOG_FORMATS
from detector.payload import PayloadLimits
from detector.routing import TopicTemplate
from detector.scoring import ScoringConfig

ENV_PREFIX: Final = "RNNSENTRY_"
MQTT_PROTOCOLS: Final = ("5", "3.1.1")


def host_name() -> str:
    """This machine's name up to its first dot: the default instance name, so that daemons
    on different machines get client ids of their own (and a topic level NATS takes: no ".")."""
    return socket.gethostname().split(".")[0] or "rnnsentry"


@dataclass(frozen=True)
class DaemonConfig:
    # Names the status topic and the MQTT client id; default: the host name (host_name).
    instance: str = field(default_factory=host_name)
    log_level: str = "INFO"
    log_format: str = "text"  # "text": readable lines; "json": one JSON object a line
    workers: int = -1  # scoring processes beside the one that reads the broker: -1, one per
    # core but one (at least 1, at most 8); 0, none (the reading process scores too)

    @property
    def scoring_processes(self) -> int:
        """``workers`` with -1 resolved on this machine."""
        if self.workers >= 0:
            return self.workers
        return max(1, min(8, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class MqttConfig:
    broker: str = "mqtt://127.0.0.1:1883"  # mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)
    client_id: str = ""  # default: rnnsentry-<instance>; fixed so the session persists
    username: str = ""
    password_file: str = ""  # file holding the password; or $CREDENTIALS_DIRECTORY/mqtt_password
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_insecure: bool = False  # skip hostname checks (tests only)
    keepalive_s: int = 30
    protocol: str = "5"  # "5" or "3.1.1" (NATS's MQTT listener); a persistent session in both
    session_expiry_s: int = 3600  # MQTT 5 session kept this long while we are away
    qos: int = 1  # subscription QoS for sensor input
    alert_topic: str = "rnnsentry/alerts/{stream}"
    score_topic: str = "rnnsentry/scores/{stream}"
    publish_scores: bool = False  # per-step scores on score_topic, QoS 0
    status_topic: str = "rnnsentry/status/{instance}"
    state_topic: str = "rnnsentry/state/{stream}"  # retained: each stream's alert state ("": off)
    homeassistant_prefix: str = ""  # e.g. "homeassistant": MQTT discovery, a sensor a stream
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    @property
    def broker_url(self) -> SplitResult:
        """``broker`` taken apart; a bare ``HOST:PORT`` is read as ``mqtt://HOST:PORT``."""
        return urlsplit(self.broker if "://" in self.broker else f"mqtt://{self.broker}")

    @property
    def host_port_tls(self) -> tuple[str, int, bool]:
        parts = self.broker_url
        tls = parts.scheme in ("mqtts", "ssl", "tls")
        return parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls


@dataclass(frozen=True)
class ModelConfig:
    path: str
    name: str = ""  # default: the name stored in the model file
    topics: list[str] = field(default_factory=lambda: ["sensors/{stream}"])


@dataclass(frozen=True)
class StreamConfig:
    """Limits on the streams one model keeps state for."""

    max_streams: int = 100_000
    idle_ttl_s: float = 86_400.0  # a stream unseen this long is forgotten
    max_gap_s: float | None = None  # a gap longer than this resets a stream's state
    max_gap_intervals: float = 10.0  # ... or this many of the model's sample intervals

    def gap_limit(self, interval_s: float | None) -> float:
        """The gap in seconds beyond which a stream's state is reset, for a model sampled
        every ``interval_s`` (None: unknown, so only ``max_gap_s`` can set one).

        >>> StreamConfig().gap_limit(2.0), StreamConfig(max_gap_s=5.0).gap_limit(2.0)
        (20.0, 5.0)
        """
        if self.max_gap_s is not None:
            return self.max_gap_s
        if interval_s:
            return self.max_gap_intervals * interval_s
        return math.inf


@dataclass(frozen=True)
class BatchConfig:
    max: int = 512  # messages per micro-batch
    max_wait_ms: float = 2.0  # how long a non-full batch waits for more
    queue_size: int = 100_000  # bound on the queue (a backstop: due batches are scored first)


@dataclass(frozen=True)
class RuntimeConfig:
    providers: list[str] = field(default_factory=lambda: ["cpu"])  # "cuda" first for a GPU
    intra_op_threads: int = 1


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # this machine only; "0.0.0.0" (or an address) to serve others
    port: int = 9108


@dataclass(frozen=True)
class SnapshotConfig:
    path: str = ""  # where the state table is saved; empty: no snapshots
    interval_s: float = 60.0  # also written at shutdown; restored at start if the model matches


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    models: list[ModelConfig] = field(default_factory=list)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    streams: StreamConfig = field(default_factory=StreamConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    payload: PayloadLimits = field(default_factory=PayloadLimits)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"rnnsentry-{self.daemon.instance}"


_SECTIONS: Final[dict[str, Any]] = {
    name: hint for name, hint in typing.get_type_hints(Config).items() if name != "models"
}


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class EnvText(str):
    """A value from the environment: text, read as TOML when its field is not text."""


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against a simple type hint, widening int to float."""
    if isinstance(value, EnvText) and hint is not str:
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            problems.append(f"{key}: cannot read {str(value)!r} from the environment")
            return None
        return _coerce(value, hint, key, problems)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list")
            return None
        return [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        problems.append(f"{key}: expected {hint.__name__}, got {type(value).__name__}")
        return None
    return value


def _section(cls: Any, data: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{key}: expected a table")
        return None
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    for name in data:
        if name not in known:
            problems.append(f"{key}.{name}: unknown key")
    kwargs = {
        name: _coerce(value, hints[name], f"{key}.{name}", problems)
        for name, value in data.items()
        if name in known
    }
    missing = [
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    for name in missing:
        problems.append(f"{key}.{name}: required")
    if missing or any(v is None and hints[k] is not type(None) for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{key}: {exc}")
        return None


def build_config(doc: dict[str, Any]) -> tuple[Config, list[str]]:
    """Build a Config from a dict; returns it with the list of every problem found."""
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for name, value in doc.items():
        if name == "models":
            if not isinstance(value, list):
                problems.append("models: expected an array of tables ([[models]])")
                continue
            models = [
                _section(ModelConfig, m, f"models[{i}]", problems) for i, m in enumerate(value)
            ]
            parts["models"] = [m for m in models if m is not None]
        elif name in _SECTIONS:
            section = _section(_SECTIONS[name], value, name, problems)
            if section is not None:
                parts[name] = section
        else:
            problems.append(f"{name}: unknown section")
    config = Config(**parts)
    problems.extend(check_config(config))
    return config, problems


def check_config(config: Config) -> list[str]:
    """Cross-field checks that a single section cannot make on its own."""
    problems = [f"scoring: {p}" for p in config.scoring.validate()]
    if config.batch.max < 1:
        problems.append("batch.max: must be at least 1")
    if config.daemon.log_format not in LOG_FORMATS:
        problems.append(f"daemon.log_format: one of {', '.join(LOG_FORMATS)}")
    if not -1 <= config.daemon.workers <= 256:
        problems.append("daemon.workers: must be -1 (automatic), 0 or a count up to 256")
    if config.batch.queue_size < config.batch.max:
        problems.append("batch.queue_size: must be at least batch.max")
    if config.streams.max_streams < config.batch.max:
        problems.append("streams.max_streams: must be at least batch.max")
    if config.mqtt.protocol not in MQTT_PROTOCOLS:
        problems.append('mqtt.protocol: "5" or "3.1.1" (a string)')
    if config.mqtt.qos not in (0, 1):
        problems.append("mqtt.qos: must be 0 or 1")
    if "{stream}" not in config.mqtt.alert_topic:
        problems.append("mqtt.alert_topic: must contain {stream}")
    state = config.mqtt.state_topic
    if state and ("{stream}" not in state or any(c in state for c in "+#")):
        problems.append("mqtt.state_topic: must contain {stream}, and no '+' or '#' (or be empty)")
    prefix = config.mqtt.homeassistant_prefix
    if prefix and (not state or any(c in prefix for c in "+#")):
        problems.append("mqtt.homeassistant_prefix: a topic prefix without '+' or '#', and"
                        " mqtt.state_topic set (the sensors read it)")  # fmt: skip
    instance = config.daemon.instance
    if not instance or any(c in instance for c in "+#\x00"):
        problems.append("daemon.instance: must be non-empty, without '+', '#' or NUL: it names"
                        " the status topic and the MQTT client id")  # fmt: skip
    else:
        try:
            status = config.mqtt.status_topic.format(instance=instance)
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(f"mqtt.status_topic: only {{instance}} may be filled in ({exc!r})")
        else:
            if any(c in status for c in "+#") or not status:
                problems.append("mqtt.status_topic: a topic name, without '+' or '#'")
    broker = config.mqtt.broker_url
    if broker.scheme not in ("mqtt", "mqtts", "tcp", "ssl", "tls"):
        problems.append("mqtt.broker: use mqtt://HOST:PORT or mqtts://HOST:PORT")
    if "@" in broker.netloc:  # credentials in the URL: never used, and it would be logged
        problems.append("mqtt.broker: no user or password in the URL; give mqtt.username and"
                        " mqtt.password_file (or the mqtt_password credential)")  # fmt: skip
    if not 0 <= config.metrics.port < 65536:
        problems.append("metrics.port: must be 0..65535")
    for i, model in enumerate(config.models):
        if not model.topics:
            problems.append(f"models[{i}].topics: give at least one topic template")
        for topic in model.topics:
            try:
                TopicTemplate.parse(topic)
            except ValueError as exc:
                problems.append(f"models[{i}].topics: {exc}")
    return problems


def env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``RNNSENTRY_SECTION__KEY=value`` as nested dict entries (text, typed when built).

    >>> env_overrides({"RNNSENTRY_BATCH__MAX": "64", "RNNSENTRY_MQTT__BROKER": "mqtt://h:1"})
    {'batch': {'max': '64'}, 'mqtt': {'broker': 'mqtt://h:1'}}
    """
    out: dict[str, dict[str, Any]] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, key = name[len(ENV_PREFIX) :].lower().split("__", 1)
        out.setdefault(section, {})[key] = EnvText(text)
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# The settings that name a file, by section ("models" is an array of tables).
_PATH_KEYS: Final = {
    "models": ("path",),
    "mqtt": ("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file"),
    "snapshot": ("path",),
}


def anchor_paths(doc: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``doc`` with each relative file path it names joined to ``folder``: a config file's
    paths are read against its own folder, whatever the working directory. Empty and
    absolute paths, and values of the wrong type (left to :func:`build_config`), stay.

    >>> doc = {"models": [{"path": "m.onnx"}], "snapshot": {"path": "/var/s"},
    ...        "mqtt": {"password_file": "", "tls_ca_file": "../ca.pem"}}
    >>> anchor_paths(doc, "/etc/rnnsentry")  # doctest: +NORMALIZE_WHITESPACE
    {'models': [{'path': '/etc/rnnsentry/m.onnx'}], 'snapshot': {'path': '/var/s'},
     'mqtt': {'password_file': '', 'tls_ca_file': '/etc/ca.pem'}}
    """

    def anchored(table: Any, keys: tuple[str, ...]) -> Any:
        if not isinstance(table, dict):
            return table
        out = dict(table)
        for key in keys:
            value = out.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                out[key] = os.path.normpath(os.path.join(folder, value))
        return out

    out = dict(doc)
    for section, keys in _PATH_KEYS.items():
        value = out.get(section)
        if isinstance(value, list):
            out[section] = [anchored(table, keys) for table in value]
        elif section in out:
            out[section] = anchored(value, keys)
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict, its relative file paths read against its folder
    (:func:`anchor_paths`); paths from the environment or flags stay as given."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return anchor_paths(doc, os.path.dirname(os.path.abspath(path)))


def load_config(
    path: str | Path | None,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[Config, list[str]]:
    """File, then environment, then flags (already shaped as a nested dict)."""
    doc = read_toml(path) if path else {}
    doc = merge(doc, env_overrides(dict(os.environ if environ is None else environ)))
    doc = merge(doc, flags or {})
    return build_config(doc)


def read_password(config: MqttConfig, environ: dict[str, str] | None = None) -> str | None:
    """The MQTT password from password_file or systemd's credentials directory."""
    env = os.environ if environ is None else environ
    path = config.password_file
    if not path and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / "mqtt_password"
        path = str(candidate) if candidate.exists() else ""
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"mqtt.password_file: cannot read {path}: {exc.strerror}") from None


def with_models(config: Config, models: list[ModelConfig]) -> Config:
    return replace(config, models=models)
