"""Shared fixtures: a clean environment, a real mosquitto, tiny trained models, daemons.

Test files mirror the packages: the tests of ``detector/engine.py`` are in
``tests/detector/test_engine.py`` (README.md here says the whole rule).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TINY_FEATURES, InProcessDaemons, train_tiny_model
from training.demo.localbroker import Mosquitto, find_mosquitto


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RNNSENTRY_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("RNNSENTRY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, torn down after the test."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed here (make setup installs it as root)")
    broker = Mosquitto().start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def start_daemon() -> Iterator[InProcessDaemons]:
    """``start_daemon(config)`` starts a Daemon in this process and waits until it is ready
    (``ready_within=None``: does not wait); each still running is stopped after the test."""
    daemons = InProcessDaemons()
    try:
        yield daemons
    finally:
        daemons.stop_all()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GRU trained once per session on synthetic pumps (features TINY_FEATURES)."""
    out = tmp_path_factory.mktemp("models") / "tiny-gru.onnx"
    train_tiny_model(out, cell="gru")
    return out


@pytest.fixture(scope="session")
def tiny_model_features() -> list[str]:
    return list(TINY_FEATURES)
