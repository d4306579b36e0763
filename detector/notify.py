"""systemd's notify protocol (sd_notify(3)), written here: a datagram to ``$NOTIFY_SOCKET``.

:class:`Notifier` says ``READY=1``, ``STATUS=...``, ``RELOADING=1`` and ``STOPPING=1`` when
told, and ``WATCHDOG=1`` at most every half of ``$WATCHDOG_USEC`` (only in the process
``$WATCHDOG_PID`` names, if it names one). With ``$NOTIFY_SOCKET`` unset it sends nothing;
a message that cannot be sent is logged once and never raises.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | None:
    """Where ``$NOTIFY_SOCKET`` says to send: a path, or an abstract name (``@`` becomes a NUL
    byte); None when unset or of a kind not supported here (systemd's ``vsock:``).

    >>> socket_address("/run/systemd/notify"), socket_address("@sd/x"), socket_address("")
    ('/run/systemd/notify', '\\x00sd/x', None)
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog's interval in seconds from ``$WATCHDOG_USEC``, or None: no watchdog, an
    unreadable value, or ``$WATCHDOG_PID`` naming another process than ``pid``.

    >>> watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 7)
    30.0
    >>> watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    True
    """
    text = environ.get("WATCHDOG_USEC", "")
    if not text.isdigit() or int(text) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(text) / 1e6


class Notifier:
    """Messages to the service manager; a no-op without ``$NOTIFY_SOCKET``.

    ``environ``: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
    (default ``os.environ``; ``{}`` gives one that sends nothing). Safe to call from any
    thread and from a signal handler: it takes no lock.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = watchdog_interval_s(env, os.getpid()) if self.address else None
        self._last_ping = -float("inf")  # monotonic time of the last WATCHDOG=1
        self._warned = False
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; False if none was sent."""
        sock = self._sock  # close() may run meanwhile: a closed socket raises OSError
        if sock is None or self.address is None:
            return False
        try:
            sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # the manager went away or the socket is full: never fatal
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s",
                            self.address.replace("\0", "@"), exc)  # fmt: skip
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status))

    def status(self, status: str) -> bool:
        return self.send(_status(status))

    def reloading(self, status: str) -> bool:
        """RELOADING=1 with the time it began (systemd matches it to the reload it asked)."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}", _status(status))

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", _status(status))

    def watchdog_due(self, now: float) -> bool:
        """Whether a WATCHDOG=1 sent at ``now`` (monotonic seconds) would be on time: there is
        a watchdog and half its interval has passed since the last one."""
        return self.watchdog_s is not None and now - self._last_ping >= self.watchdog_s / 2

    def watchdog(self, now: float) -> bool:
        """WATCHDOG=1 if one is due at ``now``: the caller shows it is alive by calling."""
        if not self.watchdog_due(now):
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    """One STATUS= field: a newline would end it early."""
    return "STATUS=" + " ".join(text.split())
