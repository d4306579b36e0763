"""Stdlib-only in-process MQTT broker, the fallback for ``rnnsentry demo`` without mosquitto.

Contract: ``EmbeddedBroker(host, port).start()`` serves MQTT 3.1.1 and 5.0 clients on ``host``
(port 0 picks a free port, read it from ``.port``) until ``stop()``: QoS 0/1 delivery, inbound
QoS 2 handshake, ``+``/``#`` wildcards, retained messages, Last Will, client-id takeover.

Limits (not for production): no authentication/TLS, no persistence, no session state (clean
start off is accepted, session present is always 0), no outbound QoS 2 (granted QoS <= 1), no
redelivery of unacknowledged QoS 1, and no v5 topic aliases, shared subscriptions, subscription
identifiers, will delay, message expiry or client Maximum Packet Size / Receive Maximum.

Threads: one accept thread; per connection one reader thread (parses packets, routes
publishes) and one writer thread draining a bounded outgoing queue. Routing only enqueues, so
a slow subscriber never holds up socket I/O for others. When its queue is full, the publishing
reader waits (back-pressure) at most ``SLOW_CLIENT_TIMEOUT`` seconds, then the slow client is
disconnected and its will published. Keepalive: the socket timeout is 1.5x the keepalive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds a new socket may take to send its CONNECT
SLOW_CLIENT_TIMEOUT = 5.0  # max back-pressure wait on a full outgoing queue
OUTGOING_QUEUE_MAX = 10_000  # packets queued per connection
MAX_PACKET_SIZE = 16 * 1024 * 1024
WRITE_BATCH = 256  # queued packets coalesced into one sendall
ACCEPT_POLL = 0.5
JOIN_TIMEOUT = 2.0

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = range(1, 8)
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)

# v5 property id -> wire layout: fixed size in bytes (1, 2, 4), "v" variable byte integer,
# "s" one length-prefixed field (UTF-8 string or binary data), "ss" a UTF-8 string pair.
_PROP_LAYOUT: dict[int, int | str] = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
    **dict.fromkeys((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F), "s"),
    0x0B: "v",
    0x26: "ss",
}
# Payload format, message expiry, content type, response topic, correlation data, user props.
_FORWARDED_PROPS = (0x01, 0x02, 0x03, 0x08, 0x09, 0x26)
_TOPIC_ALIAS = 0x23


class MalformedPacket(ValueError):
    """The peer broke the protocol; only its connection is closed."""


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(next_byte: Callable[[], int]) -> int:
    value = 0
    for shift in range(0, 28, 7):
        byte = next_byte()
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes((kind << 4 | flags,)) + encode_varint(len(body)) + body


def valid_filter(flt: str) -> bool:
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return flt != ""


def topic_matches(flt: str, topic: str) -> bool:
    """MQTT filter matching; leading wildcards never match topics starting with ``$``."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    wanted, levels = flt.split("/"), topic.split("/")
    for i, part in enumerate(wanted):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(wanted) == len(levels)


