"""detector.config: building from dicts, every problem with its key, the three layers."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from detector.config import (
    BatchConfig,
    Config,
    DaemonConfig,
    ModelConfig,
    MqttConfig,
    build_config,
    check_config,
    env_overrides,
    load_config,
    read_password,
    read_toml,
)
from detector.errors import ConfigError
from detector.scoring import ScoringConfig


def problems_of(doc: dict[str, object]) -> list[str]:
    return build_config(doc)[1]


def test_empty_document_builds_the_defaults() -> None:
    config, problems = build_config({})
    assert problems == []
    assert config == Config()
    assert config.batch.max == 512 and config.models == []
    assert config.mqtt.protocol == "5"


def test_the_instance_defaults_to_the_host_name_and_the_client_id_derives_from_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = socket.gethostname().split(".")[0]
    assert here and Config().daemon.instance == here
    assert Config().client_id == f"rnnsentry-{here}"
    # Up to the first dot: NATS refuses '.' in a topic, and the status topic holds it.
    monkeypatch.setattr(socket, "gethostname", lambda: "edge-7.plant.example.com")
    config, problems = build_config({})
    assert problems == []
    assert config.daemon.instance == "edge-7" and config.client_id == "rnnsentry-edge-7"
    assert build_config({"daemon": {"instance": "a"}})[0].client_id == "rnnsentry-a"
    given = build_config({"daemon": {"instance": "a"}, "mqtt": {"client_id": "mine"}})[0]
    assert given.client_id == "mine"


@pytest.mark.parametrize(
    ("environ", "protocol"),
    [({}, "5"), ({"RNNSENTRY_MQTT__PROTOCOL": "3.1.1"}, "3.1.1"),
     ({"RNNSENTRY_MQTT__PROTOCOL": "5"}, "5")],
)  # fmt: skip
def test_the_mqtt_protocol_is_5_or_3_1_1_from_the_file_or_the_environment(
    environ: dict[str, str], protocol: str
) -> None:
    config, problems = load_config(None, environ=environ)
    assert problems == [] and config.mqtt.protocol == protocol
    assert build_config({"mqtt": {"protocol": "3.1.1"}})[0].mqtt.protocol == "3.1.1"


@pytest.mark.parametrize("value", ["4", "3.1", "mqtt5", 5, 3.1])
def test_another_mqtt_protocol_is_refused_by_its_key(value: object) -> None:
    problems = problems_of({"mqtt": {"protocol": value}})
    assert len(problems) == 1 and problems[0].startswith("mqtt.protocol"), problems


def test_sections_and_models_build_typed_objects() -> None:
    config, problems = build_config({
        "daemon": {"instance": "edge1"},
        "batch": {"max": 64, "queue_size": 1000},
        "mqtt": {"broker": "mqtts://broker.local:8884", "tls_insecure": True},
        "streams": {"max_gap_s": 30.0},
        "models": [{"path": "m.onnx"}, {"path": "n.onnx", "topics": ["p/{stream}"]}],
    })  # fmt: skip
    assert problems == []
    assert config.daemon.instance == "edge1" and config.client_id == "rnnsentry-edge1"
    assert config.batch == BatchConfig(max=64, queue_size=1000)
    assert config.mqtt.host_port_tls == ("broker.local", 8884, True)
    assert config.streams.max_gap_s == 30.0
    assert config.models == [
        ModelConfig(path="m.onnx"),
        ModelConfig(path="n.onnx", topics=["p/{stream}"]),
    ]
    assert config.models[0].topics == ["sensors/{stream}"]


def test_unknown_section_is_reported_by_name() -> None:
    problems = problems_of({"batchh": {"max": 1}})
    assert len(problems) == 1
    assert "batchh" in problems[0] and "unknown" in problems[0]


def test_unknown_key_is_reported_with_its_section() -> None:
    problems = problems_of({"batch": {"maxx": 64}})
    assert len(problems) == 1
    assert "batch.maxx" in problems[0] and "unknown" in problems[0]


def test_every_problem_is_reported_not_just_the_first() -> None:
    problems = problems_of({
        "nope": {},
        "batch": {"maxx": 1},
        "mqtt": {"keepalive_s": "30"},
        "models": [{"topics": ["s/{stream}"]}],
    })  # fmt: skip
    joined = "\n".join(problems)
    for key in ("nope", "batch.maxx", "mqtt.keepalive_s", "models[0].path"):
        assert key in joined


@pytest.mark.parametrize(
    ("doc", "key", "expected"),
    [
        ({"batch": {"max": "64"}}, "batch.max", "int"),
        ({"batch": {"max": 6.4}}, "batch.max", "int"),
        ({"metrics": {"port": True}}, "metrics.port", "int"),
        ({"mqtt": {"tls_insecure": 1}}, "mqtt.tls_insecure", "bool"),
        ({"metrics": {"enabled": "yes"}}, "metrics.enabled", "bool"),
        ({"mqtt": {"username": 42}}, "mqtt.username", "str"),
        ({"batch": {"max_wait_ms": "2"}}, "batch.max_wait_ms", "float"),
        ({"mqtt": {"reconnect_min_s": False}}, "mqtt.reconnect_min_s", "float"),
        ({"streams": {"max_gap_s": "1"}}, "streams.max_gap_s", "float"),
        ({"runtime": {"providers": ["cpu", 3]}}, "runtime.providers[1]", "str"),
        ({"runtime": {"providers": "cpu"}}, "runtime.providers", "list"),
    ],
)
def test_wrong_types_are_reported_with_key_and_expected_type(
    doc: dict[str, object], key: str, expected: str
) -> None:
    problems = problems_of(doc)
    assert len(problems) == 1, problems
    assert problems[0].startswith(key + ":")
    assert expected in problems[0]


def test_int_is_accepted_for_float() -> None:
    config, problems = build_config({
        "batch": {"max_wait_ms": 5},
        "mqtt": {"reconnect_max_s": 60},
        "streams": {"max_gap_s": 7},
        "scoring": {"spatial_tolerance": 1},
    })  # fmt: skip
    assert problems == []
    for value, expected in [
        (config.batch.max_wait_ms, 5.0),
        (config.mqtt.reconnect_max_s, 60.0),
        (config.streams.max_gap_s, 7.0),
        (config.scoring.spatial_tolerance, 1.0),
    ]:
        assert type(value) is float and value == expected


def test_a_section_that_is_not_a_table() -> None:
    problems = problems_of({"batch": 5})
    assert problems == ["batch: expected a table"]


def test_models_must_be_an_array_of_tables() -> None:
    assert "models" in problems_of({"models": {"path": "m.onnx"}})[0]
    problems = problems_of({"models": [{"path": "m.onnx"}, 3]})
    assert len(problems) == 1 and problems[0].startswith("models[1]")


def test_a_model_needs_a_path() -> None:
    problems = problems_of({"models": [{"name": "pumps"}]})
    assert problems == ["models[0].path: required"]


def test_scoring_section_goes_through_validate() -> None:
    problems = problems_of({"scoring": {"threshold": 0.9, "clear_threshold": 0.95}})
    assert len(problems) == 1 and problems[0].startswith("scoring:")


# --- cross-field checks on a built Config ---


def test_check_config_passes_the_defaults() -> None:
    assert check_config(Config()) == []


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (Config(scoring=ScoringConfig(threshold=0.99, clear_threshold=0.999)), "scoring"),
        (Config(batch=BatchConfig(max=64, queue_size=63)), "batch.queue_size"),
        (Config(batch=BatchConfig(max=0)), "batch.max"),
        (Config(mqtt=MqttConfig(qos=2)), "mqtt.qos"),
        (Config(mqtt=MqttConfig(alert_topic="alerts/all")), "mqtt.alert_topic"),
        (Config(mqtt=MqttConfig(broker="http://h:1")), "mqtt.broker"),
        (Config(mqtt=MqttConfig(broker="mqtts://user:s3cret@h:8883")), "mqtt.broker"),
        (Config(daemon=DaemonConfig(workers=-2)), "daemon.workers"),
        (Config(models=[ModelConfig(path="m", topics=["sensors/all"])]), "models[0].topics"),
        (
            Config(models=[ModelConfig("m"), ModelConfig("n", topics=["{stream}/x/{stream}"])]),
            "models[1].topics",
        ),
    ],
)
def test_check_config_names_the_bad_key(config: Config, key: str) -> None:
    problems = check_config(config)
    assert len(problems) == 1, problems
    assert problems[0].startswith(key)


def test_a_password_in_the_broker_url_is_refused_and_not_repeated() -> None:
    problems = check_config(Config(mqtt=MqttConfig(broker="mqtts://user:s3cret@h:8883")))
    assert problems and "s3cret" not in " ".join(problems) and "password_file" in problems[0]
    assert check_config(Config(mqtt=MqttConfig(broker="localhost:1883"))) == []


def test_check_config_max_streams_below_batch_max() -> None:
    from detector.config import StreamConfig

    problems = check_config(Config(streams=StreamConfig(max_streams=10)))
    assert problems == ["streams.max_streams: must be at least batch.max"]


def test_build_config_includes_cross_field_problems() -> None:
    problems = problems_of({"batch": {"max": 64, "queue_size": 8}})
    assert problems == ["batch.queue_size: must be at least batch.max"]


# --- environment and flags ---


def test_env_overrides_are_typed_by_their_field() -> None:
    doc = env_overrides({
        "RNNSENTRY_BATCH__MAX": "64",
        "RNNSENTRY_BATCH__MAX_WAIT_MS": "0.5",
        "RNNSENTRY_MQTT__TLS_INSECURE": "true",
        "RNNSENTRY_MQTT__BROKER": "mqtt://h:1",
        "RNNSENTRY_MQTT__USERNAME": "007",
        "RNNSENTRY_DAEMON__INSTANCE": "42",
        "RNNSENTRY_RUNTIME__PROVIDERS": '["cuda", "cpu"]',
        "RNNSENTRY_NOSECTION": "1",
        "OTHER_BATCH__MAX": "1",
        "PATH": "/usr/bin",
    })  # fmt: skip
    assert set(doc) == {"batch", "mqtt", "daemon", "runtime"}
    config, problems = build_config(doc)
    assert problems == []
    assert config.batch.max == 64 and config.batch.max_wait_ms == 0.5
    assert config.mqtt.tls_insecure is True and config.mqtt.broker == "mqtt://h:1"
    # text fields stay text even when they look like numbers
    assert config.mqtt.username == "007" and config.daemon.instance == "42"
    assert config.runtime.providers == ["cuda", "cpu"]


def test_env_value_of_the_wrong_type_is_reported_with_its_key() -> None:
    _, problems = build_config(env_overrides({"RNNSENTRY_BATCH__MAX": "many"}))
    assert any(p.startswith("batch.max") for p in problems)


def test_env_override_of_an_unknown_section_is_reported() -> None:
    _, problems = load_config(None, environ={"RNNSENTRY_BOGUS__X": "1"})
    assert problems == ["bogus: unknown section"]


def write_toml(tmp_path: Path) -> Path:
    path = tmp_path / "rnnsentry.toml"
    path.write_text(
        "[batch]\nmax = 128\nqueue_size = 5000\n\n"
        '[mqtt]\nbroker = "mqtt://file-host:1883"\n\n'
        '[[models]]\npath = "pumps.onnx"\n',
        encoding="utf-8",
    )
    return path


def test_load_config_file_values(tmp_path: Path) -> None:
    config, problems = load_config(write_toml(tmp_path), environ={})
    assert problems == []
    assert (config.batch.max, config.batch.queue_size) == (128, 5000)
    assert config.mqtt.broker == "mqtt://file-host:1883"
    assert config.models == [ModelConfig(path=str(tmp_path / "pumps.onnx"))]  # beside the file


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path)
    env = {"RNNSENTRY_BATCH__MAX": "64", "RNNSENTRY_MQTT__BROKER": "mqtt://env-host:1"}
    config, problems = load_config(path, environ=env)
    assert problems == []
    assert config.batch.max == 64
    assert config.batch.queue_size == 5000  # the file's other keys in the section stay
    assert config.mqtt.broker == "mqtt://env-host:1"
    config, problems = load_config(path, environ=env, flags={"batch": {"max": 32}})
    assert problems == []
    assert config.batch.max == 32
    assert config.mqtt.broker == "mqtt://env-host:1"
    assert config.batch.queue_size == 5000


def test_relative_paths_in_a_file_are_read_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = folder / "rnnsentry.toml"
    path.write_text(
        '[mqtt]\npassword_file = "secret"\ntls_ca_file = "../ca.pem"\n'
        'tls_cert_file = "/abs/cert.pem"\ntls_key_file = "tls/key.pem"\n\n'
        '[snapshot]\npath = "state/s.snap"\n\n[[models]]\npath = "m.onnx"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    config, problems = load_config(path, environ={})
    assert problems == []
    assert config.models[0].path == str(folder / "m.onnx")
    assert config.mqtt.password_file == str(folder / "secret")
    assert config.mqtt.tls_ca_file == str(tmp_path / "ca.pem")
    assert config.mqtt.tls_cert_file == "/abs/cert.pem"  # absolute: as written
    assert config.mqtt.tls_key_file == str(folder / "tls" / "key.pem")
    assert config.snapshot.path == str(folder / "state" / "s.snap")
    # The same from a relative --config: still the file's folder, made absolute.
    monkeypatch.chdir(tmp_path)
    relative, _ = load_config("etc/rnnsentry.toml", environ={})
    assert relative.models[0].path == str(folder / "m.onnx")
    # From the environment and the command line: as given, for the working directory.
    config, problems = load_config(path, environ={"RNNSENTRY_SNAPSHOT__PATH": "here.snap",
                                                  "RNNSENTRY_MQTT__PASSWORD_FILE": "pw"},
                                   flags={"models": [{"path": "mine.onnx"}]})  # fmt: skip
    assert problems == []
    assert (config.snapshot.path, config.mqtt.password_file) == ("here.snap", "pw")
    assert config.models[0].path == "mine.onnx"


def test_explicit_environ_ignores_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RNNSENTRY_BATCH__MAX", "16")
    path = write_toml(tmp_path)
    assert load_config(path, environ={})[0].batch.max == 128
    assert load_config(path)[0].batch.max == 16  # environ=None reads os.environ


def test_env_values_are_type_checked_like_file_values() -> None:
    _, problems = load_config(None, environ={"RNNSENTRY_BATCH__MAX": "lots"})
    assert len(problems) == 1 and problems[0].startswith("batch.max:")


def test_read_toml_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[batch\nmax = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError):
        load_config(bad, environ={})


# --- secrets ---


def test_read_password_from_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    config = MqttConfig(password_file=str(secret))
    assert read_password(config, environ={}) == "s3cret"


def test_read_password_from_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "mqtt_password").write_text("from-systemd\n", encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_password(MqttConfig(), environ=env) == "from-systemd"


def test_password_file_wins_over_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "mqtt_password").write_text("from-systemd", encoding="utf-8")
    secret = tmp_path / "pw"
    secret.write_text("from-file", encoding="utf-8")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_password(MqttConfig(password_file=str(secret)), environ=env) == "from-file"


def test_no_password_anywhere_is_none(tmp_path: Path) -> None:
    assert read_password(MqttConfig(), environ={}) is None
    assert read_password(MqttConfig(), environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    config = MqttConfig(password_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="password_file"):
        read_password(config, environ={})


def test_config_objects_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().batch.max = 1  # type: ignore[misc]


def test_the_example_config_documents_every_scoring_default() -> None:
    """deploy/rnnsentry.toml lists every [scoring] key at its default, so the file a user
    copies says what the daemon does without it."""
    import dataclasses
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).parents[2] / "deploy" / "rnnsentry.toml").read_text())
    assert doc["scoring"] == dataclasses.asdict(ScoringConfig())
