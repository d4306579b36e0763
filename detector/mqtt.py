"""The MQTT link: paho 2.x on its own thread, feeding a bounded queue.

``on_message`` stamps the receive time, ``put_nowait``s (topic, payload, time, redelivered)
into the queue (a full queue drops and counts) and calls ``on_queued``, with which
the daemon scores a due batch on this thread before paho reads on. Subscriptions
are made in ``on_connect`` so reconnects resubscribe; a retained ``online`` status
and a retained Last Will ``offline``. QoS 1 input is acknowledged once the daemon
has scored it (``acknowledge``, in arrival order), so a crash before leaves it with the
broker; after ``stop_intake`` it is left unacknowledged, so the broker keeps it in the
persistent session for the next run. While the broker is away, each failed attempt
gives one line of ours that says why and when the next comes, in place of paho's own
ERROR lines. MQTT 5 or 3.1.1, a persistent session in both. Another client that connects
with our client id takes the session over (MQTT 5 says so; 3.1.1 brokers just close the
connection, again and again soon after accepting it): one ERROR line names the client id,
and each attempt waits ``reconnect_max_s`` so that the two do not take it in turns.
"""

from __future__ import annotations

import logging
import math
import queue
import ssl
import sys
import threading
import time
from collections import deque
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detector.config import MqttConfig
from detector.link import Inbound, LinkHooks

__all__ = ["Inbound", "MqttLink"]

log = logging.getLogger(__name__)

_SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: a client with our id connected
_SHORT_LOSSES = 3  # connections lost in a row soon after they were made: taken over (3.1.1)
_SHORT_MIN_S = 10.0  # "soon" is at least this, or twice reconnect_max_s (the other's wait)
_TAKEOVER_ERROR_EVERY_S = 600.0  # one ERROR line per this while it goes on; INFO between


