"""detector.engine: one batched step of many streams through a real tiny model.

Rounds (a stream twice in a batch is stepped in order), one onnxruntime call a round,
the time checks (out of order, duplicate, gap reset, a resumed stream), a network output
that is not finite, the table's limits (eviction when full, idle streams), alert events
and what a reload may take over. The model is the session's tiny GRU (sample interval 1 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.config import StreamConfig
from detector.engine import (
    DUPLICATE,
    MODEL_NON_FINITE,
    OUT_OF_ORDER,
    SCORED,
    BatchResult,
    Engine,
    _rounds,
)
from detector.model import LoadedModel
from detector.scoring import ScoringConfig
from tests.support import tiny_fleet, train_tiny_model

T0 = 1_700_000_000.0
SCORING = ScoringConfig(warmup_steps=5)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return LoadedModel.load(tiny_model, name="pump")


@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    """Normal rows in raw units of one pump, [T, F]."""
    return np.asarray(tiny_fleet(n_streams=1, n_steps=200, seed=3).values[0])


def engine(model: LoadedModel, streams: StreamConfig | None = None) -> Engine:
    return Engine(model, SCORING, streams)


def step(eng: Engine, streams: list[str], ts: list[float], rows: np.ndarray) -> BatchResult:
    return eng.process(streams, np.asarray(ts), np.asarray(rows), now=max(ts))


def state_of(eng: Engine, stream: str) -> dict[str, np.ndarray]:
    return eng.table.gather(np.array([eng.table.index[stream]]))


def _rounds_by_counting(streams: list[str]) -> list[list[int]]:
    """The plain definition: a sample's round is how many samples of its stream came first."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for i, stream in enumerate(streams):
        k = seen.get(stream, 0)
        seen[stream] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds or [[]]


@settings(database=None, deadline=None)
@given(streams=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=60))
def test_rounds_split_repeated_streams_in_order(streams: list[str]) -> None:
    rounds, place = _rounds(streams)
    assert [r.tolist() for r in rounds] == _rounds_by_counting(streams)
    # each sample's stream by its place in the first round, which holds every stream once
    first = [streams[i] for i in rounds[0].tolist()]
    assert [first[k] for k in place.tolist()] == streams


def test_an_empty_batch_is_an_empty_result_and_no_call(model: LoadedModel) -> None:
    result = engine(model).process([], np.zeros(0), np.zeros((0, model.meta.n_features)))
    assert result.status.shape == (0,) and result.std_errors.shape == (0, 4)
    assert result.call_sizes == [] and result.events == []


def test_distinct_streams_are_one_call_and_scored_from_their_second_sample(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model)
    first = step(eng, ["a", "b", "c"], [T0] * 3, normal[:3])
    assert first.call_sizes == [3] and first.new_streams == 3
    assert np.isnan(first.raw).all()  # no prediction yet
    second = step(eng, ["a", "b", "c"], [T0 + 1] * 3, normal[3:6])
    assert second.call_sizes == [3] and second.new_streams == 0
    assert (second.status == SCORED).all() and np.isfinite(second.raw).all()
    assert len(eng.table) == 3


def test_a_stream_twice_in_a_batch_is_stepped_in_order_as_if_one_at_a_time(
    model: LoadedModel, normal: np.ndarray
) -> None:
    streams, ts = ["a", "b", "a", "a", "b"], [T0, T0, T0 + 1, T0 + 2, T0 + 1]
    together = engine(model).process(streams, np.asarray(ts), normal[:5], now=T0 + 2)
    assert together.call_sizes == [2, 2, 1]  # rounds: {a, b}, {a, b}, {a}
    alone = engine(model)
    for i in range(5):
        one = alone.process([streams[i]], np.asarray([ts[i]]), normal[i : i + 1], now=ts[i])
        assert one.raw[0] == together.raw[i] or (np.isnan(one.raw[0]) and np.isnan(together.raw[i]))
        assert one.likelihood[0] == together.likelihood[i]


def test_a_batch_of_uneven_runs_of_samples_is_stepped_as_one_sample_a_call(
    model: LoadedModel, normal: np.ndarray
) -> None:
    """Rounds that hold every stream of the batch work on its gathered copy itself, the
    others on a part of it; either way, the same numbers as one sample a call, with a gap
    and a stream that sends fewer samples than the others."""
    streams = ["a", "b", "c"] * 4 + ["a", "b", "a"]
    ts = [T0 + t for t in range(4) for _ in range(3)] + [T0 + 4, T0 + 4, T0 + 99_999]
    together = engine(model).process(streams, np.asarray(ts), normal[:15], now=ts[-1])
    assert together.call_sizes == [3, 3, 3, 3, 2, 1] and together.gap_resets == 1
    alone = engine(model)
    for i in range(15):
        one = alone.process([streams[i]], np.asarray([ts[i]]), normal[i : i + 1], now=ts[i])
        np.testing.assert_array_equal(one.raw, together.raw[i : i + 1])
        assert one.likelihood[0] == together.likelihood[i] and one.score[0] == together.score[i]


