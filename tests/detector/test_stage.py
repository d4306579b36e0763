"""detector.stage, the scoring stage: the parser's fast reading changes nothing that can be
observed (the same messages through ``parse_into`` or through the full reading alone leave
the same stream state, counters and alerts), and the route memo follows the router."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import detector.stage as stage_module
from detector.config import build_config
from detector.daemon import Daemon
from detector.link import Inbound
from detector.payload import PayloadLimits, PlainForm, parse_message
from tests.support import TINY_FEATURES, tiny_fleet

T0 = 1_700_000_000.0


class Sink:
    """Stands in for MqttLink.publish: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], int]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        self.sent.append((topic, json.loads(payload), qos))
        return True


def full_reading_only(
    payload: bytes, form: PlainForm, recv_ts: float, limits: PayloadLimits,
    ts_out: list[float], values_out: list[float],
) -> tuple[int, int]:  # fmt: skip
    """``parse_into`` with the fast reading never taken."""
    parsed = parse_message(payload, form.features, form.index, recv_ts, limits)
    for reading in parsed.readings:
        ts_out.append(reading.ts)
        values_out.extend(reading.values)
    return len(parsed.readings), parsed.ignored_names


def make_daemon(model: Path, publish_scores: bool = True) -> Daemon:
    config, problems = build_config({
        "models": [{"path": str(model), "topics": ["sensors/{stream}", "plant/{site}/{m}"]}],
        "metrics": {"enabled": False},
        "daemon": {"workers": 0},  # scored in this process, by process()
        "scoring": {"warmup_steps": 3},
        "mqtt": {"publish_scores": publish_scores},
    })  # fmt: skip
    assert problems == []
    made = Daemon(config)
    made._install(made._load_models())
    made.publisher.link = Sink()  # type: ignore[assignment]
    return made


def messages() -> list[list[Inbound]]:
    """Batches of every payload form, good and bad, with repeated streams and anomalies."""
    rows = tiny_fleet(n_streams=6, n_steps=40, seed=3, start_step=600).values
    rows[2, 30:33] += 50.0  # an anomaly: alerts raised (and maybe cleared)
    batches: list[list[Inbound]] = []
    received = T0 + 10_000
    for step in range(0, 40, 4):
        batch: list[Inbound] = []
        for s in range(6):
            for k in range(step, step + 4):
                values = [float(v) for v in rows[s, k]]
                named = dict(zip(TINY_FEATURES, values, strict=True))
                ts = T0 + k
                form = (s + k) % 7
                if form == 0:
                    doc: Any = {"ts": ts, "values": named}
                elif form == 1:
                    doc = {"ts": int(ts * 1000), "values": values}  # milliseconds, a list
                elif form == 2:
                    doc = [{"ts": ts, "values": named}]
                elif form == 3:
                    doc = {"ts": f"{ts}", "values": named}  # text: the full parser's
                elif form == 4:
                    doc = {"ts": ts, "values": {**named, "spare": 1}}  # an ignored name
                elif form == 5:
                    doc = {"ts": ts - 100, "values": named}  # out of order (after the first)
                else:
                    doc = {"ts": ts, "values": [*values[:3], True]}  # rejected: schema
                topic = f"sensors/s{s}" if s % 2 else f"plant/p{s}/m"
                batch.append((topic, json.dumps(doc).encode(), received, False))
                received += 0.001
        batch.append(("elsewhere/x", b"{}", received, False))  # no route
        batch.append((f"sensors/s{step}", b"not json", received, False))
        batches.append(batch)
    return batches


def _state(d: Daemon) -> dict[str, dict[str, np.ndarray]]:
    table = d.engines[0].table
    out = {}
    for stream, row in table.index.items():
        out[stream] = {
            name: np.take(arr, row, axis=table.columns[name].axis)
            for name, arr in table.arrays.items()
        }
    return out


def _counters(d: Daemon) -> list[tuple[str, float]]:
    samples = []
    for family in d.metrics.registry.collect():
        for s in family.samples:
            if s.name.endswith("_created") or "latency" in s.name or "inference" in s.name:
                continue  # times of day and durations differ from run to run
            if s.name.startswith("process_"):
                continue  # this process's memory and CPU time, which move under the test
            samples.append((f"{s.name}{sorted(s.labels.items())}", s.value))
    return sorted(samples)


