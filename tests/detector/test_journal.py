"""The alert journal and the cleared alert of an evicted stream: every raised alert gets
its cleared, whatever happens to the stream or the process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from detector.config import StreamConfig
from detector.engine import AlertEvent, Engine
from detector.journal import (
    AlertJournal,
    Entry,
    apply_journal,
    journal_path,
    read_journals,
    remove_stale,
)
from detector.model import LoadedModel
from detector.scoring import ScoringConfig
from tests.support import tiny_fleet


@pytest.fixture
def engine(tiny_model: Path) -> Engine:
    return Engine(LoadedModel.load(tiny_model), ScoringConfig(warmup_steps=5),
                  StreamConfig(max_streams=64, idle_ttl_s=100.0))  # fmt: skip


def _event(stream: str, event: str, ts: float, since: float, episode: int = 1) -> AlertEvent:
    return AlertEvent(0, stream, event, episode, ts, since, 0.5, 0.5, 1.0, [])


def _feed(
    engine: Engine, streams: list[str], t0: float, steps: int, now: float
) -> list[AlertEvent]:
    rows = tiny_fleet(n_streams=1, n_steps=max(steps, 2), seed=3, start_step=600).values[0]
    events = []
    for t in range(steps):
        n = len(streams)
        result = engine.process(streams, np.full(n, t0 + t), np.tile(rows[t], (n, 1)), now=now)
        events.extend(result.events)
    return events


def test_an_idle_stream_evicted_with_an_open_alert_is_cleared(engine: Engine) -> None:
    _feed(engine, ["a", "b"], 100.0, 3, now=1000.0)
    assert engine.adopt_alert("a", True, 1, 101.0, 102.0, now=1000.0)
    assert engine.evict_idle(now=2000.0) == 2  # both idle; only "a" had an alert
    (cleared,) = engine.take_pending()
    assert (cleared.stream, cleared.event, cleared.reason) == ("a", "cleared", "evicted")
    assert (cleared.episode, cleared.episode_ts, cleared.ts) == (1, 101.0, 102.0)
    assert engine.take_pending() == []


def test_a_stream_evicted_to_make_room_has_its_alert_cleared_in_that_batch(
    tiny_model: Path,
) -> None:
    engine = Engine(LoadedModel.load(tiny_model), ScoringConfig(warmup_steps=5),
                    StreamConfig(max_streams=2))  # fmt: skip
    _feed(engine, ["a"], 100.0, 2, now=1.0)
    _feed(engine, ["b"], 100.0, 2, now=2.0)
    engine.adopt_alert("a", True, 3, 100.0, 101.0, now=2.0)
    events = _feed(engine, ["c"], 100.0, 1, now=3.0)  # "a" is the least recently seen
    assert [(e.stream, e.event, e.reason, e.episode) for e in events] == [
        ("a", "cleared", "evicted", 3)
    ]
    assert "a" not in engine.table and {"b", "c"} <= set(engine.table.streams())


def test_the_journal_gives_each_stream_its_latest_event_and_survives_a_torn_line(
    tmp_path: Path,
) -> None:
    snap = tmp_path / "state.snap"
    first = AlertJournal(journal_path(snap, 0))
    first.record("m", _event("a", "raised", 10.0, 10.0))
    first.record("m", _event("a", "update", 11.0, 10.0))  # not an alert's beginning or end
    first.record("m", _event("a", "cleared", 20.0, 10.0))
    first.record("m", _event("b", "raised", 15.0, 15.0, episode=4))
    first.close()
    other = AlertJournal(journal_path(snap, 1))  # another process of an earlier run
    other.record("m", _event("a", "raised", 30.0, 30.0, episode=2))
    other.close()
    with open(journal_path(snap, 1), "ab") as f:
        f.write(b'{"model": "m", "stream": "c", "ev')  # killed mid-write
    entries = read_journals(snap)
    assert set(entries) == {("m", "a"), ("m", "b")}
    a, b = entries["m", "a"], entries["m", "b"]
    assert (a.raised, a.episode, a.episode_ts) == (True, 2, 30.0)  # the later by sample time
    assert (b.raised, b.episode, b.ts) == (True, 4, 15.0)
    assert len(journal_path(snap, 0).read_text().splitlines()) == 3  # no "update"


def test_compact_keeps_only_what_came_after_the_mark(tmp_path: Path) -> None:
    journal = AlertJournal(journal_path(tmp_path / "s", 0))
    journal.record("m", _event("a", "raised", 10.0, 10.0))
    journal.mark()  # a snapshot's capture holds the raise
    journal.record("m", _event("a", "cleared", 20.0, 10.0))
    journal.compact()
    journal.record("m", _event("b", "raised", 25.0, 25.0))
    journal.close()
    assert [(k, e.raised) for k, e in read_journals(tmp_path / "s").items()] == [
        (("m", "a"), False), (("m", "b"), True)
    ]  # fmt: skip


def test_apply_lays_newer_events_over_the_restored_state_only(engine: Engine) -> None:
    _feed(engine, ["a", "b", "c"], 100.0, 10, now=1000.0)  # last sample time 109
    entries = {
        ("tiny", "a"): _entry(True, 1, 109.0, 109.0),  # raised at its last sample: adopted
        ("tiny", "b"): _entry(True, 1, 50.0, 50.0),  # older than the state: ignored
        ("tiny", "new"): _entry(True, 2, 200.0, 200.0),  # a stream the state lacks
        ("other", "c"): _entry(True, 1, 300.0, 300.0),  # a model not loaded
    }
    name = engine.model.name
    entries = {(name if m == "tiny" else m, s): e for (m, s), e in entries.items()}
    assert apply_journal(entries, [engine], now=1000.0) == 2
    a = engine.table.arrays
    row_a, row_b = engine.table.index["a"], engine.table.index["b"]
    assert a["active"][row_a] and a["episode_ts"][row_a] == 109.0
    assert not a["active"][row_b]
    assert a["active"][engine.table.index["new"]]
    # The same again changes nothing; a clear at the state's own last time is laid over it.
    assert apply_journal(entries, [engine], now=1000.0) == 0
    assert apply_journal({(name, "a"): _entry(False, 1, 109.0, 109.0)}, [engine], 1000.0) == 1
    assert not a["active"][row_a]


def _entry(raised: bool, episode: int, since: float, ts: float) -> Entry:
    return Entry(raised, episode, since, ts)


def test_stale_journals_of_a_larger_run_are_removed(tmp_path: Path) -> None:
    snap = tmp_path / "state.snap"
    for i in range(3):
        journal = AlertJournal(journal_path(snap, i))
        journal.record("m", _event("a", "raised", 1.0, 1.0))
        journal.close()
    (tmp_path / "state.snap.alerts.x").write_text("not a journal")
    remove_stale(snap, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state.snap.alerts.0", "state.snap.alerts.x"
    ]  # fmt: skip
    assert math.isfinite(read_journals(snap)["m", "a"].ts)