def test_out_of_order_and_duplicate_samples_are_refused_and_change_nothing(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model)
    for t in range(3):
        step(eng, ["a"], [T0 + t], normal[t : t + 1])
    before = state_of(eng, "a")
    late = step(eng, ["a", "a"], [T0 + 1, T0 + 2], normal[3:5])  # older, then the same time
    assert late.status.tolist() == [OUT_OF_ORDER, DUPLICATE]
    assert np.isnan(late.raw).all() and late.call_sizes == []
    after = state_of(eng, "a")
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_a_gap_beyond_the_limit_resets_the_network_memory_only_beyond_it(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model, StreamConfig(max_gap_s=5.0))
    assert engine(model).max_gap_s == 10.0  # default: ten of the model's 1 s intervals
    for t in range(3):
        step(eng, ["a"], [T0 + t], normal[t : t + 1])
    within = step(eng, ["a"], [T0 + 7], normal[3:4])  # 5 s after the last: not beyond
    assert within.gap_resets == 0 and np.isfinite(within.raw[0])
    beyond = step(eng, ["a"], [T0 + 12.5], normal[4:5])
    assert beyond.gap_resets == 1
    assert beyond.status[0] == SCORED and np.isnan(beyond.raw[0])
    assert bool(state_of(eng, "a")["has_pred"][0])  # it predicts again from here


def test_a_resumed_stream_steps_after_a_long_absence_without_a_gap_or_a_score(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model)
    for t in range(3):
        step(eng, ["a"], [T0 + t], normal[t : t + 1])
    eng.mark_resumed(np.array([eng.table.index["a"]]))
    back = step(eng, ["a"], [T0 + 600], normal[3:4])  # the daemon was away ten minutes
    assert back.gap_resets == 0 and np.isnan(back.raw[0])
    assert not bool(state_of(eng, "a")["resumed"][0])
    gap = step(eng, ["a"], [T0 + 1200], normal[4:5])  # now a silence is the sensor's again
    assert gap.gap_resets == 1


def test_intervals_longer_than_one_and_a_half_sample_intervals_are_counted(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model)
    assert eng.long_interval_s == 1.5  # the tiny model samples every second
    first = step(eng, ["a", "b"], [T0, T0], normal[0:2])
    assert (first.intervals, first.long_intervals) == (0, 0)  # new streams follow nothing
    # a: 1 s, then 1.5 s (not longer), then 2 s; b: 3 s; b again, out of order: not taken
    later = step(eng, ["a", "b", "a", "a", "b"], [T0 + 1, T0 + 3, T0 + 2.5, T0 + 4.5, T0 + 2],
                 normal[2:7])  # fmt: skip
    assert later.status[-1] == OUT_OF_ORDER
    assert (later.intervals, later.long_intervals) == (4, 2)
    eng.mark_resumed(np.array([eng.table.index["a"]]))
    back = step(eng, ["a"], [T0 + 600], normal[7:8])  # the daemon's own absence: not counted
    assert (back.intervals, back.long_intervals) == (0, 0)


def test_a_network_output_that_is_not_finite_leaves_that_stream_as_it_was(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model)
    for t in range(3):
        step(eng, ["a", "b"], [T0 + t] * 2, normal[2 * t : 2 * t + 2])
    before = state_of(eng, "a")
    huge = normal[6:8].copy()
    huge[0] = 1e300  # finite here, infinite as the graph's float32: the network gives NaN
    out = step(eng, ["a", "b"], [T0 + 3] * 2, huge)
    assert out.status.tolist() == [MODEL_NON_FINITE, SCORED]
    assert np.isnan(out.raw[0]) and np.isfinite(out.raw[1])
    after = state_of(eng, "a")
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_a_network_output_not_finite_in_a_later_round_keeps_the_rounds_before(
    model: LoadedModel, normal: np.ndarray
) -> None:
    """Within one batch: the round that goes wrong for a stream leaves it as the rounds
    before left it, as one sample a call does, and the other streams go on."""
    streams, ts = ["a", "b"] * 3, [T0, T0, T0 + 1, T0 + 1, T0 + 2, T0 + 2]
    x = normal[:6].copy()
    x[2] = 1e300  # a's second sample
    together = engine(model)
    out = together.process(streams, np.asarray(ts), x, now=T0 + 2)
    assert out.status.tolist() == [SCORED, SCORED, MODEL_NON_FINITE, SCORED, SCORED, SCORED]
    alone = engine(model)
    for i in range(6):
        alone.process([streams[i]], np.asarray([ts[i]]), x[i : i + 1], now=ts[i])
    for stream in ("a", "b"):  # float32 sums over a batch of two round otherwise than of one
        for name, value in state_of(alone, stream).items():
            np.testing.assert_allclose(state_of(together, stream)[name], value, rtol=1e-6,
                                       err_msg=name)  # fmt: skip


