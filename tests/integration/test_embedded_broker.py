"""Integration tests: real paho-mqtt 2.x clients (and raw sockets) against EmbeddedBroker."""

from __future__ import annotations

import logging
import queue
import socket
import struct
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

import detector.embedded_broker as embedded_broker
from detector.embedded_broker import EmbeddedBroker, topic_matches, valid_filter

pytestmark = pytest.mark.integration

TIMEOUT = 5.0  # generous upper bound for anything that should happen
ABSENCE_WAIT = 0.3  # how long we watch for something that must NOT arrive
BULK_COUNT = 20_000

PROTOCOLS = [
    pytest.param(mqtt.MQTTv311, id="v311"),
    pytest.param(mqtt.MQTTv5, id="v5"),
]


class Peer:
    """A paho client whose callbacks feed queues the test waits on."""

    def __init__(
        self,
        port: int,
        protocol: MQTTProtocolVersion,
        client_id: str = "",
        *,
        will: tuple[str, bytes, int, bool] | None = None,
        clean: bool = True,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connects: queue.Queue[tuple[mqtt.ConnectFlags, ReasonCode]] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self.unsubacks: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        v5 = protocol == mqtt.MQTTv5
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if v5 else clean,
            reconnect_on_failure=False,
        )
        self.client.on_connect = lambda _c, _u, flags, rc, _p: self.connects.put((flags, rc))
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.put((mid, codes))
        self.client.on_unsubscribe = lambda _c, _u, mid, _codes, _p: self.unsubacks.put(mid)
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.put(rc)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        if v5:
            self.client.connect("127.0.0.1", port, clean_start=clean)
        else:
            self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.flags, rc = self.connects.get(timeout=TIMEOUT)
        assert not rc.is_failure, rc

    def subscribe(self, topic: str, qos: int = 0) -> list[int]:
        _, mid = self.client.subscribe(topic, qos)
        got_mid, codes = self.subacks.get(timeout=TIMEOUT)
        assert got_mid == mid
        return [c.value for c in codes]

    def unsubscribe(self, topic: str) -> None:
        _, mid = self.client.unsubscribe(topic)
        assert self.unsubacks.get(timeout=TIMEOUT) == mid

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published()

    def next_message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def assert_no_message(self) -> None:
        with pytest.raises(queue.Empty):
            msg = self.messages.get(timeout=ABSENCE_WAIT)
            pytest.fail(f"unexpected message on {msg.topic!r}: {msg.payload!r}")

    def kill(self) -> None:
        """Drop the TCP connection without sending DISCONNECT."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # FIN, no DISCONNECT packet
        self.disconnects.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(caplog: pytest.LogCaptureFixture) -> Iterator[EmbeddedBroker]:
    caplog.set_level(logging.INFO, logger="detector.embedded_broker")
    with EmbeddedBroker() as running:
        yield running
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


@pytest.fixture
def peers(broker: EmbeddedBroker) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(
        protocol: MQTTProtocolVersion = mqtt.MQTTv311,
        client_id: str = "",
        *,
        will: tuple[str, bytes, int, bool] | None = None,
        clean: bool = True,
    ) -> Peer:
        peer = Peer(broker.port, protocol, client_id, will=will, clean=clean)
        made.append(peer)
        return peer

    yield make
    for peer in made:  # disconnect first: it wakes paho's loop thread, so loop_stop is quick
        peer.client.disconnect()
        peer.client.loop_stop()


# --- raw-socket helpers ------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    return struct.pack("!H", len(text)) + text.encode()


def _packet(first: int, body: bytes) -> bytes:
    length, rl = len(body), bytearray()
    while True:
        length, digit = divmod(length, 128)
        rl.append(digit | (0x80 if length else 0))
        if not length:
            return bytes((first,)) + bytes(rl) + body


def raw_connect(
    port: int,
    client_id: str,
    keepalive: int = 30,
    will: tuple[str, bytes] | None = None,
    rcvbuf: int = 0,
) -> socket.socket:
    flags = 0x02 | (0x04 if will else 0)
    body = _utf8("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + _utf8(client_id)
    if will:
        body += _utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(_packet(0x10, body))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def assert_closed_by_broker(sock: socket.socket) -> None:
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    finally:
        sock.close()


# --- tests ---------------------------------------------------------------------------------


def test_topic_matching_rules() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert not topic_matches("a/+/c", "a/b/d/c")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c")
    assert topic_matches("#", "x/y") and not topic_matches("#", "$SYS/x")
    assert not topic_matches("+/x", "$SYS/x") and topic_matches("$SYS/+", "$SYS/x")
    assert topic_matches("+/+", "/x") and not topic_matches("a/b", "a/b/c")
    assert valid_filter("a/+/#") and not valid_filter("a/#/b") and not valid_filter("a+")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("qos", [0, 1])
def test_pub_sub(peers: Callable[..., Peer], protocol: MQTTProtocolVersion, qos: int) -> None:
    sub, pub = peers(protocol), peers(protocol)
    assert sub.subscribe("sensors/temp", qos) == [qos]
    pub.publish("sensors/temp", b"21.5", qos=qos)
    msg = sub.next_message()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("sensors/temp", b"21.5", qos, False)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos_is_min_of_publish_and_subscription_and_qos2_is_handled(
    peers: Callable[..., Peer], protocol: MQTTProtocolVersion
) -> None:
    sub0, sub2, pub = peers(protocol), peers(protocol), peers(protocol)
    assert sub0.subscribe("q", 0) == [0]
    assert sub2.subscribe("q", 2) == [1]  # granted QoS is capped at 1
    pub.publish("q", b"exactly-once", qos=2)  # returns only after PUBREC/PUBREL/PUBCOMP
    assert sub0.next_message().qos == 0
    assert sub2.next_message().qos == 1
    pub.publish("q", b"fire-and-forget", qos=0)
    assert sub2.next_message().qos == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wildcards_and_unsubscribe(
    peers: Callable[..., Peer], protocol: MQTTProtocolVersion
) -> None:
    sub, pub = peers(protocol), peers(protocol)
    assert sub.subscribe("plant/+/temp", 1) == [1]
    assert sub.subscribe("alarms/#", 0) == [0]
    assert sub.subscribe("#", 0) == [0]
    for topic in ("plant/a/temp", "plant/a/b/temp", "alarms", "alarms/x/y", "$SYS/load"):
        pub.publish(topic, b"v", qos=1)
    # Overlapping filters give one delivery; "#" does not match the $-topic.
    seen = [sub.next_message().topic for _ in range(4)]
    assert seen == ["plant/a/temp", "plant/a/b/temp", "alarms", "alarms/x/y"]
    sub.assert_no_message()

    sub.unsubscribe("#")
    sub.unsubscribe("alarms/#")
    pub.publish("alarms/x", b"dropped", qos=1)
    pub.publish("plant/b/temp", b"marker", qos=1)  # same publisher, so ordered after
    assert sub.next_message().payload == b"marker"


def test_v5_properties_forwarded_and_mixed_versions(peers: Callable[..., Peer]) -> None:
    sub5, sub3 = peers(mqtt.MQTTv5), peers(mqtt.MQTTv311)
    pub = peers(mqtt.MQTTv5)
    sub5.subscribe("props", 1)
    sub3.subscribe("props", 1)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    props.UserProperty = [("site", "north"), ("unit", "C")]
    pub.publish("props", b"{}", qos=1, properties=props)
    got = sub5.next_message()
    assert got.payload == b"{}"
    assert getattr(got.properties, "ContentType", None) == "application/json"
    assert getattr(got.properties, "UserProperty", None) == [("site", "north"), ("unit", "C")]
    assert sub3.next_message().payload == b"{}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_message_for_late_subscriber_and_clearing(
    peers: Callable[..., Peer], protocol: MQTTProtocolVersion
) -> None:
    pub = peers(protocol)
    pub.publish("r/a", b"old", qos=1, retain=True)
    pub.publish("r/a", b"latest", qos=1, retain=True)
    late = peers(protocol)
    late.subscribe("r/#", 1)
    msg = late.next_message()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("r/a", b"latest", 1, True)

    pub.publish("r/a", b"", qos=1, retain=True)  # empty retained payload clears it
    pub.publish("r/b", b"kept", qos=0, retain=True)
    assert late.next_message().payload == b""  # live subscribers still get both
    assert late.next_message().retain is False  # live delivery clears the retain flag

    later = peers(protocol)
    later.subscribe("r/#", 1)
    later.publish("r/zz", b"marker", qos=1)  # routed after the retained replay
    assert [later.next_message().payload for _ in range(2)] == [b"kept", b"marker"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_last_will_on_abrupt_socket_close(
    peers: Callable[..., Peer], protocol: MQTTProtocolVersion
) -> None:
    watcher = peers(protocol)
    watcher.subscribe("status/#", 1)
    dying = peers(protocol, "dying-node", will=("status/dying-node", b"offline", 1, True))
    dying.kill()
    msg = watcher.next_message()
    assert (msg.topic, msg.payload, msg.qos) == ("status/dying-node", b"offline", 1)
    late = peers(protocol)  # the will was retained
    late.subscribe("status/#", 0)
    assert late.next_message().payload == b"offline"


def test_last_will_on_keepalive_expiry(broker: EmbeddedBroker, peers: Callable[..., Peer]) -> None:
    watcher = peers(mqtt.MQTTv311)
    watcher.subscribe("status/#", 0)
    silent = raw_connect(broker.port, "silent", keepalive=1, will=("status/silent", b"gone"))
    try:  # sends nothing after CONNECT: the broker gives up after 1.5 x keepalive
        assert watcher.next_message().payload == b"gone"
    finally:
        silent.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_will_on_clean_disconnect(
    peers: Callable[..., Peer], protocol: MQTTProtocolVersion
) -> None:
    watcher = peers(protocol)
    watcher.subscribe("status/#", 0)
    polite = peers(protocol, "polite", will=("status/polite", b"offline", 0, False))
    polite.close()
    assert polite.disconnects.get(timeout=TIMEOUT) is not None
    watcher.assert_no_message()


def test_v5_disconnect_with_will_message(peers: Callable[..., Peer]) -> None:
    watcher = peers(mqtt.MQTTv5)
    watcher.subscribe("status/#", 0)
    leaving = peers(mqtt.MQTTv5, "leaving", will=("status/leaving", b"bye", 0, False))
    leaving.client.disconnect(
        reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
    )
    assert watcher.next_message().payload == b"bye"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_id_takeover(peers: Callable[..., Peer], protocol: MQTTProtocolVersion) -> None:
    first = peers(protocol, "sensor-7")
    second = peers(protocol, "sensor-7", clean=False)
    assert second.flags.session_present is False
    first.disconnects.get(timeout=TIMEOUT)  # the broker dropped the older connection
    second.subscribe("t", 1)
    second.publish("t", b"still works", qos=1)
    assert second.next_message().payload == b"still works"


def test_empty_client_id_is_assigned(peers: Callable[..., Peer]) -> None:
    for protocol in (mqtt.MQTTv311, mqtt.MQTTv5):
        peer = peers(protocol, "")
        assert peer.subscribe("x", 1) == [1]


def test_garbage_only_closes_the_offending_connection(
    broker: EmbeddedBroker, peers: Callable[..., Peer]
) -> None:
    sub, pub = peers(mqtt.MQTTv5), peers(mqtt.MQTTv311)
    sub.subscribe("ok", 1)

    http = socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT)
    http.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
    assert_closed_by_broker(http)

    bad_topic = raw_connect(broker.port, "bad-topic")  # topic length runs past the packet
    bad_topic.sendall(_packet(0x30, struct.pack("!H", 200) + b"abc"))
    assert_closed_by_broker(bad_topic)

    bad_length = raw_connect(broker.port, "bad-length")  # 5-byte remaining length
    bad_length.sendall(b"\x30\xff\xff\xff\xff\x01")
    assert_closed_by_broker(bad_length)

    bad_prop = socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT)
    body = _utf8("MQTT") + bytes((5, 0x02)) + struct.pack("!H", 30) + b"\x02\x7f\x00"
    bad_prop.sendall(_packet(0x10, body + _utf8("bad-prop")))  # unknown property 0x7f
    assert_closed_by_broker(bad_prop)

    pub.publish("ok", b"unharmed", qos=1)
    assert sub.next_message().payload == b"unharmed"
    assert peers(mqtt.MQTTv311).subscribe("ok", 0) == [0]


def test_many_qos0_messages_all_arrive_in_order(peers: Callable[..., Peer]) -> None:
    sub, pub = peers(mqtt.MQTTv311), peers(mqtt.MQTTv5)
    sub.subscribe("bulk", 0)
    for i in range(BULK_COUNT):
        pub.client.publish("bulk", str(i).encode(), qos=0)
    received = [int(sub.next_message().payload) for _ in range(BULK_COUNT)]
    assert received == list(range(BULK_COUNT))


def test_slow_subscriber_is_dropped_without_stalling_others(
    monkeypatch: pytest.MonkeyPatch, broker: EmbeddedBroker, peers: Callable[..., Peer]
) -> None:
    monkeypatch.setattr(embedded_broker, "SLOW_CLIENT_TIMEOUT", 0.2)
    monkeypatch.setattr(embedded_broker, "OUTGOING_QUEUE_MAX", 16)
    watcher, fast, pub = peers(), peers(), peers()
    watcher.subscribe("status/#", 0)
    fast.subscribe("flood", 0)
    slow = raw_connect(broker.port, "slow", will=("status/slow", b"dropped"), rcvbuf=4096)
    slow.sendall(_packet(0x82, struct.pack("!H", 1) + _utf8("flood") + b"\x00"))
    assert slow.recv(5) == b"\x90\x03\x00\x01\x00"  # SUBACK; then it never reads again
    chunk = bytes(64 * 1024)  # 200 x 64 KiB overflows the kernel buffers and the queue
    for i in range(200):
        pub.client.publish("flood", i.to_bytes(2, "big") + chunk, qos=0)
    received = [int.from_bytes(fast.next_message().payload[:2], "big") for _ in range(200)]
    assert received == list(range(200))
    assert watcher.next_message().payload == b"dropped"
    assert_closed_by_broker(slow)


def test_stop_disconnects_clients_and_is_idempotent() -> None:
    broker = EmbeddedBroker()
    broker.start()
    peer = Peer(broker.port, mqtt.MQTTv311)
    try:
        broker.stop()
        peer.disconnects.get(timeout=TIMEOUT)
        broker.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT)
    finally:
        peer.client.loop_stop()
