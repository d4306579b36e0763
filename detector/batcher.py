"""The inbox and when a micro-batch of it is due.

Messages wait in one bounded queue (a link puts, the scoring stage takes). A batch is due
when ``batch.max`` messages are queued or the oldest has waited ``batch.max_wait_ms``.
``take`` moves a batch out under the queue's one lock, not a ``get`` per message.
"""

from __future__ import annotations

import queue
import time

from detector.link import Inbound


def drain_into(inbox: queue.Queue[Inbound], batch: list[Inbound], batch_max: int) -> None:
    """Move what is queued into ``batch``, up to ``batch_max``, under ONE lock: a get()
    per message costs a lock round trip and a condition-variable notify each."""
    with inbox.mutex:
        items = inbox.queue
        n = min(batch_max - len(batch), len(items))
        if n <= 0:
            return
        if n == len(items):
            batch.extend(items)
            items.clear()
        else:
            batch.extend([items.popleft() for _ in range(n)])
        inbox.not_full.notify(n)


class Batcher:
    """A bounded inbox of (topic, payload, receive time) and its batching rule."""

    def __init__(self, queue_size: int, batch_max: int, max_wait_ms: float) -> None:
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.wait_s = max_wait_ms / 1000.0

    def depth(self) -> int:
        return self.inbox.qsize()

    def take(self) -> list[Inbound]:
        """Up to ``batch_max`` queued messages, oldest first."""
        batch: list[Inbound] = []
        drain_into(self.inbox, batch, self.batch_max)
        return batch

    def due(self, now: float) -> bool:
        """A batch is due: ``batch_max`` queued, or the oldest queued ``max_wait`` ago."""
        queued = self.inbox.queue
        try:
            return len(queued) >= self.batch_max or now - queued[0][2] >= self.wait_s
        except IndexError:  # nothing queued (another thread took it meanwhile)
            return False

    def await_due(self, wait_s: float, idle_s: float, slack_s: float = 0.0) -> bool:
        """Wait up to ``idle_s`` for a message, then until a batch is due: ``batch_max``
        queued, or the oldest queued ``wait_s`` ago. False: nothing queued.

        It sleeps rather than waits on the queue: a waiting thread is woken by every put,
        and each wake-up costs a busy reader thread a hand-over of the interpreter lock."""
        inbox = self.inbox
        with inbox.not_empty:
            if not inbox.queue:
                if idle_s <= 0:
                    return False
                inbox.not_empty.wait(idle_s)
                if not inbox.queue:
                    return False
            oldest = inbox.queue[0][2]
            full = len(inbox.queue) >= self.batch_max
        if not full:
            delay = min(wait_s + slack_s, oldest + wait_s + slack_s - time.time())
            if delay > 0:
                time.sleep(delay)
        return True