class _Body:
    """Cursor over one packet body; reading past its end raises MalformedPacket."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedPacket("truncated packet")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def varint(self) -> int:
        return _read_varint(self.u8)

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket("invalid UTF-8 string") from exc

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def props(self) -> dict[int, list[bytes]]:
        """Parse a v5 property block into id -> encoded entries (id byte included)."""
        end = self.varint()
        end += self.pos
        if end > len(self.data):
            raise MalformedPacket("property block longer than packet")
        found: dict[int, list[bytes]] = {}
        while self.pos < end:
            start = self.pos
            prop = self.u8()  # ids are varints, but every defined id fits in one byte
            layout = _PROP_LAYOUT.get(prop)
            if layout is None:
                raise MalformedPacket(f"unknown property id 0x{prop:02x}")
            if isinstance(layout, int):
                self.take(layout)
            elif layout == "v":
                self.varint()
            else:
                for _ in layout:
                    self.binary()
            found.setdefault(prop, []).append(self.data[start : self.pos])
        if self.pos != end:
            raise MalformedPacket("property overruns its block")
        return found


def _forwardable(props: dict[int, list[bytes]]) -> bytes:
    return b"".join(entry for prop in _FORWARDED_PROPS for entry in props.get(prop, ()))


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes = b""  # encoded v5 properties forwarded to v5 subscribers
    origin: _Connection | None = None  # publisher, for the v5 No Local option


@dataclass(frozen=True)
class _Subscription:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False


class _Connection:
    """One client socket: a reader thread and a writer thread fed by a bounded queue."""

    def __init__(self, broker: EmbeddedBroker, sock: socket.socket, peer: str) -> None:
        self.broker = broker
        self.sock = sock
        self.peer = peer
        self.client_id = ""
        self.version = 4
        self.will: _Message | None = None
        self.subs: dict[str, _Subscription] = {}  # guarded by broker._lock
        self.closed = threading.Event()
        self._close_lock = threading.Lock()
        self._outq: queue.Queue[bytes | None] = queue.Queue(OUTGOING_QUEUE_MAX)
        self._ids = itertools.cycle(range(1, 65536))
        self._id_lock = threading.Lock()
        self._qos2_pending: set[int] = set()
        self._reader = threading.Thread(target=self._read_loop, name=f"mqtt-r-{peer}", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"mqtt-w-{peer}", daemon=True)

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)
        self._writer.join(timeout)

    def send(self, packet: bytes) -> None:
        deadline = time.monotonic() + SLOW_CLIENT_TIMEOUT
        while not self.closed.is_set():
            try:
                self._outq.put(packet, timeout=0.1)
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    log.warning("client %r is not reading; disconnecting it", self.client_id)
                    self.close(will=True)

    def deliver(self, msg: _Message, qos: int, retain: bool) -> None:
        packet_id = b""
        if qos:
            with self._id_lock:
                packet_id = struct.pack("!H", next(self._ids))
        props = encode_varint(len(msg.props)) + msg.props if self.version == 5 else b""
        body = _utf8(msg.topic) + packet_id + props + msg.payload
        self.send(_packet(PUBLISH, qos << 1 | int(retain), body))

    def close(self, *, will: bool, flush: bool = False) -> None:
        """Idempotent. ``flush`` lets the writer send what is queued before closing."""
        with self._close_lock:
            if self.closed.is_set():
                return
            self.closed.set()
        self.broker._forget(self)
        if will and self.will is not None:
            log.info("publishing will of client %r on %r", self.client_id, self.will.topic)
            self.broker._route(self.will)
        if not flush:
            self._shutdown()
        try:
            self._outq.put_nowait(None)
        except queue.Full:
            self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _write_loop(self) -> None:
        try:
            item: bytes | None = b""
            while item is not None:  # None is the close sentinel
                chunks: list[bytes] = []
                item = self._outq.get()
                while item is not None:  # coalesce what is already queued into one sendall
                    chunks.append(item)
                    if len(chunks) >= WRITE_BATCH or self._outq.empty():
                        break
                    item = self._outq.get_nowait()  # sole consumer: cannot be empty here
                self.sock.sendall(b"".join(chunks))
        except OSError as exc:
            if not self.closed.is_set():
                log.info("write to client %r failed: %s", self.client_id, exc)
            self.close(will=True)
        except Exception:
            log.exception("writer for client %r crashed", self.client_id)
            self.close(will=True)
        finally:
            self._shutdown()

    def _read_loop(self) -> None:
        will = True
        rfile = self.sock.makefile("rb")
        try:
            self.sock.settimeout(CONNECT_TIMEOUT)
            connected = False
            while not self.closed.is_set():
                kind, flags, body = self._read_packet(rfile)
                required = 0x02 if kind in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
                if kind != PUBLISH and flags != required:
                    raise MalformedPacket(f"bad flags {flags:#x} for packet type {kind}")
                if connected == (kind == CONNECT):
                    raise MalformedPacket("CONNECT must be the first packet, and only once")
                if kind == CONNECT:
                    connected = True
                    if not self._on_connect(_Body(body)):
                        will = False
                        break
                elif kind == DISCONNECT:
                    will = self._on_disconnect(_Body(body))
                    break
                else:
                    self._dispatch(kind, flags, _Body(body))
        except MalformedPacket as exc:
            log.warning(
                "closing %s (client %r): malformed packet: %s", self.peer, self.client_id, exc
            )
        except TimeoutError:
            log.info("client %r at %s timed out (keepalive/connect)", self.client_id, self.peer)
        except (OSError, EOFError) as exc:
            log.debug("connection %s ended: %r", self.peer, exc)
        except Exception:
            log.exception("reader for %s crashed", self.peer)
        finally:
            self.close(will=will, flush=not will)
            self._writer.join(JOIN_TIMEOUT)
            self._shutdown()  # wakes a writer still stuck in sendall after a flush
            rfile.close()
            self.sock.close()
            self.broker._forget(self, gone=True)

    @staticmethod
    def _read_packet(rfile: BinaryIO) -> tuple[int, int, bytes]:
        def next_byte() -> int:
            byte = rfile.read(1)
            if not byte:
                raise EOFError("peer closed the connection")
            return byte[0]

        head = next_byte()
        length = _read_varint(next_byte)
        if length > MAX_PACKET_SIZE:
            raise MalformedPacket(f"packet of {length} bytes exceeds the limit")
        body = rfile.read(length)
        if len(body) != length:
            raise EOFError("peer closed mid-packet")
        return head >> 4, head & 0x0F, body

    def _reject(self, code: int) -> bool:
        self.send(_packet(CONNACK, 0, bytes((0, code))))  # 3.1.1 layout
        return False

    def _on_connect(self, b: _Body) -> bool:
        name, level = b.text(), b.u8()
        if name not in ("MQTT", "MQIsdp"):
            raise MalformedPacket(f"unknown protocol name {name!r}")
        if name != "MQTT" or level not in (4, 5):
            return self._reject(0x01)  # unacceptable protocol version
        self.version = level
        flags, keepalive = b.u8(), b.u16()
        if flags & 0x01 or (flags >> 3) & 3 == 3:
            raise MalformedPacket("invalid CONNECT flags")
        if level == 5:
            b.props()
        client_id = b.text()
        if flags & 0x04:
            will_props = b.props() if level == 5 else {}
            topic, payload = b.text(), b.binary()
            if not topic or "+" in topic or "#" in topic:
                raise MalformedPacket("invalid will topic")
            self.will = _Message(
                topic, payload, (flags >> 3) & 3, bool(flags & 0x20), _forwardable(will_props)
            )
        if flags & 0x80:
            b.text()  # user name: accepted and ignored (no auth)
        if flags & 0x40:
            b.binary()  # password: likewise
        assigned = not client_id
        if assigned:
            if level == 4 and not flags & 0x02:
                return self._reject(0x02)  # identifier rejected
            client_id = f"auto-{uuid.uuid4().hex}"
        self.client_id = client_id
        self.sock.settimeout(1.5 * keepalive if keepalive else None)
        if level == 5:
            # No subscription identifiers (0x29), no shared subscriptions (0x2A).
            props = b"\x29\x00\x2a\x00" + (b"\x12" + _utf8(client_id) if assigned else b"")
            self.send(_packet(CONNACK, 0, b"\x00\x00" + encode_varint(len(props)) + props))
        else:
            self.send(_packet(CONNACK, 0, b"\x00\x00"))
        log.info(
            "client %r connected from %s (MQTT v%s)",
            client_id,
            self.peer,
            "5" if level == 5 else "3.1.1",
        )
        self.broker._register(self)
        return True

    def _on_disconnect(self, b: _Body) -> bool:
        """Returns whether the will must still be published (v5 reason code 0x04)."""
        if self.version == 5 and not b.at_end():
            reason = b.u8()
            if not b.at_end():
                b.props()
            return reason == 0x04
        return False

    def _dispatch(self, kind: int, flags: int, b: _Body) -> None:
        if kind == PUBLISH:
            self._on_publish(flags, b)
        elif kind == PUBREL:
            packet_id = b.u16()
            self._qos2_pending.discard(packet_id)
            self.send(_packet(PUBCOMP, 0, struct.pack("!H", packet_id)))
        elif kind in (PUBACK, PUBCOMP):
            b.u16()  # acknowledgement of our QoS 1 delivery; nothing is redelivered
        elif kind == SUBSCRIBE:
            self._on_subscribe(b)
        elif kind == UNSUBSCRIBE:
            self._on_unsubscribe(b)
        elif kind == PINGREQ:
            self.send(_packet(PINGRESP, 0, b""))
        else:
            raise MalformedPacket(f"unexpected packet type {kind}")

    def _on_publish(self, flags: int, b: _Body) -> None:
        qos, retain = (flags >> 1) & 3, bool(flags & 1)
        if qos == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
        topic = b.text()
        if not topic or "+" in topic or "#" in topic:
            raise MalformedPacket(f"invalid topic name {topic!r}")
        packet_id = b.u16() if qos else 0
        props = b.props() if self.version == 5 else {}
        if _TOPIC_ALIAS in props:
            raise MalformedPacket("topic alias used but none was granted")
        msg = _Message(topic, b.take(len(b.data) - b.pos), qos, retain, _forwardable(props), self)
        if qos == 2:
            if packet_id not in self._qos2_pending:  # a resend before PUBREL is not re-routed
                self._qos2_pending.add(packet_id)
                self.broker._route(msg)
            self.send(_packet(PUBREC, 0, struct.pack("!H", packet_id)))
            return
        self.broker._route(msg)
        if qos == 1:
            self.send(_packet(PUBACK, 0, struct.pack("!H", packet_id)))

    def _on_subscribe(self, b: _Body) -> None:
        packet_id = b.u16()
        if self.version == 5:
            b.props()  # subscription identifiers are not supported, so ignored
        reserved = 0xC0 if self.version == 5 else 0xFC
        requests: list[tuple[str, int]] = []
        while not b.at_end():
            flt, options = b.text(), b.u8()
            if options & reserved or options & 0x03 == 3 or options & 0x30 == 0x30:
                raise MalformedPacket(f"invalid subscription options {options:#x}")
            requests.append((flt, options))
        if not requests:
            raise MalformedPacket("SUBSCRIBE without topic filters")
        codes, retained = self.broker._subscribe(self, requests)
        props = b"\x00" if self.version == 5 else b""
        self.send(_packet(SUBACK, 0, struct.pack("!H", packet_id) + props + bytes(codes)))
        for msg, qos in retained:
            self.deliver(msg, qos, True)

    def _on_unsubscribe(self, b: _Body) -> None:
        packet_id = b.u16()
        if self.version == 5:
            b.props()
        filters: list[str] = []
        while not b.at_end():
            filters.append(b.text())
        if not filters:
            raise MalformedPacket("UNSUBSCRIBE without topic filters")
        with self.broker._lock:
            codes = bytes(0x00 if self.subs.pop(f, None) else 0x11 for f in filters)
        tail = b"\x00" + codes if self.version == 5 else b""
        self.send(_packet(UNSUBACK, 0, struct.pack("!H", packet_id) + tail))


class EmbeddedBroker:
    """In-process MQTT 3.1.1/5.0 broker on background threads (see module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._clients: dict[str, _Connection] = {}  # connected, by client id
        self._connections: set[_Connection] = set()  # every live socket, for stop()
        self._retained: dict[str, _Message] = {}

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    def start(self) -> None:
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError("broker already started (or stopped)")
        listener = socket.create_server((self._host, self._requested_port), backlog=128)
        listener.settimeout(ACCEPT_POLL)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"mqtt-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        log.info("embedded MQTT broker listening on %s:%d", self._host, self._port)

    def stop(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            conns = list(self._connections)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        for conn in conns:
            conn.close(will=False)
        for conn in conns:
            conn.join(JOIN_TIMEOUT)
        log.info("embedded MQTT broker on port %s stopped", self._port)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("accept failed: %s", exc)
                    self._stopping.wait(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock, f"{addr[0]}:{addr[1]}")
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    break
                self._connections.add(conn)
            conn.start()

    def _register(self, conn: _Connection) -> None:
        with self._lock:
            if conn.closed.is_set():
                return
            old = self._clients.get(conn.client_id)
            self._clients[conn.client_id] = conn
        if old is not None:
            log.info("client id %r taken over by %s", conn.client_id, conn.peer)
            old.close(will=True)

    def _forget(self, conn: _Connection, *, gone: bool = False) -> None:
        """Stop routing to ``conn``; ``gone``: its threads are done, stop() can skip it."""
        with self._lock:
            if self._clients.get(conn.client_id) is conn:
                del self._clients[conn.client_id]
            if gone:
                self._connections.discard(conn)

    def _route(self, msg: _Message) -> None:
        targets: list[tuple[_Connection, _Subscription]] = []
        with self._lock:
            if self._stopping.is_set():
                return
            if msg.retain:
                if msg.payload:
                    self._retained[msg.topic] = dataclasses.replace(msg, origin=None)
                else:
                    self._retained.pop(msg.topic, None)
            for conn in self._clients.values():
                best: _Subscription | None = None
                for flt, sub in conn.subs.items():
                    if (best is None or sub.qos > best.qos) and topic_matches(flt, msg.topic):
                        if not (sub.no_local and conn is msg.origin):
                            best = sub
                if best is not None:
                    targets.append((conn, best))
        for conn, sub in targets:
            conn.deliver(msg, min(msg.qos, sub.qos), msg.retain and sub.retain_as_published)

    def _subscribe(
        self, conn: _Connection, requests: list[tuple[str, int]]
    ) -> tuple[list[int], list[tuple[_Message, int]]]:
        codes: list[int] = []
        retained: list[tuple[_Message, int]] = []
        v5 = conn.version == 5
        with self._lock:
            for flt, options in requests:
                if v5 and flt.startswith("$share/"):
                    codes.append(0x9E)  # shared subscriptions not supported
                    continue
                if not valid_filter(flt):
                    codes.append(0x8F if v5 else 0x80)
                    continue
                qos = min(options & 0x03, 1)
                is_new = flt not in conn.subs
                conn.subs[flt] = _Subscription(
                    qos, v5 and bool(options & 0x04), v5 and bool(options & 0x08)
                )
                codes.append(qos)
                handling = (options >> 4) & 0x03 if v5 else 0
                if handling == 0 or (handling == 1 and is_new):
                    retained.extend(
                        (m, min(m.qos, qos))
                        for t, m in self._retained.items()
                        if topic_matches(flt, t)
                    )
        return codes, retained