class MqttLink:
    """One connection to the broker, for input, alerts and status."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        status_topic: str,
        filters: list[str],
        hooks: LinkHooks,
        password: str | None = None,
    ) -> None:
        self.config = config
        self.status_topic = status_topic
        self.filters = filters
        self.inbox = hooks.inbox
        self._on_drop = hooks.on_drop
        self._on_connection = hooks.on_connection
        self._on_queued = hooks.on_queued  # after each message queued, with its receive time
        self.connected = threading.Event()
        self.last_error = ""  # why the last connection attempt failed ("" once connected)
        self._closing = False
        self._intake_open = True
        # (packet id, QoS, session) of each queued message, None for QoS 0, in arrival order.
        self._unacked: deque[tuple[int, int, int] | None] = deque()
        # The broker's session the link is in: a new one each time the broker had none for
        # us (a first connection, or a broker that lost its sessions). Packet ids are the
        # session's: an id of an older one would acknowledge another message in this one.
        self._session = 0
        # QoS 1 messages put in _unacked (counted by paho's thread) and taken out of it (by
        # whoever acknowledges): each counter has one writer, so no lock is needed.
        self._held_in = 0
        self._held_out = 0
        self._subscribe_mid = -1
        self.client_id = client_id
        self.v5 = config.protocol != "3.1.1"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            clean_session=None if self.v5 else False,  # 3.1.1: the broker keeps our session
            manual_ack=True,  # see _handle_message
        )
        self._min_delay_s = max(1, int(config.reconnect_min_s))
        self._max_delay_s = max(1, int(config.reconnect_max_s))
        self._said = ""  # the reason the last retry line gave
        self._level = logging.WARNING  # of a line giving last_error for the first time
        self._first_attempt = True  # no attempt has ended since start()
        self._lost = ""  # what paho said of a connection it lost, for our line about it
        self._connected_at: float | None = None  # monotonic time of the last CONNACK accepted
        # Connections lost in a row within _short_s of being made, each attempt accepted.
        self._short_losses = 0
        self._short_s = max(_SHORT_MIN_S, 2.0 * config.reconnect_max_s)
        self._holding_off = False  # taken over: each attempt waits reconnect_max_s
        self._takeover_error_at = -math.inf  # monotonic time of the last takeover ERROR line
        # A logger of this client's own under "paho": our filter sees its records only.
        self._paho_log = logging.getLogger("paho").getChild(client_id)
        self._paho_log.addFilter(self._paho_record)
        client.enable_logger(self._paho_log)
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        client.reconnect_delay_set(min_delay=self._min_delay_s, max_delay=self._max_delay_s)
        client.will_set(status_topic, b"offline", qos=1, retain=True)
        if config.username:
            client.username_pw_set(config.username, password)
        _, _, tls = config.host_port_tls
        if tls or config.tls_ca_file:
            client.tls_set(
                ca_certs=config.tls_ca_file or None,
                certfile=config.tls_cert_file or None,
                keyfile=config.tls_key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if config.tls_insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_subscribe = self._handle_subscribe
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self.client = client

    def _paho_record(self, record: logging.LogRecord) -> bool:
        """Keep paho's record, or drop it where a line of ours says it better."""
        text = record.getMessage()
        if "not connected" in text:
            # paho's loop logs "Client is not connected" at ERROR each time it is about to
            # wait before another attempt (and once after a clean disconnect of ours): the
            # line of _handle_connect_fail has said it.
            return False
        if text.startswith(("failed to receive on socket", "timeout on socket")):
            self._lost = text  # said in the disconnect line that follows at once
            return False
        return True

    def _next_delay_s(self) -> int:
        """The wait paho is about to begin before its next attempt: it doubles from
        reconnect_min_s to reconnect_max_s and starts again from the least once connected
        (``Client.reconnect_delay_set``); paho keeps the last wait it made in
        ``_reconnect_delay``, None since the last connection."""
        if self._holding_off:
            return self._max_delay_s
        last = getattr(self.client, "_reconnect_delay", None)
        wait = self._min_delay_s if last is None else min(2 * int(last), self._max_delay_s)
        if self._first_attempt:
            # paho 2.2 waits twice after a first attempt that fails (connect_async's own
            # retry, then its main loop finds no socket and waits again before it tries).
            wait += min(2 * wait, self._max_delay_s)
        return wait

    def _retrying(self, why: str, level: int) -> None:
        """One line for a failed attempt: a reason not said before at ``level``, the same
        reason again at INFO (every attempt is seen, one warning each time it changes)."""
        level = level if why != self._said else logging.INFO
        log.log(level, "not connected to the broker: %s; next attempt in %d s",
                why, self._next_delay_s())  # fmt: skip
        self._said = why

    def start(self) -> None:
        """Connect in the background; a broker that is down is retried with backoff."""
        host, port, _ = self.config.host_port_tls
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s
            self.client.connect_async(
                host, port, keepalive=self.config.keepalive_s, clean_start=False, properties=props
            )
        else:  # clean_session=False, given to the client
            self.client.connect_async(host, port, keepalive=self.config.keepalive_s)
        self.client.loop_start()

    def stop_intake(self) -> None:
        """Take no more input. Subscriptions stay in the session, and input that arrives
        from now on is not acknowledged: the broker delivers it again to the next run."""
        self._intake_open = False

    def stop(self, timeout_s: float = 1.0) -> None:
        """Publish ``offline``, disconnect cleanly (no Last Will) and stop paho's thread.

        Under a flood the broker's acknowledgement of ``offline`` waits behind everything it
        queued for us, so the wait is short: the broker takes packets in order, and if the
        connection is reset before it reads them it publishes the Last Will, ``offline``
        too."""
        self.stop_intake()
        self._closing = True
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()
        self._paho_log.removeFilter(self._paho_record)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS or info.rc == paho.MQTT_ERR_NO_CONN

    def set_filters(self, filters: list[str]) -> None:
        """Subscribe to ``filters``, unsubscribing those no longer wanted; a reconnect
        subscribes to them too."""
        gone = sorted(set(self.filters) - set(filters))
        self.filters = list(filters)
        if gone:
            self.client.unsubscribe(gone)
        self.client.subscribe([(f, self.config.qos) for f in filters])

    # --- paho callbacks (paho's network thread) ---

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._first_attempt = False
        if reason.is_failure:  # the broker closes the connection: see _handle_disconnect
            self._short_losses = 0
            self._failed(f"the broker refused the connection: {reason}", logging.ERROR)
            self.connected.clear()
            self._on_connection(False)
            return
        present = getattr(flags, "session_present", None)
        log.info(
            "connected to the broker (session present: %s)", "?" if present is None else present
        )
        if present is False:
            self._session += 1  # what was taken before is acknowledged to nothing
        self.last_error = self._said = ""
        self._connected_at = time.monotonic()
        if self._holding_off:  # the usual backoff again, unless this one is taken over too
            self._holding_off = False
            client.reconnect_delay_set(min_delay=self._min_delay_s, max_delay=self._max_delay_s)
        result, mid = client.subscribe([(f, self.config.qos) for f in self.filters])
        self._subscribe_mid = -1 if mid is None else mid
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        # Ready only once the broker has granted the subscriptions (see _handle_subscribe):
        # input sent before that could still miss them.

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:  # not retried: said now
            self.last_error = f"the broker refused a subscription: {', '.join(refused)}"
            log.error("%s", self.last_error)
        self.connected.set()
        self._on_connection(True)

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` around connecting (refused,
        # unreachable, TLS handshake), so the exception in hand says why; it waits next.
        exc = sys.exc_info()[1]
        why = (str(exc) or type(exc).__name__) if exc is not None else "connection failed"
        self._failed(why, logging.WARNING)
        self._retrying(why, logging.WARNING)
        self._first_attempt = False
        self._short_losses = 0  # the broker was away, not busy with a client of our id

    def _failed(self, why: str, level: int) -> None:
        """Keep ``why`` for /readyz and for the line about this attempt (at ``level``)."""
        self.last_error, self._level = why, level

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        lost, self._lost = self._lost, ""
        taken = "" if self._closing else self._taken_over(flags, reason)
        if taken:
            self._hold_off(taken)
        elif not self._closing:  # paho waits next, then tries again
            if self.connected.is_set():
                self._retrying(f"disconnected ({lost or reason})", logging.WARNING)
            else:  # the broker closed a connection it had not accepted
                self._retrying(self.last_error or f"closed ({reason})", self._level)
        self.connected.clear()
        self._on_connection(False)

    def _taken_over(self, flags: Any, reason: Any) -> str:
        """Why this lost connection looks taken over by a client with our id ("" if not)."""
        made, self._connected_at = self._connected_at, None
        if made is None:  # it ended before the broker accepted it: no session to take
            return ""
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            return (f"another client connected with our client id {self.client_id!r} and the "
                    f"broker handed it our session ({reason}); a second daemon under the same "
                    "instance name?")  # fmt: skip
        by_broker = getattr(flags, "is_disconnect_packet_from_server", False)
        if by_broker or time.monotonic() - made >= self._short_s:
            self._short_losses = 0  # a DISCONNECT that says why, or a connection that lasted
            return ""
        self._short_losses += 1
        if self._short_losses < _SHORT_LOSSES:
            return ""
        return (f"the broker closed the connection {self._short_losses} times in a row within "
                f"{self._short_s:g} s of accepting it: another client probably uses our client "
                f"id {self.client_id!r} (a second daemon under the same instance name?), or the "
                "broker refuses something we send (its log says which)")  # fmt: skip

    def _hold_off(self, why: str) -> None:
        """Wait reconnect_max_s before the next attempt, and say why: at ERROR once every
        _TAKEOVER_ERROR_EVERY_S while takeovers go on, at INFO in between."""
        self._holding_off = True
        self.client.reconnect_delay_set(min_delay=self._max_delay_s, max_delay=self._max_delay_s)
        now = time.monotonic()
        level = logging.INFO
        if now - self._takeover_error_at >= _TAKEOVER_ERROR_EVERY_S:
            level, self._takeover_error_at = logging.ERROR, now
        self._failed(why, logging.ERROR)
        log.log(level, "not connected to the broker: %s; next attempt in %d s",
                why, self._max_delay_s)  # fmt: skip
        self._said = why

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not self._intake_open:
            return  # unacknowledged: the broker keeps it in our session for the next run
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""  # not UTF-8: no template matches it, so it is counted as unroutable
        received = time.time()
        # Its place among the messages to acknowledge, before another thread can take it.
        if msg.qos:
            self._unacked.append((msg.mid, msg.qos, self._session))
            self._held_in += 1
        else:
            self._unacked.append(None)
        try:
            self.inbox.put_nowait((topic, bytes(msg.payload), received, bool(msg.dup)))
        except queue.Full:
            if self._unacked.pop() is not None:
                self._held_in -= 1
            self._on_drop()  # counted; acknowledged, or the broker would stall the session
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        if self._on_queued is not None:
            self._on_queued(received)  # e.g. the daemon scores a due batch here

    def acknowledge(self, count: int) -> None:
        unacked, client = self._unacked, self.client
        for _ in range(min(count, len(unacked))):  # batches made elsewhere hold none of ours
            held = unacked.popleft()
            if held is not None:  # QoS 0 has nothing to acknowledge
                self._held_out += 1
                mid, qos, session = held
                if session == self._session:  # the broker forgot an older session's
                    client.ack(mid, qos)

    def awaiting(self) -> bool:
        return self._held_in > self._held_out
