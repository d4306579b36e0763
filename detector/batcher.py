"""The inbox and when a micro-batch of it is due.

Messages wait in one bounded :class:`Inbox` (a link puts, whoever scores takes). A batch is
due when ``batch.max`` messages are queued or the oldest has waited ``batch.max_wait_ms``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

from detector.link import Inbound


class Inbox:
    """A bounded first-in first-out of received messages.

    One thread puts (the link's), and one at a time takes (the daemon holds its batch lock):
    a deque's ``append`` and ``popleft`` need no lock of their own, so a put costs a tenth
    of a ``queue.Queue``'s. A taker that waits for the first message says so, and only then
    does a put wake it.

    >>> box = Inbox(2)
    >>> box.put_nowait(("a", b"1", 0.0, False)); box.put_nowait(("b", b"2", 0.0, False))
    >>> box.put_nowait(("c", b"3", 0.0, False))
    Traceback (most recent call last):
    queue.Full
    >>> [m[0] for m in box.take(5)], len(box)
    (['a', 'b'], 0)
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Inbound] = deque()
        self._arrived = threading.Condition(threading.Lock())
        self._waiting = False

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Inbound) -> None:
        """Queue one message; ``queue.Full`` when ``maxsize`` are waiting."""
        items = self._items
        if len(items) >= self.maxsize:
            raise queue.Full
        items.append(item)
        if self._waiting:  # read after the append: a taker that set it sees the item
            with self._arrived:
                self._arrived.notify()

    def oldest(self) -> float | None:
        """The oldest queued message's receive time (None: nothing queued)."""
        try:
            return self._items[0][2]
        except IndexError:
            return None

    def take(self, n: int) -> list[Inbound]:
        """Up to ``n`` queued messages, oldest first."""
        items = self._items
        k = min(n, len(items))
        return [items.popleft() for _ in range(k)]

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message; True: one is queued."""
        with self._arrived:
            self._waiting = True  # set before looking: a put after the look will notify
            try:
                if not self._items:
                    self._arrived.wait(timeout_s)
            finally:
                self._waiting = False
        return bool(self._items)


class Batcher:
    """The inbox of (topic, payload, receive time, redelivered) and its batching rule."""

    def __init__(self, queue_size: int, batch_max: int, max_wait_ms: float) -> None:
        self.inbox = Inbox(queue_size)
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.wait_s = max_wait_ms / 1000.0

    def depth(self) -> int:
        return len(self.inbox)

    def take(self) -> list[Inbound]:
        """Up to ``batch_max`` queued messages, oldest first."""
        return self.inbox.take(self.batch_max)

    def due(self, now: float) -> bool:
        """A batch is due: ``batch_max`` queued, or the oldest queued ``max_wait`` ago."""
        if len(self.inbox) >= self.batch_max:
            return True
        oldest = self.inbox.oldest()
        return oldest is not None and now - oldest >= self.wait_s

    def await_due(self, wait_s: float, idle_s: float, slack_s: float = 0.0) -> bool:
        """Wait up to ``idle_s`` for a message, then until a batch is due: ``batch_max``
        queued, or the oldest queued ``wait_s`` ago. False: nothing queued.

        It sleeps rather than waiting to be woken: a waiting thread is woken by every put,
        and each wake-up costs a busy reader thread a hand-over of the interpreter lock."""
        inbox = self.inbox
        if not len(inbox) and (idle_s <= 0 or not inbox.wait(idle_s)):
            return False
        oldest = inbox.oldest()
        if oldest is None:  # taken meanwhile by the link's thread
            return False
        if len(inbox) < self.batch_max:
            delay = min(wait_s + slack_s, oldest + wait_s + slack_s - time.time())
            if delay > 0:
                time.sleep(delay)
        return True
