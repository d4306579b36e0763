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
from collections.abc import Sequence
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
    for template in (mqtt.alert_topic, mqtt.score_topic):
        try:
            size = len(template.format(stream=stream).encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate from a topic that was not UTF-8
            return False
        if size > MAX_TOPIC_BYTES:
            return False
    return True


class Publisher:
    """Encodes alerts and scores and hands them to the link (none yet: nothing is sent)."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.mqtt = config.mqtt
        self.threshold = config.scoring.threshold
        self.instance = config.daemon.instance
        self.link: Link | None = None
        self.journal: AlertJournal | None = None  # raised and cleared, kept for a restart

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

    def _send(self, topic: str, doc: dict[str, object], qos: int) -> None:
        if self.link is None:
            return
        try:
            sent = self.link.publish(topic, json.dumps(doc).encode(), qos=qos)
        except (ValueError, TypeError) as exc:  # the client refuses it: counted, not fatal
            log.warning("cannot publish on %.80r: %s", topic, exc)
            sent = False
        if not sent:
            self.metrics.publish_failures.inc()
