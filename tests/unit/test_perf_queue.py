"""The worker's side of the queue: micro-batches taken in bulk, in order, never more than
``batch.max``, and a short batch waits up to ``batch.max_wait_ms`` for more."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from detector.config import build_config
from detector.daemon import Daemon, _drain_into
from detector.mqtt import Inbound

WAIT_S = 5.0  # a generous bound on a busy machine; the tests end long before it


def item(i: int) -> Inbound:
    return (f"sensors/s{i}", b"{}", float(i))


def test_drain_takes_in_order_up_to_batch_max_and_keeps_the_rest() -> None:
    inbox: queue.Queue[Inbound] = queue.Queue(maxsize=10)
    for i in range(5):
        inbox.put_nowait(item(i))
    batch = [item(-1)]
    _drain_into(inbox, batch, 3)
    assert batch == [item(-1), item(0), item(1)]
    rest: list[Inbound] = []
    _drain_into(inbox, rest, 10)
    assert rest == [item(2), item(3), item(4)] and inbox.empty()
    _drain_into(inbox, rest, 10)  # nothing left: nothing changes
    assert len(rest) == 3


def test_drain_makes_room_for_a_blocked_put() -> None:
    inbox: queue.Queue[Inbound] = queue.Queue(maxsize=1)
    inbox.put_nowait(item(0))
    put = threading.Thread(target=lambda: inbox.put(item(1), timeout=WAIT_S))
    put.start()
    deadline = time.monotonic() + WAIT_S
    batch: list[Inbound] = []
    while len(batch) < 2 and time.monotonic() < deadline:
        _drain_into(inbox, batch, 2)
        time.sleep(0.001)
    put.join(WAIT_S)
    assert batch == [item(0), item(1)]


@pytest.fixture
def daemon(tiny_model: Path) -> Daemon:
    config, problems = build_config({
        "models": [{"path": str(tiny_model)}],
        "metrics": {"enabled": False},
        "batch": {"max": 4, "max_wait_ms": 50.0, "queue_size": 100},
    })  # fmt: skip
    assert problems == []
    return Daemon(config)


def test_take_returns_a_full_batch_at_once(daemon: Daemon) -> None:
    for i in range(6):
        daemon.inbox.put_nowait(item(i))
    began = time.monotonic()
    assert daemon._take(4, 0.05, 0.0) == [item(i) for i in range(4)]
    assert time.monotonic() - began < 0.04  # did not wait for more
    assert daemon._take(4, 0.0, 0.0) == [item(4), item(5)]


def test_a_short_batch_waits_for_more_and_takes_what_comes(daemon: Daemon) -> None:
    daemon.inbox.put_nowait(item(0))
    later = threading.Timer(0.01, lambda: daemon.inbox.put_nowait(item(1)))
    later.start()
    began = time.monotonic()
    batch = daemon._take(4, 0.05, 0.0)
    waited = time.monotonic() - began
    later.join()
    assert batch == [item(0), item(1)]
    assert 0.04 <= waited < WAIT_S


def test_an_empty_queue_gives_nothing_after_idle(daemon: Daemon) -> None:
    began = time.monotonic()
    assert daemon._take(4, 0.05, 0.02) == []
    assert 0.015 <= time.monotonic() - began < WAIT_S
    assert daemon._take(4, 0.05, 0.0) == []