def test_a_full_table_forgets_the_least_recently_seen_stream(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model, StreamConfig(max_streams=2))
    step(eng, ["a"], [T0], normal[:1])
    step(eng, ["b"], [T0 + 1], normal[1:2])
    step(eng, ["a"], [T0 + 2], normal[2:3])  # b is now the one seen longest ago
    full = step(eng, ["c"], [T0 + 3], normal[3:4])
    assert full.evicted == 1 and full.new_streams == 1
    assert set(eng.table.index) == {"a", "c"}


def test_streams_idle_past_the_ttl_are_forgotten(model: LoadedModel, normal: np.ndarray) -> None:
    eng = engine(model, StreamConfig(idle_ttl_s=10.0))
    step(eng, ["a"], [T0], normal[:1])
    step(eng, ["b"], [T0 + 8], normal[1:2])
    assert eng.evict_idle(now=T0 + 10) == 0  # exactly the TTL: kept
    assert eng.evict_idle(now=T0 + 15) == 1 and set(eng.table.index) == {"b"}


def test_a_spike_raises_one_event_that_names_the_sensor_and_its_episode(
    model: LoadedModel, normal: np.ndarray
) -> None:
    eng = engine(model)
    events = []
    for t in range(60):
        events += step(eng, ["p1"], [T0 + t], normal[t : t + 1]).events
    assert events == []
    spike = normal[60:61].copy()
    vibration = model.meta.features.index("vibration")
    spike[0, vibration] += 40 * model.meta.normalisation.scale[vibration]
    out = step(eng, ["p1"], [T0 + 60], spike)
    (event,) = out.events
    assert (event.stream, event.event, event.index, event.ts) == ("p1", "raised", 0, T0 + 60)
    assert event.episode_ts == T0 + 60 and event.top[0][0] == "vibration"
    assert event.likelihood >= SCORING.threshold and bool(out.active[0])


def test_a_one_sample_spike_is_not_followed_and_a_lasting_shift_is(
    model: LoadedModel, normal: np.ndarray
) -> None:
    """The model is fed a spike held back at the per-step check's tail, so its next
    prediction stays near the one it would have made without the spike; two samples beyond
    the tail on one side are the process moving, and the model follows them."""
    vibration = model.meta.features.index("vibration")
    big = 40 * model.meta.normalisation.scale[vibration]

    def predictions(shifted: range) -> np.ndarray:
        eng = engine(model)
        rows = normal[:64].copy()
        rows[shifted.start : shifted.stop, vibration] += big
        out = []
        for t in range(64):
            step(eng, ["p1"], [T0 + t], rows[t : t + 1])
            state = state_of(eng, "p1")
            out.append(state["mean"][0, vibration] * np.exp(-0.5 * state["log_var"][0, vibration]))
        return np.array(out)  # each prediction in its own spreads

    plain, spike = predictions(range(0)), predictions(range(60, 61))
    shift = predictions(range(60, 64))
    np.testing.assert_array_equal(spike[:60], plain[:60])
    assert abs(spike[60] - plain[60]) < 6.0  # not 40 spreads: the spike was held back
    assert abs(shift[61] - plain[61]) > 20.0  # followed from the second sample on


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("lstm") / "tiny-lstm.onnx"
    train_tiny_model(path, cell="lstm", epochs=1)
    return LoadedModel.load(path)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A GRU of the tiny model's shapes, trained anew: another network, the same columns."""
    path = tmp_path_factory.mktemp("retrained") / "tiny-gru.onnx"
    train_tiny_model(path, cell="gru", epochs=1)
    return LoadedModel.load(path, name="pump")


def test_a_reload_takes_the_streams_over_only_for_the_same_network(
    model: LoadedModel, lstm: LoadedModel, retrained: LoadedModel, normal: np.ndarray
) -> None:
    old = engine(model)
    step(old, ["a", "b"], [T0, T0], normal[:2])
    same = engine(model)  # the file reloaded unchanged: every stream as it was
    assert same.adopt_state(old) and same.table is old.table and len(same.table) == 2
    other = Engine(lstm, SCORING)  # an LSTM carries c beside h: the columns differ
    assert not other.adopt_state(same) and len(other.table) == 0

    # A retrained network of the same shapes: its streams start afresh (its own states and
    # statistics, its warm-up), and an alert open on one is cleared, so it has its pair.
    assert retrained.meta.fingerprint != model.meta.fingerprint
    fresh = Engine(retrained, SCORING)
    assert fresh.table.columns == same.table.columns
    row = same.table.index["b"]
    same.table.arrays["active"][row] = True
    same.table.arrays["episodes"][row] = 3
    assert not fresh.adopt_state(same) and len(fresh.table) == 0
    (cleared,) = fresh.take_pending()
    assert (cleared.stream, cleared.event, cleared.episode) == ("b", "cleared", 3)
    assert cleared.reason == "reloaded" and cleared.ts == T0
    result = step(fresh, ["b"], [T0 + 1.0], normal[2:3])
    assert result.status[0] == SCORED and not result.active[0] and len(fresh.table) == 1
