"""The output contract: what the daemon publishes about each alert and each scored sample.

One JSON document per alert event on ``mqtt.alert_topic`` (QoS 1), and with
``mqtt.publish_scores`` one per scored sample on ``mqtt.score_topic`` (QoS 0). The fields
are the README's; a message the link cannot take is counted in
``rnnsentry_publish_failures_total``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import numpy as np

from detector.config import Config, MqttConfig
from detector.engine import AlertEvent, BatchResult
from detector.journal import AlertJournal
from detector.link import Link
from detector.metrics import Metrics
from detector.model import LoadedModel

log = logging.getLogger(__name__)


def iso_time(ts: float) -> str:
    """ISO 8601 UTC with milliseconds.

    >>> iso_time(1704067200.25)
    '2024-01-01T00:00:00.250Z'
    """
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_id(event: AlertEvent) -> str:
    """The id every event of one alert carries: the stream and the sample time its episode
    was raised at, unique across restarts (a stream's times only grow), and the same again
    if the same sample is scored again after a crash. Episodes raised before the time was
    kept fall back to the stream's episode count.

    >>> from dataclasses import replace
    >>> e = AlertEvent(0, "pump-7", "cleared", 3, 1700000060.0, 1700000001.5, 0.5, 0.1, 2.0, [])
    >>> alert_id(e), alert_id(replace(e, episode_ts=math.nan))
    ('pump-7@1700000001.5', 'pump-7#3')
    """
    if math.isnan(event.episode_ts):
        return f"{event.stream}#{event.episode}"
    return f"{event.stream}@{event.episode_ts!r}"


MAX_TOPIC_BYTES = 65_535  # MQTT's limit on a topic name, in UTF-8 bytes


def publishable(stream: str, mqtt: MqttConfig) -> bool:
    """Whether the topics of ``stream``'s alerts and scores are MQTT topic names: at most
    65,535 bytes of UTF-8, no wildcard and no NUL. A stream whose alerts could not be sent
    is refused before it is scored.

    >>> publishable("north/p7", MqttConfig()), publishable("x" * 70_000, MqttConfig())
    (True, False)
    """
    if "+" in stream or "#" in stream or "\x00" in stream:
        return False
    for template in (mqtt.alert_topic, mqtt.score_topic, mqtt.state_topic):
        try:
            size = len(template.format(stream=stream).encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate from a topic that was not UTF-8
            return False
        if size > MAX_TOPIC_BYTES:
            return False
    return True


def object_id(name: str) -> str:
    """``name`` as Home Assistant allows in an id (letters, digits, ``_``, ``-``), with a
    checksum when characters had to go, so that two names never share one.

    >>> object_id("pump-7"), object_id("north/p7")
    ('pump-7', 'north_p7_cd04b9e1')
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if safe == name:
        return name
    return f"{safe}_{zlib.crc32(name.encode('utf-8', 'surrogatepass')):08x}"


class Publisher:
    """Encodes alerts, states and scores and hands them to the link (none yet: nothing is
    sent)."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.mqtt = config.mqtt
        self.threshold = config.scoring.threshold
        self.instance = config.daemon.instance
        self.link: Link | None = None
        self.journal: AlertJournal | None = None  # raised and cleared, kept for a restart
        # Streams announced to Home Assistant by this process; forgotten when it grows past
        # what the state tables can hold (announcing again is harmless: it is retained).
        self._announced: set[str] = set()
        self._announced_max = 2 * config.streams.max_streams * max(1, len(config.models))

    def alert(self, model: LoadedModel, event: AlertEvent, decided: float) -> None:
        doc = {
            "stream": event.stream,
            "event": event.event,
            "alert_id": alert_id(event),
            "episode": event.episode,
            "ts": event.ts,
            "time": iso_time(event.ts),
            "decided_at": decided,
            "likelihood": event.likelihood,
            "anomaly_score": round(event.score, 6),
            "raw_score": event.raw_score,
            "threshold": self.threshold,
            "top_features": [
                {"feature": f, "std_error": round(e, 4), "share": round(share, 4)}
                for f, e, share in event.top
            ],
            "model": model.name,
            "fingerprint": model.meta.fingerprint,
            "instance": self.instance,
        }
        if event.reason:
            doc["reason"] = event.reason
        self.metrics.alerts.labels(event.event).inc()
        if event.event != "update":
            log.info("alert %s %s (likelihood %.6f)", event.event, doc["alert_id"],
                     event.likelihood)  # fmt: skip
        if self.journal is not None:  # first: a crash after it still finds the event
            self.journal.record(model.name, event)
        self._send(self.mqtt.alert_topic.format(stream=event.stream), doc, qos=1)
        if self.mqtt.state_topic and event.event != "update":
            raised = event.event == "raised"
            self._state(event.stream, model, event.ts, alert_id(event) if raised else None,
                        event.episode_ts if raised else None)  # fmt: skip

    def _state(self, stream: str, model: LoadedModel, ts: float, alert: str | None,
               since: float | None) -> None:  # fmt: skip
        """The stream's retained state: in alert (with the alert's id and start) or ok."""
        doc = {
            "stream": stream,
            "state": "alert" if alert else "ok",
            "alert_id": alert,
            "since": None if since is None or math.isnan(since) else iso_time(since),
            "ts": ts,
            "time": iso_time(ts),
            "model": model.name,
            "instance": self.instance,
        }
        self._send(self.mqtt.state_topic.format(stream=stream), doc, qos=1, retain=True)

    def announce(self, model: LoadedModel, streams: Sequence[str], ts: Sequence[float],
                 active: np.ndarray) -> None:  # fmt: skip
        """Home Assistant MQTT discovery for streams this process has not announced: a
        binary sensor each (``device_class: problem``) on the state topic, available while
        the status topic says ``online``; a stream not in alert also gets its first state."""
        prefix = self.mqtt.homeassistant_prefix
        if not prefix:
            return
        announced = self._announced
        for i, stream in enumerate(streams):
            if stream in announced:
                continue
            if len(announced) >= self._announced_max:
                announced.clear()
            announced.add(stream)
            node, obj = object_id(f"rnnsentry_{self.instance}"), object_id(stream)
            state = self.mqtt.state_topic.format(stream=stream)
            config = {
                "name": f"{stream} anomaly",
                "unique_id": f"{node}_{obj}",
                "device_class": "problem",
                "state_topic": state,
                "value_template": "{{ value_json.state }}",
                "payload_on": "alert",
                "payload_off": "ok",
                "json_attributes_topic": state,
                "availability_topic": self.mqtt.status_topic.format(instance=self.instance),
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": {
                    "identifiers": [node],
                    "name": f"rnnsentry {self.instance}",
                    "manufacturer": "rnnsentry",
                    "model": model.name,
                },  # fmt: skip
            }
            self._send(f"{prefix}/binary_sensor/{node}/{obj}/config", config, qos=1, retain=True)
            if not active[i]:  # an open alert keeps the state its raise left
                self._state(stream, model, ts[i], None, None)

    def scores(
        self, streams: Sequence[str], ts: Sequence[float], result: BatchResult, scored: np.ndarray
    ) -> None:
        """One document per scored sample of a batch (``scored``: a mask over it)."""
        if not self.mqtt.publish_scores:
            return
        for i in np.flatnonzero(scored).tolist():
            raw = float(result.raw[i])
            doc = {
                "stream": streams[i],
                "ts": ts[i],
                "raw_score": None if math.isnan(raw) else raw,
                "likelihood": float(result.likelihood[i]),
                "anomaly_score": round(float(result.score[i]), 6),
                "active": bool(result.active[i]),
            }
            self._send(self.mqtt.score_topic.format(stream=streams[i]), doc, qos=0)

    def _send(self, topic: str, doc: Mapping[str, object], qos: int, retain: bool = False) -> None:
        if self.link is None:
            return
        try:
            sent = self.link.publish(topic, json.dumps(doc).encode(), qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:  # the client refuses it: counted, not fatal
            log.warning("cannot publish on %.80r: %s", topic, exc)
            sent = False
        if not sent:
            self.metrics.publish_failures.inc()
