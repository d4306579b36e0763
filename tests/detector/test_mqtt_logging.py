"""What the daemon logs while its broker is away: one line of ours per failed attempt, with
the wait before the next, and none of paho's ERROR lines."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from tests.support import CONNECT_TIMEOUT_S, InProcessDaemons, daemon_config, poll_until
from training.demo.localbroker import Mosquitto

pytestmark = pytest.mark.integration

LINE = re.compile(r"not connected to the broker: (.+); next attempt in (\d+) s$")
RECONNECT_TIMEOUT_S = 30.0
SLACK_S = 1.5  # a wait may end this much later than said on a loaded machine


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "detector.mqtt" and LINE.search(r.getMessage())]


def test_a_broker_that_goes_away_gives_one_line_per_attempt_with_the_next_wait(
    mosquitto: Mosquitto, tiny_model: Path, start_daemon: InProcessDaemons,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    config = daemon_config(mosquitto.url, tiny_model, instance="away",
                           mqtt={"reconnect_min_s": 1, "reconnect_max_s": 2})  # fmt: skip
    daemon = start_daemon(config)
    mosquitto.stop()
    # The loss (next in 1 s), then refused attempts: the wait doubles to its cap of 2 s.
    poll_until(lambda: len(retry_lines(caplog)) >= 3, RECONNECT_TIMEOUT_S)
    lines = retry_lines(caplog)[:3]
    said = [LINE.search(r.getMessage()).groups() for r in lines]  # type: ignore[union-attr]
    assert said[0][0].startswith("disconnected") and said[0][1] == "1"
    assert all("refused" in why.lower() for why, _ in said[1:]), said
    assert [int(wait) for _, wait in said] == [1, 2, 2]
    for line, after, (_, wait) in zip(lines, lines[1:], said, strict=False):
        assert int(wait) - 0.2 <= after.created - line.created <= int(wait) + SLACK_S, said
    # A reason is a warning when it is new and information when it comes again.
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING, logging.INFO]
    paho = [r for r in caplog.records if r.name.startswith("paho") and r.levelno >= logging.ERROR]
    assert paho == []
    assert "refused" in daemon.ready()[1].lower()  # /readyz says why, as before

    mosquitto.start()
    poll_until(lambda: daemon.ready()[0], RECONNECT_TIMEOUT_S)
    count = len(retry_lines(caplog))
    start_daemon.stop(daemon)  # a clean stop of ours is no failed attempt
    assert len(retry_lines(caplog)) == count
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_broker_down_at_start_says_when_it_tries_again(
    tiny_model: Path, start_daemon: InProcessDaemons, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    broker = Mosquitto()  # its port is chosen; nothing listens on it yet
    config = daemon_config(broker.url, tiny_model, instance="late",
                           mqtt={"reconnect_min_s": 1, "reconnect_max_s": 2})  # fmt: skip
    daemon = start_daemon(config, ready_within=None)
    try:
        poll_until(lambda: len(retry_lines(caplog)) >= 2, CONNECT_TIMEOUT_S)
        first, second = retry_lines(caplog)[:2]
        assert first.getMessage().endswith("next attempt in 3 s")  # paho waits 1 s, then 2 s
        assert 2.8 <= second.created - first.created <= 3 + SLACK_S
        broker.start()
        poll_until(lambda: daemon.ready()[0], RECONNECT_TIMEOUT_S)
    finally:
        start_daemon.stop_all()
        broker.stop()