def test_fast_and_full_parsing_leave_the_same_everything(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, full = make_daemon(tiny_model), make_daemon(tiny_model)
    for batch in messages():
        fast.process(batch)
    with monkeypatch.context() as m:
        m.setattr(stage_module, "parse_into", full_reading_only)
        for batch in messages():
            full.process(batch)

    a, b = _state(fast), _state(full)
    assert a.keys() == b.keys() and len(a) == 6
    for stream in a:
        for name in a[stream]:
            assert np.array_equal(a[stream][name], b[stream][name], equal_nan=True), name
    assert _counters(fast) == _counters(full)
    sent_a = [(t, {k: v for k, v in doc.items() if k != "decided_at"}, q)
              for t, doc, q in fast.publisher.link.sent]  # type: ignore[union-attr]  # fmt: skip
    sent_b = [(t, {k: v for k, v in doc.items() if k != "decided_at"}, q)
              for t, doc, q in full.publisher.link.sent]  # type: ignore[union-attr]  # fmt: skip
    assert sent_a == sent_b
    assert any(doc.get("event") == "raised" for _, doc, _ in sent_a)
    assert fast.metrics.registry.get_sample_value("rnnsentry_ignored_values_total") > 0
    latency = fast.metrics.registry.get_sample_value("rnnsentry_decision_latency_seconds_count")
    scored = fast.metrics.registry.get_sample_value(
        "rnnsentry_messages_total", {"outcome": "scored"}
    )
    assert latency == scored + fast.metrics.registry.get_sample_value(
        "rnnsentry_rejections_total", {"reason": "out_of_order"}
    ) + fast.metrics.registry.get_sample_value(
        "rnnsentry_rejections_total", {"reason": "duplicate"}
    )  # one observation a sample that reached the engine


def test_the_route_memo_follows_the_router(tiny_model: Path) -> None:
    d = make_daemon(tiny_model, publish_scores=False)
    d.process([("sensors/a", b'{"values": [1, 2, 3, 4]}', T0, False)])
    memo = d.stage.routes.memo
    assert memo == {"sensors/a": (0, "a")}
    d._install(d._load_models())  # a reload brings a new router
    d.process([("nowhere", b"{}", T0 + 1, False)])
    fresh = d.stage.routes.memo
    assert fresh is not memo and fresh == {"nowhere": stage_module._UNROUTABLE}
    assert (
        d.metrics.registry.get_sample_value(
            "rnnsentry_rejections_total", {"reason": "unknown_route"}
        )
        == 1.0
    )


def test_a_sample_the_broker_sends_again_is_a_duplicate_however_old(tiny_model: Path) -> None:
    """A broker that restarts before it read the daemon's acknowledgements sends those
    samples again, flagged (MQTT's DUP): each already scored, however far behind the
    stream's last time, is a duplicate. An older sample sent once is out of order."""
    d = make_daemon(tiny_model, publish_scores=False)

    def sample(k: int, again: bool) -> Inbound:
        return ("sensors/a", b'{"ts": %.1f, "values": [1, 2, 3, 4]}' % (T0 + k), T0 + 10, again)

    d.process([sample(k, False) for k in range(5)])
    d.process([sample(k, True) for k in (2, 3, 4)] + [sample(1, False)])

    def rejected(reason: str) -> float | None:
        return d.metrics.registry.get_sample_value("rnnsentry_rejections_total", {"reason": reason})

    assert (
        d.metrics.registry.get_sample_value("rnnsentry_messages_total", {"outcome": "scored"})
        == 5.0
    )
    assert (rejected("duplicate"), rejected("out_of_order")) == (3.0, 1.0)


def test_the_route_memo_is_bounded(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage_module, "_ROUTE_MEMO_MAX", 3)
    d = make_daemon(tiny_model, publish_scores=False)
    for i in range(10):
        d.process([(f"sensors/s{i}", b'{"values": [1, 2, 3, 4]}', T0 + i, False)])
        assert len(d.stage.routes.memo) <= 3
    assert len(d.engines[0].table) == 10


def _one_stream(rows: np.ndarray, every: int, stream: str = "pump-1") -> list[list[Inbound]]:
    """Batches of one stream's samples, ``every`` 1 s sample (the tiny model's interval)
    taken of each ``every``: what one of ``every`` daemons sharing it round-robin gets."""
    batch = [(f"sensors/{stream}",
              json.dumps({"ts": T0 + k, "values": [float(v) for v in rows[k]]}).encode(),
              T0 + 10_000.0, False) for k in range(0, len(rows), every)]  # fmt: skip
    return [batch[i : i + 32] for i in range(0, len(batch), 32)]


@pytest.mark.parametrize(("every", "said"), [(1, 0), (2, 1), (3, 1)])
def test_a_stream_seen_in_part_is_said_once_and_a_whole_one_never(
    tiny_model: Path, caplog: pytest.LogCaptureFixture, every: int, said: int
) -> None:
    caplog.set_level(logging.WARNING, logger="detector.stage")
    daemon = make_daemon(tiny_model, publish_scores=False)
    rows = tiny_fleet(n_streams=1, n_steps=1800, seed=4, start_step=600).values[0]
    for batch in _one_stream(rows, every):  # 600 samples at least: windows of 200 intervals
        daemon.process(batch)
    lines = [r.getMessage() for r in caplog.records if "sees only part" in r.getMessage()]
    assert len(lines) == said, lines  # the second window within ten minutes says nothing
    if said:
        found = re.search(r"(\d+) of the last (\d+) intervals", lines[0])
        assert found is not None and found[1] == found[2]  # each interval 2 or 3 s: long
        assert int(found[2]) >= 200 and "hash_topic" in lines[0]
        assert lines[0].startswith(f"model {daemon.engines[0].model.name}: ")
    # Each daemon of a round-robin share gets its samples in order: none is refused.
    registry = daemon.metrics.registry
    assert registry.get_sample_value("rnnsentry_rejections_total", {"reason": "out_of_order"}) == 0
    sent = len(range(0, len(rows), every))
    assert registry.get_sample_value("rnnsentry_messages_total", {"outcome": "scored"}) == sent
