"""What the daemon needs of its broker connection, and an in-memory one for tests.

A link takes messages in (into the daemon's inbox, through :class:`LinkHooks`) and sends
the daemon's alerts, scores and status out. :class:`detector.mqtt.MqttLink` is the real
one; :class:`MemoryLink` keeps everything in this process, so the daemon's path from a
received message to a published alert can be driven and checked without a broker, in the
way httpx's transports stand in for the network.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# topic, payload, receive time (epoch seconds), and whether the broker sent it before (MQTT's
# DUP flag: a QoS 1 message redelivered after a reconnect or a broker's restart)
Inbound = tuple[str, bytes, float, bool]


class Sink(Protocol):
    """Where a link puts what it receives (the daemon's inbox; any ``queue.Queue``)."""

    def put_nowait(self, item: Inbound) -> None:
        """Take one message, or raise ``queue.Full``."""


@dataclass(frozen=True)
class LinkHooks:
    """What the daemon gives a link: where messages go, and what to tell it."""

    inbox: Sink
    on_drop: Callable[[], None]  # a message was received with the inbox full: counted, lost
    on_connection: Callable[[bool], None]  # connected (True) or not
    on_queued: Callable[[float], None] | None = None  # after each message queued, its time


class Link(Protocol):
    """The daemon's side of a broker connection."""

    connected: threading.Event
    last_error: str  # why the last connection attempt failed ("" once connected)
    filters: list[str]  # the subscriptions

    def start(self) -> None: ...

    def stop_intake(self) -> None:
        """Take no more input; what arrives later stays with the broker."""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Say ``offline`` and disconnect."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Hand one message over for sending; False: it cannot be sent."""

    def set_filters(self, filters: list[str]) -> None:
        """Subscribe to ``filters`` instead of the current subscriptions."""

    def acknowledge(self, count: int) -> None:
        """The oldest ``count`` messages put in the inbox and not yet acknowledged are done
        (scored, or counted as rejected or dropped): a QoS 1 one is acknowledged to the
        broker now, so that a crash before leaves it with the broker for the next run."""

    def awaiting(self) -> bool:
        """Whether a message put in the inbox and not yet acknowledged is one the broker
        waits for (QoS 1). With none, what is in hand may be counted done when handed on,
        without waiting for it to be scored: a crash loses QoS 0 messages either way."""


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MemoryLink:
    """A link in memory: ``deliver`` hands a message in as a broker would, ``published``
    holds what the daemon sent. Made unbound; the daemon binds its hooks at start.

    >>> link = MemoryLink()
    >>> link.bind(LinkHooks(queue.Queue(1), lambda: None, lambda up: None))
    >>> link.start(); link.deliver("sensors/a", b"{}"), link.deliver("sensors/b", b"{}")
    (True, False)
    """

    def __init__(self, status_topic: str = "rnnsentry/status") -> None:
        self.status_topic = status_topic
        self.connected = threading.Event()
        self.last_error = ""
        self.filters: list[str] = []
        self.published: list[Published] = []
        self.dropped = 0
        self.acknowledged = 0  # messages the daemon said were done
        self._unacked: deque[bool] = deque()  # per message in hand: QoS 1 (the broker waits)
        self._hooks: LinkHooks | None = None
        self._intake_open = False
        self._lock = threading.Lock()

    def bind(self, hooks: LinkHooks) -> None:
        self._hooks = hooks

    def start(self) -> None:
        if self._hooks is None:
            raise RuntimeError("MemoryLink.start before bind")
        self._intake_open = True
        self.connected.set()
        self._hooks.on_connection(True)
        self.publish(self.status_topic, b"online", qos=1, retain=True)

    def deliver(
        self, topic: str, payload: bytes, received: float | None = None, qos: int = 0,
        redelivered: bool = False,
    ) -> bool:  # fmt: skip
        """One message in, as the broker's would arrive: False when intake is closed (the
        broker keeps it) or the inbox is full (counted as dropped)."""
        hooks = self._hooks
        if hooks is None or not self._intake_open:
            return False
        at = time.time() if received is None else received
        with self._lock:
            self._unacked.append(qos > 0)
        try:
            hooks.inbox.put_nowait((topic, payload, at, redelivered))
        except queue.Full:
            with self._lock:
                self._unacked.pop()
            self.dropped += 1
            hooks.on_drop()
            return False
        if hooks.on_queued is not None:
            hooks.on_queued(at)
        return True

    def stop_intake(self) -> None:
        self._intake_open = False

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stop_intake()
        if self.connected.is_set():
            self.publish(self.status_topic, b"offline", qos=1, retain=True)
        self.connected.clear()
        if self._hooks is not None:
            self._hooks.on_connection(False)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Keep it, or raise ValueError for what an MQTT client refuses (as paho does): a
        wildcard in the topic, or a topic over 65,535 bytes."""
        name = topic.encode("utf-8", "surrogatepass")
        if b"+" in name or b"#" in name:
            raise ValueError("Publish topic cannot contain wildcards.")
        if len(name) > 65_535:
            raise ValueError("Publish topic is too long.")
        with self._lock:  # the daemon's threads may publish at once
            self.published.append(Published(topic, payload, qos, retain))
        return True

    def set_filters(self, filters: list[str]) -> None:
        self.filters = list(filters)

    def acknowledge(self, count: int) -> None:
        with self._lock:
            self.acknowledged += count
            for _ in range(min(count, len(self._unacked))):
                self._unacked.popleft()

    def awaiting(self) -> bool:
        with self._lock:
            return any(self._unacked)

    def sent_to(self, prefix: str) -> list[Published]:
        """What was published on topics starting with ``prefix``, in order."""
        with self._lock:
            return [p for p in self.published if p.topic.startswith(prefix)]
