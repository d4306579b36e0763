"""training.demo.localbroker: mosquitto and nats-server are found on PATH or where Debian
puts them, or said to be missing; a run stages its files in a folder of its own and leaves
nothing behind; NATS's MQTT listener carries a partition mapping."""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.client as paho
import pytest

import training.demo.localbroker as localbroker
from tests.support import NATS_PARTITIONS, Listener, Publisher, wait_for
from training.demo.localbroker import Mosquitto, MosquittoMissing, NatsMissing, NatsServer


def executable(folder: Path, name: str = "mosquitto") -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_mosquitto_is_found_on_path_then_in_the_sbin_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path, sbin = tmp_path / "bin", tmp_path / "sbin"
    on_path.mkdir()
    sbin.mkdir()
    monkeypatch.setenv("PATH", str(on_path))
    monkeypatch.setattr(localbroker, "SBIN_DIRS", (str(sbin),))
    assert localbroker.find_mosquitto() is None
    with pytest.raises(MosquittoMissing, match="sudo apt-get install mosquitto"):
        Mosquitto()
    in_sbin = executable(sbin)
    assert localbroker.find_mosquitto() == str(in_sbin)  # not on PATH for a plain user
    assert localbroker.find_mosquitto() == Mosquitto().binary
    first = executable(on_path)
    assert localbroker.find_mosquitto() == str(first)  # PATH comes first


@pytest.mark.integration
def test_a_stopped_broker_leaves_nothing_in_the_temp_dir() -> None:
    """Each start stages a config (and secrets) in a folder of its own; stop removes it and
    keeps the log to read, so a test run leaves no folders behind."""
    broker = Mosquitto()
    assert broker.dir is None  # made but never started: nothing on disk
    broker.start()
    folder = broker.dir
    assert folder is not None and (folder / "mosquitto.conf").exists()
    broker.restart()
    assert not folder.exists()  # the first run's folder went with it
    second = broker.dir
    broker.stop()
    assert second is not None and not second.exists() and broker.dir is None
    assert "mosquitto" in broker.log_tail()  # the last run's log, from memory


def test_nats_server_is_found_as_mosquitto_is_or_said_to_be_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(localbroker, "SBIN_DIRS", (str(tmp_path / "sbin"),))
    assert localbroker.find_nats_server() is None
    with pytest.raises(NatsMissing, match="sudo apt-get install nats-server"):
        NatsServer()
    found = executable(tmp_path, "nats-server")
    assert localbroker.find_nats_server() == str(found) == NatsServer().binary


@pytest.mark.integration
def test_nats_puts_each_stream_in_one_partition_over_mqtt_3_1_1_and_leaves_nothing() -> None:
    if localbroker.find_nats_server() is None:
        pytest.skip("nats-server is not installed here (make setup installs it as root)")
    server = NatsServer(NATS_PARTITIONS).start()
    folder = server.dir
    try:
        assert folder is not None and (folder / "nats.conf").exists()
        listener = Listener(server.mqtt_port, ["part/+/sensors/+"], protocol=paho.MQTTv311)
        publisher = Publisher(server.mqtt_port, protocol=paho.MQTTv311)
        streams = [f"pump-{i}" for i in range(30)]
        for round_ in range(2):
            for stream in streams:
                publisher.send(f"sensors/{stream}", json.dumps({"n": round_}), qos=1)
        publisher.close()
        where: dict[str, set[str]] = {s: set() for s in streams}
        for _ in range(2 * len(streams)):
            topic, _, _ = wait_for(listener.messages, lambda m: True)
            _, part, _, stream = topic.split("/")
            where[stream].add(part)
        listener.close()
        assert all(len(parts) == 1 for parts in where.values()), where  # one partition each
        assert set().union(*where.values()) == {"0", "1", "2"}
    finally:
        server.stop()
    assert not folder.exists() and server.dir is None
    assert "Listening for MQTT clients" in server.log_tail(100_000)
