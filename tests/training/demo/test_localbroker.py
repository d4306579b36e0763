"""training.demo.localbroker: mosquitto is found on PATH or where Debian puts it, or said to
be missing; a run stages its files in a folder of its own and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

import training.demo.localbroker as localbroker
from training.demo.localbroker import Mosquitto, MosquittoMissing


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
