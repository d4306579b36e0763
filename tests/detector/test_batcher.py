"""The worker's side of the queue: micro-batches taken in bulk, in order, never more than
``batch.max``, and a short batch waits up to ``batch.max_wait_ms`` for more."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import pytest

from detector.batcher import Inbox
from detector.config import build_config
from detector.daemon import Daemon
from detector.link import Inbound

WAIT_S = 5.0  # a generous bound on a busy machine; the tests end long before it


def item(i: int, received: float | None = None) -> Inbound:
    return (f"sensors/s{i}", b"{}", float(i) if received is None else received, False)


def test_take_is_in_order_up_to_n_and_keeps_the_rest() -> None:
    inbox = Inbox(maxsize=10)
    for i in range(5):
        inbox.put_nowait(item(i))
    assert inbox.take(3) == [item(0), item(1), item(2)]
    assert inbox.take(10) == [item(3), item(4)] and len(inbox) == 0
    assert inbox.take(10) == []  # nothing left: nothing changes


def test_a_full_inbox_refuses_until_taken_from() -> None:
    inbox = Inbox(maxsize=2)
    inbox.put_nowait(item(0))
    inbox.put_nowait(item(1))
    with pytest.raises(queue.Full):
        inbox.put_nowait(item(2))
    assert inbox.take(1) == [item(0)]
    inbox.put_nowait(item(2))
    assert inbox.take(5) == [item(1), item(2)]


def test_a_waiting_taker_is_woken_by_a_put_and_not_before() -> None:
    inbox = Inbox(maxsize=10)
    began = time.monotonic()
    assert not inbox.wait(0.05)  # nothing came: it waited its time
    assert time.monotonic() - began >= 0.04
    later = threading.Timer(0.02, lambda: inbox.put_nowait(item(7)))
    later.start()
    began = time.monotonic()
    assert inbox.wait(WAIT_S)
    later.join()
    assert time.monotonic() - began < WAIT_S / 2 and inbox.take(1) == [item(7)]


@pytest.fixture
def daemon(tiny_model: Path) -> Daemon:
    config, problems = build_config({
        "models": [{"path": str(tiny_model)}],
        "metrics": {"enabled": False},
        "daemon": {"workers": 0},  # scored in this process, by process()
        "batch": {"max": 4, "max_wait_ms": 50.0, "queue_size": 100},
    })  # fmt: skip
    assert problems == []
    return Daemon(config)


def take(daemon: Daemon, wait_s: float, idle_s: float) -> list[Inbound]:
    """What the worker takes: the queued messages, up to ``batch.max``, once a batch is due
    (``Batcher.await_due``, then the take the worker does under its lock)."""
    return daemon.batcher.take() if daemon.batcher.await_due(wait_s, idle_s) else []


def test_take_returns_a_full_batch_at_once(daemon: Daemon) -> None:
    for i in range(6):
        daemon.inbox.put_nowait(item(i))
    began = time.monotonic()
    assert take(daemon, 0.05, 0.0) == [item(i) for i in range(4)]
    assert time.monotonic() - began < 0.04  # did not wait for more
    assert take(daemon, 0.0, 0.0) == [item(4), item(5)]


def test_a_short_batch_waits_for_more_and_takes_what_comes(daemon: Daemon) -> None:
    first, second = item(0, time.time()), item(1, time.time())
    daemon.inbox.put_nowait(first)
    later = threading.Timer(0.01, lambda: daemon.inbox.put_nowait(second))
    later.start()
    began = time.monotonic()
    batch = take(daemon, 0.05, 0.0)
    waited = time.monotonic() - began
    later.join()
    assert batch == [first, second]
    assert 0.04 <= waited < WAIT_S


def test_a_batch_that_waited_long_enough_is_taken_at_once(daemon: Daemon) -> None:
    """The wait counts from the oldest message's arrival, not from when the worker looks."""
    old = item(0, time.time() - 1.0)
    daemon.inbox.put_nowait(old)
    began = time.monotonic()
    assert take(daemon, 0.05, 0.0) == [old]
    assert time.monotonic() - began < 0.04


def test_paho_thread_scores_a_due_batch_itself_and_only_then(tiny_model: Path) -> None:
    """on_queued (paho's thread, after each message) scores when batch.max are queued or
    the oldest has waited max_wait; before that it leaves the queue alone."""
    config, problems = build_config({
        "models": [{"path": str(tiny_model), "topics": ["sensors/{stream}"]}],
        "metrics": {"enabled": False},
        "daemon": {"workers": 0},  # scored in this process, by process()
        "batch": {"max": 3, "max_wait_ms": 1000.0, "queue_size": 100},
    })  # fmt: skip
    assert problems == []
    daemon = Daemon(config)
    daemon._install(daemon._load_models())
    names = daemon.engines[0].model.meta.features
    now = time.time()

    def message(stream: str, ts: float) -> Inbound:
        body = {"ts": ts, "values": dict.fromkeys(names, 0.5)}
        return (f"sensors/{stream}", json.dumps(body).encode(), now, False)

    def scored() -> float:
        value = daemon.metrics.registry.get_sample_value(
            "rnnsentry_messages_total", {"outcome": "scored"}
        )
        return value or 0.0

    for k in range(2):
        daemon.inbox.put_nowait(message("a", 1.0 + k))
        daemon.on_queued(now)
    assert len(daemon.inbox) == 2 and scored() == 0  # neither full nor old: left queued
    daemon.inbox.put_nowait(message("a", 3.0))
    daemon.on_queued(now)
    assert not len(daemon.inbox) and scored() == 3  # batch.max reached: scored in order
    daemon.inbox.put_nowait(message("b", 1.0))
    daemon.on_queued(now + 1.0)  # the next arrival, a max_wait later, finds it due
    assert not len(daemon.inbox) and scored() == 4
    assert sorted(daemon.engines[0].table.streams()) == ["a", "b"]


def test_an_empty_queue_gives_nothing_after_idle(daemon: Daemon) -> None:
    began = time.monotonic()
    assert take(daemon, 0.05, 0.02) == []
    assert 0.015 <= time.monotonic() - began < WAIT_S
    assert take(daemon, 0.05, 0.0) == []
