"""The notify protocol against a datagram socket bound here, as systemd's would be: what each
message says, the abstract namespace, the watchdog's pace and owner, and silence when
``$NOTIFY_SOCKET`` is unset."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from detector.notify import Notifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A stand-in for systemd's notify socket, at ``tmp_path/notify``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


Make = Callable[[Mapping[str, str]], Notifier]


@pytest.fixture
def make() -> Iterator[Make]:
    """``make(environ)``: a Notifier, closed after the test whatever its outcome."""
    made: list[Notifier] = []

    def notifier(environ: Mapping[str, str]) -> Notifier:
        made.append(Notifier(environ))
        return made[-1]

    yield notifier
    for one in made:
        one.close()


def received(sock: socket.socket) -> list[str]:
    """Every message waiting on ``sock``, each as its fields."""
    out: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


def test_each_message_reaches_the_socket_with_its_fields(
    manager: socket.socket, tmp_path: Path, make: Make
) -> None:
    notifier = make({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notifier.enabled
    assert notifier.ready("scoring:\nconnected")
    assert manager.recv(4096) == b"READY=1\nSTATUS=scoring: connected"  # one line of status
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading("reloading")
    fields = manager.recv(4096).decode().split("\n")
    assert fields[0] == "RELOADING=1" and fields[2] == "STATUS=reloading"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC" and before_us <= int(value) <= before_us + 5_000_000
    notifier.stopping("stopping")
    assert manager.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    notifier.close()
    assert not notifier.send("READY=1")  # closed: nothing sent, nothing raised


def test_an_abstract_socket_name_starts_with_at(make: Make) -> None:
    name = f"rnnsentry-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = make({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
    finally:
        sock.close()


def test_watchdog_pings_come_at_most_every_half_interval(
    manager: socket.socket, tmp_path: Path, make: Make
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
    notifier = make(env)
    assert notifier.watchdog_s == 2.0
    sent = [now for now in (100.0, 100.5, 100.99, 101.0, 101.5, 102.2) if notifier.watchdog(now)]
    assert sent == [100.0, 101.0, 102.2]
    assert received(manager) == ["WATCHDOG=1"] * 3


def test_the_watchdog_belongs_to_the_process_watchdog_pid_names(tmp_path: Path, make: Make) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
    mine = make({**env, "WATCHDOG_PID": str(os.getpid())})
    other = make({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert mine.watchdog_s == 2.0
    assert other.watchdog_s is None and not other.watchdog(100.0)


def test_nothing_is_sent_without_notify_socket(manager: socket.socket, make: Make) -> None:
    notifier = make({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert not notifier.ready("x") and not notifier.watchdog(100.0)
    assert received(manager) == []


def test_a_socket_that_is_gone_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Make
) -> None:
    notifier = make({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not notifier.ready("x")
    assert not notifier.status("y")
    warnings = [r for r in caplog.records if "cannot notify" in r.getMessage()]
    assert len(warnings) == 1
